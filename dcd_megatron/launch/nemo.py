"""NeMo-Run's own command line for dcd-megatron: entrypoints, recipe and executor factories.

    python recipes/train.py --factory tiny_cpu train.steps=20 run.executor=local run.executor.ntasks_per_node=2 -y
    python recipes/train.py --factory qwen25_1p5b_h100_bf16 run.executor=slurm_h100 run.executor.nodes=8 --dryrun
    nemo dcd train --factory tiny_cpu ...            (the same, as a subcommand of NeMo-Run's `nemo`)
    nemo dcd pipeline --factory tiny_cpu teacher=... traces=... ...   (score -> train -> eval -> export)

- **Entrypoints** (`@run.cli.entrypoint`, namespace `dcd`): `train(model, parallel, data, loss,
  optim, train, tracking, runtime)`, whose arguments are TrainConfig's sections, so NeMo-Run's
  dotted overrides are dcd-train's keys (`train.steps=20`, `loss.method=tis`); and `pipeline`
  (dcd_megatron/launch/pipeline.py). Every rank runs `train` through NeMo-Run's fdl_runner; it is
  dcd-train minus the argument parsing (`dcd_megatron.cli.train.run_config`).
- **Recipe factories**: generated from the one registry, `dcd_megatron.recipes.RECIPES`. Each
  recipe is a factory for `TrainConfig` (`cfg = tiny_cpu()` gives a `run.Config[TrainConfig]`)
  and, under the same name, a `--factory` for each entrypoint.
- **Executor factories** (`run.executor=NAME`, then `run.executor.FIELD=VALUE`): `local`
  (torchrun here), `slurm_h100` (sbatch + pyxis, one task per GPU), `docker` (the image).
- **DcdRunContext** checks everything before anything is submitted: NeMo-Run's parse, then the
  dataclasses' own validation and the executor's layout; an error is one line and exit code 2.
  A dry run prints what would be submitted (the sbatch script, the container spec, the command).
"""

import os
import sys
import types
from dataclasses import fields
from pathlib import Path

import fiddle as fdl
import nemo_run as run
from fiddle._src.experimental import dataclasses as fdl_dc  # what NeMo-Run itself converts dataclasses with
from nemo_run.cli.cli_parser import type_parser
from nemo_run.config import get_type_namespace

from dcd_megatron.errors import UserError
from dcd_megatron.configs.train import LoopConfig, OptimConfig, RuntimeConfig, TrainConfig
from dcd_megatron.data.config import DataConfig
from dcd_megatron.loss import DCDConfig
from dcd_megatron.model.config import ModelConfig
from dcd_megatron.recipes import RECIPES
from dcd_megatron.runtime.layout import ParallelConfig
from dcd_megatron.tracking import TrackingConfig

# NeMo-Run 0.11's parser knows typing.Union (Optional[int]) but not PEP 604's `int | None`
# (types.UnionType), which our config dataclasses use: register its own union parser for it.
type_parser.register_parser(types.UnionType)(type_parser.parse_union)

NAMESPACE = "dcd"  # `nemo dcd train`, `nemo dcd pipeline` (pyproject: the nemo_run.cli entry point)
DEFAULT_DOCKER_IMAGE = "dcd-megatron:latest"
SECTIONS = tuple(f.name for f in fields(TrainConfig))  # model, parallel, data, loss, optim, train, ...


class LaunchError(UserError, ValueError):
    """Bad launcher input (an executor layout that cannot work, ...); the message says the fix."""


class JobFailed(RuntimeError):
    """A submitted NeMo-Run job ended in another state than SUCCEEDED."""


# --- converting configs ------------------------------------------------------------------------


def to_run_config(cfg) -> run.Config:
    """A finished config dataclass as nested `run.Config`s (every field, including ones a recipe
    set after construction); `fdl.build` of the result equals `cfg`."""
    return _cast_tree(fdl_dc.convert_dataclasses_to_configs(cfg, allow_post_init=True))


