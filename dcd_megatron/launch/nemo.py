"""NeMo-Run recipes, executors and entrypoint for `dcd-train`.

- **Recipes**: the plain functions of `dcd_megatron.recipes` (each returns a complete TrainConfig),
  registered as NeMo-Run CLI factories for `TrainConfig` under their short names (`tiny_cpu`,
  ...). Called, a factory returns a `run.Config[TrainConfig]`: the whole nested dataclass tree
  as NeMo-Run configs, so any field can be changed (`cfg.train.steps = 20`) before launch.
- **Entrypoint**: `train(cfg)`, the function every rank runs (NeMo-Run serialises
  `run.Partial(train, cfg=...)` and runs it with `python -m nemo_run.core.runners.fdl_runner`);
  it is `dcd-train` minus the argument parsing (`dcd_megatron.cli.train.run_config`).
- **Executors**: `local_executor` (torchrun on this machine), `slurm_executor` (sbatch with
  pyxis, one task per GPU like `slurm/dcd_8node.sh`), `docker_executor` (the project's image).
- **launch(...)** runs a config on an executor, or returns the generated script (`dryrun=True`).

`python -m dcd_recipes.run` is the command line over these (`dcd_megatron/launch/cli.py`).
"""

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import fiddle as fdl
import nemo_run as run
from fiddle._src.experimental import dataclasses as fdl_dc  # what NeMo-Run itself converts dataclasses with
from nemo_run.config import get_type_namespace

from dcd_megatron import recipes as _recipes
from dcd_megatron.configs import apply_overrides
from dcd_megatron.launch import EXECUTORS  # noqa: F401  (re-exported)
from dcd_megatron.train.config import ALIASES, TrainConfig

DEFAULT_DOCKER_IMAGE = "dcd-megatron:latest"


class LaunchError(ValueError):
    """Bad launcher input (unknown recipe or executor, missing Slurm account, ...); says the fix."""


# --- the entrypoint --------------------------------------------------------------------------


def train(cfg: TrainConfig) -> None:
    """Train with `cfg` on this rank (rank and world from torchrun's or Slurm's variables).

    Exits with dcd-train's exit code when it is not 0 (2: a user error, already printed), so
    NeMo-Run and the scheduler see the job fail.
    """
    from dcd_megatron.cli.train import run_config

    code = run_config(cfg)
    if code:
        raise SystemExit(code)


# --- recipes ---------------------------------------------------------------------------------


def to_run_config(cfg: TrainConfig) -> run.Config:
    """A finished TrainConfig as nested `run.Config`s (every field, including ones a recipe set
    after construction); `fdl.build` of the result equals `cfg`."""
    return _cast_tree(fdl_dc.convert_dataclasses_to_configs(cfg, allow_post_init=True))


def _cast_tree(buildable: fdl.Buildable) -> run.Config:
    for name, value in buildable.__arguments__.items():
        if isinstance(value, fdl.Config):
            setattr(buildable, name, _cast_tree(value))
    return fdl.cast(run.Config, buildable)


def _built_by(fn, cls, *args, **kwargs):
    """`run.autoconvert`'s conversion for a function that builds a TrainConfig: call it, convert
    the result (the default, fiddle's auto_config, would wrap the recipe function itself)."""
    config = to_run_config(fn(*args, **kwargs))
    return config if cls is run.Config else fdl.cast(cls, config)


def _factory(name: str, fn):
    converted = run.autoconvert(fn, to_buildable_fn=_built_by)
    return run.cli.factory(converted, name=name, namespace=get_type_namespace(TrainConfig))


# One factory per recipe of dcd_megatron.recipes.RECIPES, same names, same parameters.
RECIPE_FACTORIES = {name: _factory(name, fn) for name, fn in _recipes.RECIPES.items()}
tiny_cpu = RECIPE_FACTORIES["tiny_cpu"]
tiny_gpu_bf16 = RECIPE_FACTORIES["tiny_gpu_bf16"]
tiny_gpu_fp8 = RECIPE_FACTORIES["tiny_gpu_fp8"]
qwen25_1p5b_h100_bf16 = RECIPE_FACTORIES["qwen25_1p5b_h100_bf16"]
qwen25_1p5b_h100_fp8 = RECIPE_FACTORIES["qwen25_1p5b_h100_fp8"]


def recipe(name: str, overrides: Sequence[str] = ()) -> run.Config:
    """The named recipe with dcd-train's `key=value` overrides (`train.steps=20`, `tp=2`),
    validated here, before anything is launched (ConfigError/ValueError name the bad key)."""
    if name not in RECIPE_FACTORIES:
        raise LaunchError(f"unknown recipe {name!r}; choose one of: {', '.join(sorted(RECIPE_FACTORIES))}")
    cfg = fdl.build(RECIPE_FACTORIES[name]())
    return to_run_config(apply_overrides(cfg, list(overrides), aliases=ALIASES))


# --- executors -------------------------------------------------------------------------------

# What slurm/dcd_8node.sh exports on every rank (the environment of the caller wins there; here
# an executor's env_vars argument does).
GPU_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "NCCL_DEBUG": "WARN",
    "NCCL_IB_TIMEOUT": "22",
    "OMP_NUM_THREADS": "1",
}


def _passthrough_env(env_vars: dict[str, str] | None) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "HF_HOME") if k in os.environ}
    return env | dict(env_vars or {})


