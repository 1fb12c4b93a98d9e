"""NeMo-Run's own command line (`recipes/train.py`, `nemo dcd train`, `dcd_megatron/launch/nemo.py`):
recipe and executor factories from one registry, NeMo-Run's grammar with our checks and one-line
errors, the Slurm and Docker dry runs (NeMo-Run's own generated sbatch script and container spec),
the tiny recipe trained end to end through NeMo-Run's LocalExecutor with torchrun and 2 ranks, and
scripts/gpu_smoke.sh (syntax, shellcheck, and its CPU mode)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcd_megatron.recipes import RECIPES
from dcd_megatron.checkpoint import checkpoint_dir, find_latest
from tests.train_helpers import FAST, metrics

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "scripts" / "gpu_smoke.sh"
TRAIN = REPO / "recipes" / "train.py"
BIN = Path(sys.executable).parent


def run_recipe(tmp_path, *argv: str, script: Path = TRAIN, timeout: int = 300, env: dict | None = None):
    """`python recipes/<script>.py ARGV` as a user runs it (from tmp_path, NeMo-Run's home there too)."""
    env = dict(os.environ, NEMORUN_HOME=str(tmp_path / "nemo_run_home"), **(env or {}))
    return subprocess.run([sys.executable, str(script), *argv], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)


# --- one registry --------------------------------------------------------------------------------


def test_every_recipe_is_a_factory_for_the_config_and_for_each_entrypoint():
    import fiddle as fdl
    import nemo_run as run

    from dcd_megatron.configs.train import TrainConfig
    from dcd_megatron.launch import nemo, pipeline

    assert set(nemo.RECIPE_FACTORIES) == set(RECIPES)  # generated from the one registry
    for name, fn in RECIPES.items():
        factory = nemo.RECIPE_FACTORIES[name]
        assert run.cli.resolve_factory(TrainConfig, name) is factory, name  # `cfg=NAME` for TrainConfig
        assert getattr(nemo, name) is factory  # importable by name, generated too
        cfg = factory()
        assert isinstance(cfg, run.Config) and isinstance(cfg.train, run.Config), name
        assert fdl.build(cfg) == fn(), name
        for entrypoint in (nemo.train, pipeline.pipeline):  # `--factory NAME` for both entrypoints
            partial = run.cli.resolve_factory(entrypoint, name)()
            assert nemo.train_config(**{k: fdl.build(getattr(partial, k)) for k in nemo.SECTIONS}) == fn(), name
    assert nemo.tiny_gpu_fp8().model.fp8 == "hybrid"  # set after construction by the recipe; kept
    assert not (REPO / "dcd_recipes").exists() and not (REPO / "recipes" / "__init__.py").exists()


def test_executors_are_factories_and_the_task_round_trips_through_the_serializer():
    import fiddle as fdl
    import nemo_run as run
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    from dcd_megatron.launch import nemo

    for name in ("local", "slurm_h100", "docker"):
        assert run.cli.resolve_factory(run.Executor, name) is not None, name
    slurm = fdl.build(nemo.slurm_h100(account="acct"))
    assert (slurm.nodes, slurm.ntasks_per_node, slurm.gpus_per_node, slurm.signal) == (8, 8, 8, "USR1@300")
    task = run.Partial(nemo.train, **nemo.sections(RECIPES["tiny_cpu"]()))
    task.train.steps = 7
    rebuilt = fdl.build(ZlibJSONSerializer().deserialize(ZlibJSONSerializer().serialize(task)))
    assert rebuilt.func is nemo.train and rebuilt.keywords["train"].steps == 7


# --- NeMo-Run's grammar: errors before anything is submitted ---------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--factory", "no_such_recipe"], "No matching factory found for: no_such_recipe"),
    (["--factory", "tiny_cpu", "train.stepz=3"], "unknown key train.stepz: train has no 'stepz'; choose one of: steps,"),
    (["--factory", "tiny_cpu", "nosuch.x=1"], "the command line has no 'nosuch'; choose one of: model, parallel,"),
    (["--factory", "tiny_cpu", "train.steps=many"], "train.steps=many: Invalid integer literal (expected int)"),
    (["--factory", "tiny_cpu", "loss.method=bogus"], "loss.method=bogus: Invalid value for Literal type. Expected one of"),
    (["--factory", "tiny_cpu", "train.global_batch_size=6"], "train.global_batch_size=6 must be a multiple of"),
    (["--factory", "tiny_cpu", "run.executor=kubernetes"], "Executor kubernetes not found"),
    (["--factory", "tiny_cpu", "run.executor=slurm_h100", "run.executor.gpus_per_node=4"],
     "one Slurm task per GPU: run.executor.ntasks_per_node=8 but run.executor.gpus_per_node=4"),
    (["--factory", "tiny_cpu", "run.executor.ntasks_per_node=0"], "run.executor.ntasks_per_node must be >= 1"),
])
def test_bad_input_fails_in_one_line_with_exit_code_2(tmp_path, args, message):
    proc = run_recipe(tmp_path, *args, "--dryrun", timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("dcd train: error: ") and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "nemo_run_home" / "experiments").exists()