def _cast_tree(buildable: fdl.Buildable) -> run.Config:
    for name, value in buildable.__arguments__.items():
        if isinstance(value, fdl.Config):
            setattr(buildable, name, _cast_tree(value))
    return fdl.cast(run.Config, buildable)


def sections(cfg: TrainConfig) -> dict[str, run.Config]:
    """TrainConfig's sections as `run.Config`s, the keyword arguments of `train`."""
    tree = to_run_config(cfg)
    return {name: getattr(tree, name) for name in SECTIONS}


def train_config(**kw) -> TrainConfig:
    """The TrainConfig of `train`'s (built) section arguments; its own checks run here."""
    return TrainConfig(**kw)


# --- the training entrypoint -------------------------------------------------------------------


def train(
    model: ModelConfig,
    parallel: ParallelConfig,
    data: DataConfig,
    loss: DCDConfig,
    optim: OptimConfig,
    train: LoopConfig,  # noqa: A002  (the section is called `train`, as in dcd-train's keys)
    tracking: TrackingConfig,
    runtime: RuntimeConfig,
) -> None:
    """Train a student with the DCD loss (dcd-train); the arguments are TrainConfig's sections.

    Exits with dcd-train's exit code when it is not 0 (2: a user error, already printed), so
    NeMo-Run and the scheduler see the job fail.
    """
    from dcd_megatron.cli.train import run_config
    from dcd_megatron.runtime.quiet import quiet_megatron_warnings
    from dcd_megatron.tracking.redact import redacted_console

    quiet_megatron_warnings(prog="dcd train")
    cfg = train_config(model=model, parallel=parallel, data=data, loss=loss, optim=optim, train=train,
                       tracking=tracking, runtime=runtime)
    with redacted_console():
        code = run_config(cfg)
    if code:
        raise SystemExit(code)


# --- executors (run.executor=NAME) -------------------------------------------------------------

# What slurm/dcd_8node.sh exports on every rank.
GPU_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "NCCL_DEBUG": "WARN",
    "NCCL_IB_TIMEOUT": "22",
    "OMP_NUM_THREADS": "1",
}


def _passthrough_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "HF_HOME") if k in os.environ}


def local(ntasks_per_node: int = 1) -> run.Config[run.LocalExecutor]:
    """torchrun on this machine with `ntasks_per_node` ranks (one per GPU, or CPU ranks under gloo).

    `torchrun` comes from this interpreter's environment (its bin directory goes first on PATH),
    so `.venv/bin/python recipes/train.py ...` works without activating the venv."""
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]), "PYTHONUNBUFFERED": "1"}
    return run.Config(run.LocalExecutor, ntasks_per_node=ntasks_per_node, launcher="torchrun",
                      env_vars=env | _passthrough_env())


def slurm_h100(
    account: str | None = os.environ.get("SBATCH_ACCOUNT"),
    partition: str | None = os.environ.get("SBATCH_PARTITION"),
    nodes: int = 8,
    gpus_per_node: int = 8,
    time: str = "04:00:00",
    container_image: str = "dcd-megatron.sqsh",
    container_mounts: list[str] | None = None,
    job_dir: str = "nemo_runs",
    ssh_host: str | None = None,
    ssh_user: str | None = None,
) -> run.Config[run.SlurmExecutor]:
    """sbatch with pyxis/enroot: `nodes` x `gpus_per_node` H100s, one Slurm task per GPU.

    The launch model of `slurm/dcd_8node.sh` (docs/launch.md says why): each task is a rank;
    MASTER_ADDR is the allocation's first node and MASTER_PORT is derived from the job id;
    `--signal=USR1@300` makes dcd-train checkpoint and stop 5 minutes before the time limit.
    `container_image` is a squashfs path or `registry#image:tag`; `container_mounts` must show the
    data, the output dir and `job_dir` (NeMo-Run's sbatch script, serialized config and logs, on
    the shared filesystem) at the same paths. sbatch runs here (a login node) or over `ssh_host`.
    """
    if ssh_host:
        tunnel = run.Config(run.SSHTunnel, host=ssh_host, user=ssh_user or os.environ.get("USER", ""), job_dir=job_dir)
    else:
        tunnel = run.Config(run.LocalTunnel, job_dir=str(Path(job_dir).absolute()))
    image = container_image
    if "#" not in image and not image.startswith("/") and image.endswith(".sqsh"):
        image = str(Path(image).absolute())  # pyxis resolves relative paths on the compute node
    env = GPU_ENV | {
        # set by NeMo-Run's sbatch script before srun: head_node = the allocation's first host
        "MASTER_ADDR": "${head_node}",
        "MASTER_PORT": "$((20000 + SLURM_JOB_ID % 20000))",
    }
    return run.Config(
        run.SlurmExecutor,
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
        container_mounts=list(container_mounts or []),
        job_name_prefix="dcd-",
        tunnel=tunnel,
        packager=run.Config(run.Packager),  # the image's installed dcd_megatron runs; no code is shipped
        env_vars=env | _passthrough_env(),
    )


