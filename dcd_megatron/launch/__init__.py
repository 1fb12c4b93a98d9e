"""Launching `dcd-train` with NeMo-Run: recipes as NeMo-Run configs, executors, the entrypoint.

The user-facing entry point is the top-level `dcd_recipes` package (`python -m dcd_recipes.run`);
the code lives here so that it is installed with `dcd_megatron` everywhere the job runs
(a container or a cluster node imports `dcd_megatron.launch.nemo.train` to start training).
"""

EXECUTORS = ("local", "slurm", "docker")  # `--executor` choices (defined here: importing nemo_run is slow)