# --- dry runs: NeMo-Run's generated text -----------------------------------------------------------


def test_slurm_dryrun_prints_the_sbatch_script_with_pyxis_flags(tmp_path):
    job_dir = tmp_path / "jobs"
    proc = run_recipe(
        tmp_path, "--factory", "qwen25_1p5b_h100_bf16", "train.steps=10", "run.executor=slurm_h100",
        "run.executor.nodes=2", "run.executor.ntasks_per_node=4", "run.executor.gpus_per_node=4",
        "run.executor.account=acct-dcd", "run.executor.partition=batch", "run.executor.time=01:30:00",
        "run.executor.container_image=/images/dcd-megatron.sqsh",
        "run.executor.container_mounts=['/data:/data','/results:/results']",
        f"run.executor.tunnel.job_dir={job_dir}", "--dryrun",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    script = out[out.index("#!/bin/bash"):]
    for line in ("#SBATCH --account=acct-dcd", "#SBATCH --partition=batch", "#SBATCH --nodes=2",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --time=01:30:00",
                 "#SBATCH --signal=USR1@300", "#SBATCH --exclusive", "#SBATCH --mem=0",
                 "export MASTER_ADDR=${head_node}", "export CUDA_DEVICE_MAX_CONNECTIONS=1"):
        assert line in script.splitlines(), f"{line!r} not in:\n{script}"
    srun = next(line for line in script.splitlines() if line.startswith("srun ") and "fdl_runner" in line)
    assert "--container-image /images/dcd-megatron.sqsh" in srun, srun
    mounts = srun.split("--container-mounts ", 1)[1].split()[0].split(",")
    assert mounts[:2] == ["/data:/data", "/results:/results"] and mounts[2].startswith(str(job_dir)), srun
    assert "python -m nemo_run.core.runners.fdl_runner" in srun and "--kill-on-bad-exit=1" in srun
    (tmp_path / "sbatch.sh").write_text(script)
    syntax = subprocess.run(["bash", "-n", str(tmp_path / "sbatch.sh")], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_nemo_dcd_train_subcommand_is_the_same_command(tmp_path):
    """`nemo dcd train` (the nemo_run.cli entry point in pyproject.toml) gives the same dry run."""
    env = dict(os.environ, NEMORUN_HOME=str(tmp_path / "nemo_run_home"))
    proc = subprocess.run([str(BIN / "nemo"), "dcd", "train", "--factory", "qwen25_1p5b_h100_bf16",
                           "run.executor=slurm_h100", "run.executor.nodes=8", "--dryrun"], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"):
        assert line in proc.stdout.splitlines(), proc.stdout[-3000:]


def test_docker_dryrun_prints_the_container_spec(tmp_path):
    proc = run_recipe(
        tmp_path, "--factory", "tiny_gpu_bf16", "run.executor=docker",
        "run.executor.container_image=registry.example.com/dcd-megatron:test", "run.executor.ntasks_per_node=2",
        "run.executor.volumes=['/data:/data','/tmp/runs:/workspace/runs']", "--dryrun",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import yaml

    out = proc.stdout
    spec = yaml.safe_load(out[out.index("_target_"):] if out.lstrip().startswith("_target_") else out[out.index("\n_target_") + 1:])
    executor = spec["executor"]
    assert executor["container_image"] == "registry.example.com/dcd-megatron:test"
    assert executor["num_gpus"] == -1  # docker's DeviceRequest(count=-1): --gpus all
    assert executor["ipc_mode"] == "host"
    assert executor["volumes"] == ["/data:/data", "/tmp/runs:/workspace/runs"]
    command = " ".join(spec["containers"][0]["command"])
    assert command.startswith("torchrun ") and "--nproc-per-node 2" in command, command
    assert "-m nemo_run.core.runners.fdl_runner" in command, command


def test_to_yaml_exports_the_resolved_task(tmp_path):
    proc = run_recipe(tmp_path, "--factory", "tiny_cpu", "train.steps=3", "loss.method=tis", "--to-yaml", "task.yaml")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import yaml

    task = yaml.safe_load((tmp_path / "task.yaml").read_text())
    assert task["train"]["steps"] == 3 and task["loss"]["method"] == "tis", task
    assert not (tmp_path / "nemo_run_home" / "experiments").exists()


# --- end to end: LocalExecutor + torchrun, 2 ranks ----------------------------------------------


@pytest.mark.slow
@pytest.mark.megatron
@pytest.mark.timeout(900)
def test_tiny_recipe_trains_through_nemo_run_local_executor_with_torchrun(tmp_path):
    out = tmp_path / "run"
    steps = 4
    env = {"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    proc = run_recipe(tmp_path, "--factory", "tiny_cpu", "run.executor=local", "run.executor.ntasks_per_node=2",
                      f"train.output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", *FAST,
                      f"train.steps={steps}", f"train.save_interval={steps}", "-y", timeout=840, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "train: SUCCEEDED" in log, log[-3000:]
    assert "dp=2" in log, log[-3000:]  # two torchrun ranks, data parallel
    assert "UserWarning: Apex is not installed" not in log and "plain-torch fallbacks" in log, log[-3000:]
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, steps + 1)), records
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in records), records
    ckpt = out / "checkpoints"
    assert find_latest(ckpt) == checkpoint_dir(ckpt, steps), sorted(ckpt.glob("*"))
    assert json.loads((out / "final_metrics.json").read_text())["step"] == steps
    assert (tmp_path / "nemo_run_home" / "experiments" / "train").is_dir()  # NeMo-Run's record, not ~


# --- scripts/gpu_smoke.sh --------------------------------------------------------------------


def test_gpu_smoke_script_passes_bash_n_and_shellcheck():
    assert os.access(SMOKE, os.X_OK)
    assert subprocess.run(["bash", "-n", str(SMOKE)], capture_output=True).returncode == 0
    shellcheck = Path(sys.executable).parent / "shellcheck"
    if not shellcheck.exists():
        pytest.fail(f"shellcheck is missing from {shellcheck.parent}: install the dev extra")
    proc = subprocess.run([str(shellcheck), str(SMOKE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_smoke_without_a_gpu_says_so_and_exits_2(tmp_path):
    env = dict(os.environ, DCD_PYTHON=sys.executable, DCD_SMOKE_OUT=str(tmp_path / "smoke"), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(SMOKE)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no GPU visible" in proc.stdout and "nothing was run" in proc.stdout, proc.stdout


@pytest.mark.slow
@pytest.mark.megatron
@pytest.mark.timeout(660)
def test_gpu_smoke_cpu_mode_reports_loss_and_tokens_per_s(tmp_path):
    out = tmp_path / "smoke"
    # A generous per-run limit: the 210 s default is for a GPU, not a loaded 2-core CI machine.
    env = dict(os.environ, DCD_PYTHON=sys.executable, DCD_SMOKE_OUT=str(out), DCD_SMOKE_CPU="1",
               DCD_SMOKE_TIMEOUT="540", OMP_NUM_THREADS="1")
    overrides = [f"data.cache_dir={tmp_path / 'cache'}", "tracking.enabled=false"]  # the script's parsing is under test
    proc = subprocess.run(["bash", str(SMOKE), *overrides], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = metrics(out / "cpu")
    assert [r["step"] for r in records] == [1, 2], records
    # The summary's numbers are the metrics file's: last loss, median tokens/s of steps 1-2
    import statistics

    last = f"-> {records[-1]['loss']:.4f} (step 2)"
    tps = f"{statistics.median(r['tokens_per_s'] for r in records):,.0f} tokens/s"
    summary = proc.stdout[proc.stdout.index("summary"):]
    assert last in summary and tps in summary, proc.stdout
    assert "bf16: skipped (DCD_SMOKE_CPU=1)" in summary and "fp8: skipped" in summary, summary
    assert "decode: KV decoder vs megatron (local spec, torch.float32, cpu)" in summary, summary
    assert "KV cache used" in summary, summary