def docker(
    container_image: str = DEFAULT_DOCKER_IMAGE,
    ntasks_per_node: int = 1,
    volumes: list[str] | None = None,
    shm_size: str = "16g",
) -> run.Config[run.DockerExecutor]:
    """The project's image on this machine's docker, all GPUs visible (`docker run --gpus all
    --ipc=host`), torchrun with `ntasks_per_node` ranks; `volumes` are `host:container` mounts."""
    return run.Config(
        run.DockerExecutor,
        container_image=container_image,
        num_gpus=-1,  # a device request for every GPU, what `docker run --gpus all` sends
        ntasks_per_node=ntasks_per_node,
        launcher="torchrun",
        ipc_mode="host",
        shm_size=shm_size,
        volumes=list(volumes or []),
        packager=run.Config(run.Packager),
        env_vars=GPU_ENV | _passthrough_env(),
    )


EXECUTORS = {"local": local, "slurm_h100": slurm_h100, "docker": docker}
for _name, _fn in EXECUTORS.items():
    run.cli.factory(_fn, target=run.Executor, name=_name)


def check_executor(executor) -> None:
    """What NeMo-Run accepts but cannot work: no ranks, or Slurm tasks that are not one per GPU."""
    if executor is None:
        return
    tasks = getattr(executor, "ntasks_per_node", 1)
    if tasks < 1:
        raise LaunchError(f"run.executor.ntasks_per_node must be >= 1, got {tasks}")
    if isinstance(executor, run.SlurmExecutor):
        if executor.nodes < 1:
            raise LaunchError(f"run.executor.nodes must be >= 1, got {executor.nodes}")
        gpus = executor.gpus_per_node
        if gpus and tasks != gpus:
            raise LaunchError(f"one Slurm task per GPU: run.executor.ntasks_per_node={tasks} but "
                              f"run.executor.gpus_per_node={gpus}; set both to the same number")


# --- recipes: one registry (dcd_megatron.recipes.RECIPES), every factory generated from it -------


def _built_by(fn, cls, *args, **kwargs):
    """`run.autoconvert`'s conversion for a recipe: call it, convert the result (the default,
    fiddle's auto_config, would wrap the recipe function itself)."""
    config = to_run_config(fn(*args, **kwargs))
    return config if cls is run.Config else fdl.cast(cls, config)


def _config_factory(name: str, fn):
    converted = run.autoconvert(fn, to_buildable_fn=_built_by)
    return run.cli.factory(converted, name=name, namespace=get_type_namespace(TrainConfig))


def _entrypoint_factory(entrypoint, name: str, fn):
    """`--factory NAME` for an entrypoint whose arguments include TrainConfig's sections."""

    def factory() -> run.Partial:
        return run.Partial(entrypoint, **sections(fn()))

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = fn.__doc__
    return run.cli.factory(factory, target=entrypoint, name=name)


