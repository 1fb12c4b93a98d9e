"""NeMo-Run recipes for dcd-train: `python -m dcd_recipes.run RECIPE --executor local|slurm|docker`.

The recipes are dcd_megatron.recipes' functions registered as NeMo-Run factories; calling one
returns a `run.Config[TrainConfig]`. From Python:

    import nemo_run as run
    from dcd_recipes import tiny_cpu, local_executor, launch

    cfg = tiny_cpu()
    cfg.train.steps = 20
    launch(cfg, local_executor(nproc=2))

The implementation is dcd_megatron/launch/nemo.py (installed with the package, so containers and
cluster nodes import the entrypoint from there); docs/launch.md, section "NeMo-Run".
"""

__all__ = [
    "RECIPE_FACTORIES", "LaunchError", "docker_executor", "launch", "local_executor", "qwen25_1p5b_h100_bf16",
    "qwen25_1p5b_h100_fp8", "recipe", "slurm_executor", "tiny_cpu", "tiny_gpu_bf16", "tiny_gpu_fp8",
    "to_run_config", "train",
]


def __getattr__(name: str):
    # Lazy: importing nemo_run takes seconds, and `python -m dcd_recipes.run` imports this package
    # before its argument checks run.
    if name in __all__:
        from dcd_megatron.launch import nemo

        return getattr(nemo, name)
    raise AttributeError(f"module 'recipes' has no attribute {name!r}")