def local_executor(nproc: int = 1, env_vars: dict[str, str] | None = None) -> run.LocalExecutor:
    """torchrun on this machine with `nproc` ranks (one per GPU, or CPU ranks under gloo).

    `torchrun` is taken from this interpreter's environment (its bin directory goes first on
    PATH), so `.venv/bin/python -m dcd_recipes.run` works without activating the venv.
    """
    if nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {nproc}")
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]), "PYTHONUNBUFFERED": "1"}
    return run.LocalExecutor(ntasks_per_node=nproc, launcher="torchrun", env_vars=env | _passthrough_env(env_vars))


def slurm_executor(
    account: str,
    partition: str | None = None,
    nodes: int = 8,
    gpus_per_node: int = 8,
    time: str = "04:00:00",
    container_image: str = "dcd-megatron.sqsh",
    container_mounts: Sequence[str] = (),
    job_dir: str = "nemo_runs",
    ssh_host: str | None = None,
    ssh_user: str | None = None,
    env_vars: dict[str, str] | None = None,
) -> run.SlurmExecutor:
    """sbatch with pyxis/enroot: `nodes` x `gpus_per_node` GPUs, one Slurm task per GPU.

    The same launch model as `slurm/dcd_8node.sh` (docs/launch.md says why): each task is a rank
    (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID); MASTER_ADDR is the allocation's first node and
    MASTER_PORT is derived from the job id. `--signal=USR1@300` makes dcd-train checkpoint and
    stop 5 minutes before the time limit; `--exclusive --mem=0` take whole nodes.

    `container_image` is a squashfs path or `registry#image:tag`; `container_mounts` must make
    the data, the output dir and `job_dir` visible at the same paths. `job_dir` holds NeMo-Run's
    sbatch script, serialized config and logs (on the cluster's shared filesystem); submitting
    from a login node uses a local tunnel, from elsewhere `ssh_host`/`ssh_user`.
    """
    if not account:
        raise LaunchError("the Slurm executor needs an account: pass --account NAME (sbatch --account)")
    if nodes < 1 or gpus_per_node < 1:
        raise LaunchError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    job_dir = str(Path(job_dir).absolute()) if ssh_host is None else job_dir
    if ssh_host:
        tunnel = run.SSHTunnel(host=ssh_host, user=ssh_user or os.environ.get("USER", ""), job_dir=job_dir)
    else:
        tunnel = run.LocalTunnel(job_dir=job_dir)
    image = container_image
    if "#" not in image and not image.startswith("/") and image.endswith(".sqsh"):
        image = str(Path(image).absolute())  # pyxis resolves relative paths on the compute node
    env = GPU_ENV | {
        # set by NeMo-Run's sbatch script before srun: head_node = first host of the allocation
        "MASTER_ADDR": "${head_node}",
        "MASTER_PORT": "$((20000 + SLURM_JOB_ID % 20000))",
    }
    return run.SlurmExecutor(
        account=account,
        partition=partition,
        nodes=nodes,
        ntasks_per_node=gpus_per_node,
        gpus_per_node=gpus_per_node,
        time=time,
        exclusive=True,
        mem="0",
        signal="USR1@300",
        container_image=image,
        container_mounts=list(container_mounts),
        job_name_prefix="dcd-",
        tunnel=tunnel,
        packager=run.Packager(),  # the image's installed dcd_megatron runs; no code is shipped
        env_vars=env | _passthrough_env(env_vars),
    )


def docker_executor(
    image: str = DEFAULT_DOCKER_IMAGE,
    nproc: int = 1,
    volumes: Sequence[str] = (),
    shm_size: str = "16g",
    env_vars: dict[str, str] | None = None,
) -> run.DockerExecutor:
    """The project's image (containers/Dockerfile) on this machine's docker, all GPUs visible
    (`docker run --gpus all --ipc=host`), torchrun with `nproc` ranks. `volumes` are
    `host:container` mounts for data and output; the image's installed code runs."""
    if nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {nproc}")
    return run.DockerExecutor(
        container_image=image,
        num_gpus=-1,  # a device request for every GPU, what `docker run --gpus all` sends
        ntasks_per_node=nproc,
        launcher="torchrun",
        ipc_mode="host",
        shm_size=shm_size,
        volumes=list(volumes),
        packager=run.Packager(),
        env_vars=GPU_ENV | _passthrough_env(env_vars),
    )


# --- launching -------------------------------------------------------------------------------


def launch(cfg: run.Config, executor: run.Executor, name: str = "dcd", dryrun: bool = False,
           detach: bool = False) -> str:
    """Run `train(cfg)` on `executor` as a one-task NeMo-Run experiment.

    dryrun: nothing runs; returns what would be submitted (the sbatch script for Slurm, the
    container spec for Docker, the torchrun command for local). Otherwise waits (unless
    `detach`) and returns the final state, e.g. "SUCCEEDED"; raises RuntimeError if it failed.
    """
    task = run.Partial(train, cfg=cfg)
    with run.Experiment(name, executor=executor, log_level="WARN") as exp:
        exp.add(task, name=name, tail_logs=not detach)
        if dryrun:
            exp.dryrun(log=False)
            return describe_dryrun(exp.jobs[0]._dryrun_info)  # NeMo-Run keeps it on the job
        exp.run(detach=detach)
    # Leaving the `with` block waited for the job (unless detached) and set its final state.
    if detach:
        return "SUBMITTED"
    job = exp.jobs[0]
    state = str(getattr(job.state, "name", job.state))
    if state != "SUCCEEDED":
        raise RuntimeError(f"NeMo-Run job {name!r} ended {state}; its log is under {exp._exp_dir}")
    return state


def describe_dryrun(info) -> str:
    """The text of a NeMo-Run dry run: the sbatch script, or the request's own rendering."""
    request = getattr(info, "request", None)
    if hasattr(request, "materialize"):  # Slurm: the exact script `sbatch` would get
        return request.materialize()
    return str(info)