# `cfg = RECIPE_FACTORIES["tiny_cpu"]()`: a run.Config[TrainConfig]; also `from ... import tiny_cpu`.
RECIPE_FACTORIES = {name: _config_factory(name, fn) for name, fn in RECIPES.items()}
globals().update(RECIPE_FACTORIES)


def register_recipes(entrypoint) -> None:
    """`--factory RECIPE` for every recipe, and `--factory "from_yaml(path=FILE)"` for a
    dcd-train YAML (NeMo-Run's own `--yaml` turns empty strings into `key=`, which it refuses)."""
    for name, fn in RECIPES.items():
        _entrypoint_factory(entrypoint, name, fn)

    def from_yaml(path: str) -> run.Partial:
        from dcd_megatron.configs import load_config

        return run.Partial(entrypoint, **sections(load_config(TrainConfig, path)))

    run.cli.factory(from_yaml, target=entrypoint, name="from_yaml")


# --- running: checks first, one-line errors, dry runs that show what would be submitted ----------


def describe_dryrun(exp) -> str:
    """What each job of a dry-run experiment would submit: the sbatch script, or the request."""
    out = []
    for job in exp.jobs:
        info = getattr(job, "_dryrun_info", None)
        request = getattr(info, "request", None)
        text = request.materialize() if hasattr(request, "materialize") else str(info)
        out.append(f"# --- {job.id} ---\n{text}" if len(exp.jobs) > 1 else text)
    return "\n".join(out)


def run_experiment(exp, *, dryrun: bool, detach: bool = False, tail_logs: bool = True) -> str:
    """Run (or dry-run) an open `run.Experiment`; the final state, or the dry run's text.

    Raises JobFailed naming the failed jobs and where their logs are."""
    if dryrun:
        exp.dryrun(log=False)
        return describe_dryrun(exp)
    exp.run(detach=detach, tail_logs=tail_logs)
    if detach:
        return "SUBMITTED"
    exp._wait_for_jobs(jobs=[job for job in exp.jobs if job.launched and job.handle])
    states = {job.id: str(getattr(job.state, "name", job.state)) for job in exp.jobs}
    failed = {k: v for k, v in states.items() if v != "SUCCEEDED"}
    if failed:
        raise JobFailed(f"NeMo-Run jobs ended {failed}; their logs are under {exp._exp_dir}")
    return "SUCCEEDED"


def _known_keys(fn, key: str) -> str:
    """Where an unknown dotted key stops matching, and the names that would match there."""
    import dataclasses
    import inspect
    import typing

    names = [p for p in inspect.signature(fn).parameters if p != "ctx"]
    hints = typing.get_type_hints(fn)
    path = []
    for part in key.split("."):
        if part not in names:
            where = ".".join(path) or "the command line"
            return f"{where} has no {part!r}; choose one of: {', '.join(names)}"
        path.append(part)
        cls = hints.get(part)
        if not dataclasses.is_dataclass(cls):
            break
        names, hints = [f.name for f in dataclasses.fields(cls)], typing.get_type_hints(cls)
    return "see --help"


def explain(exc: BaseException, fn) -> str:
    """NeMo-Run's nested parse errors as one line: the override, what is wrong, the choices."""
    from nemo_run.cli.cli_parser import CLIException, ParseError

    chain, e = [], exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    key = value = None
    for c in chain:
        for d in (getattr(c, "context", None), getattr(c, "reason", None)):
            if isinstance(d, dict) and "key" in d:
                key, value = d["key"], d.get("value")
                break
        if key:
            break
    parsed = [c for c in chain if isinstance(c, ParseError) and isinstance(c.reason, str)]
    if key and parsed:
        tp, reason = parsed[-1].expected_type, parsed[-1].reason
        return f"{key}={value}: {reason}" + ("" if "xpected" in reason else f" (expected {getattr(tp, '__name__', tp)})")
    if isinstance(exc, CLIException):
        key = key or str(exc.arg).split("=")[0]
        return f"unknown key {key}: {_known_keys(fn, key)}"
    return " ".join(str(exc).split(" Fiddle context:")[0].split())


def _check_built(task: run.Partial):
    """Build the task's arguments: each dataclass's own checks, then TrainConfig's cross-section ones."""
    built = fdl.build(task)
    if set(SECTIONS) <= set(built.keywords):
        train_config(**{k: built.keywords[k] for k in SECTIONS})
    return built


class DcdRunContext(run.cli.RunContext):
    """NeMo-Run's RunContext, checking the whole job before anything is submitted.

    NeMo-Run parses the command line (factories, dotted overrides, `run.executor=...`); then the
    config dataclasses are built (their own validation: enums, layouts, paths) and the executor is
    checked. Any error is one line on stderr and exit code 2; a failed job is exit code 1."""

    def cli_execute(self, fn, args, entrypoint_type="task"):
        import logging

        prog = f"{NAMESPACE} {getattr(fn, '__name__', 'run')}"
        logging.getLogger("nemo_run.cli.cli_parser").setLevel(logging.CRITICAL)  # we say it in one line
        try:
            # NeMo-Run's own split (`_parse_prefixed_args(args, "run")`) takes every argument that
            # starts with "run", so `runtime.device=cpu` was refused as a bad `run.` override.
            run_args = [a[len("run."):] for a in args if a.startswith("run.")]
            task_args = [a for a in args if not a.startswith("run.")]
            if not any(a.startswith("executor=") for a in run_args):
                # NeMo-Run applies `run.executor.X=` only after a `run.executor=NAME`; name the default
                run_args.insert(0, "executor=local")
            self.parse_args(run_args)
            if entrypoint_type == "experiment":
                self._execute_experiment(fn, task_args)
            else:
                self._execute_task(fn, task_args)
        except JobFailed as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        except Exception as exc:  # before anything was submitted: a user error
            print(f"{prog}: error: {explain(exc, fn)}", file=sys.stderr)
            raise SystemExit(2) from None

    def parse_args(self, args, lazy=False):
        out = super().parse_args(args, lazy)
        check_executor(self.executor)
        return out

    def _execute_task(self, fn, task_args):
        from rich.console import Console

        from nemo_run.cli.api import _serialize_configuration

        task = self.parse_fn(fn, task_args)
        built = _check_built(task)
        if any([self.to_yaml, self.to_toml, self.to_json]):
            _serialize_configuration(task, self.to_yaml, self.to_toml, self.to_json, console=Console(), verbose=True)
            return
        if self.direct or self.executor is None:  # in this process
            built()
            return
        if not self.dryrun and not self._should_continue(self.skip_confirmation):
            print("Exiting...")
            return
        with run.Experiment(self.name, executor=self.executor, log_level="WARN") as exp:
            exp.add(task, name=self.name, tail_logs=not self.detach)
            result = run_experiment(exp, dryrun=self.dryrun, detach=self.detach)
        print(result if self.dryrun else f"{self.name}: {result}")

    def _execute_experiment(self, fn, experiment_args):
        """An experiment entrypoint (the pipeline) builds and runs its own run.Experiment."""
        from rich.console import Console

        from nemo_run.cli.api import _serialize_configuration

        partial = self.parse_fn(fn, experiment_args, ctx=self)
        if any([self.to_yaml, self.to_toml, self.to_json]):
            _serialize_configuration(partial, self.to_yaml, self.to_toml, self.to_json, console=Console(), verbose=True)
            return
        built = _check_built(partial)
        if self.executor is None:
            raise LaunchError("the pipeline needs an executor: pass run.executor=local|slurm_h100|docker")
        if self.dryrun or self._should_continue(self.skip_confirmation):
            built()


train = run.cli.entrypoint(namespace=NAMESPACE, run_ctx_cls=DcdRunContext, default_executor=local(),
                           help="Train a student with the DCD loss: --factory RECIPE, "
                           "then section.key=value overrides (train.steps=20) and run.executor=...")(train)
register_recipes(train)
