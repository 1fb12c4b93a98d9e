"""The NeMo-Run layer (`dcd_recipes/`, `dcd_megatron/launch/`): recipes as NeMo-Run factories, the
command line's errors, the Slurm and Docker dry runs (NeMo-Run's own generated sbatch script and
container spec), the tiny recipe trained end to end through NeMo-Run's LocalExecutor with
torchrun and 2 ranks, and scripts/gpu_smoke.sh (syntax, shellcheck, and its CPU mode)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcd_megatron.recipes import RECIPES
from dcd_megatron.train.checkpoint import checkpoint_dir, find_latest
from tests.train_helpers import FAST, metrics

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "scripts" / "gpu_smoke.sh"


@pytest.fixture
def nemorun_home(tmp_path, monkeypatch):
    """NeMo-Run's home (experiment records) in tmp_path for the test, restored afterwards.

    stdin is /dev/null: NeMo-Run runs `mkdir` through invoke, which reads stdin, and pytest's
    captured stdin refuses to be read."""
    from nemo_run import config as nr_config

    old = nr_config.get_nemorun_home()
    nr_config.set_nemorun_home(str(tmp_path / "nemo_run_home"))
    with open(os.devnull) as devnull:
        monkeypatch.setattr(sys, "stdin", devnull)
        yield tmp_path / "nemo_run_home"
    nr_config.set_nemorun_home(old)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from dcd_megatron.launch.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# --- recipes ---------------------------------------------------------------------------------


def test_every_recipe_is_a_nemo_run_factory_that_builds_the_same_config():
    import fiddle as fdl
    import nemo_run as run

    from dcd_megatron.launch import nemo
    from dcd_megatron.train.config import TrainConfig

    for name, fn in RECIPES.items():
        factory = nemo.RECIPE_FACTORIES[name]
        assert run.cli.resolve_factory(TrainConfig, name) is factory, name  # registered for TrainConfig
        cfg = factory()
        assert isinstance(cfg, run.Config) and isinstance(cfg.train, run.Config), name
        assert fdl.build(cfg) == fn(), name
    # FP8 is set after construction by the recipe; the NeMo-Run config keeps it
    assert nemo.tiny_gpu_fp8().model.fp8 == "hybrid"
    import dcd_recipes  # the documented entry point re-exports them (lazily)

    assert dcd_recipes.tiny_cpu is nemo.tiny_cpu and dcd_recipes.launch is nemo.launch
    with pytest.raises(AttributeError):
        dcd_recipes.no_such_thing  # noqa: B018


def test_recipe_overrides_and_serialization_round_trip():
    import fiddle as fdl
    import nemo_run as run
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    from dcd_megatron.launch import nemo

    cfg = nemo.recipe("tiny_cpu", ["train.steps=7", "tp=1", "loss.method=tis"])
    assert (cfg.train.steps, cfg.loss.method) == (7, "tis")
    # What NeMo-Run ships to every rank, deserialized and built as fdl_runner does, for every recipe
    for config in [cfg, *(factory() for factory in nemo.RECIPE_FACTORIES.values())]:
        task = run.Partial(nemo.train, cfg=config)
        rebuilt = fdl.build(ZlibJSONSerializer().deserialize(ZlibJSONSerializer().serialize(task)))
        assert rebuilt.func is nemo.train and rebuilt.keywords["cfg"] == fdl.build(config)


# --- errors ----------------------------------------------------------------------------------


def test_unknown_recipe_executor_and_bad_override_fail_clearly(capsys):
    code, _, err = run_cli(capsys, "no_such_recipe")
    assert code == 2 and "invalid choice: 'no_such_recipe'" in err and "tiny_cpu" in err, err
    code, _, err = run_cli(capsys, "tiny_cpu", "--executor", "kubernetes")
    assert code == 2 and "invalid choice: 'kubernetes'" in err and "slurm" in err, err
    code, _, err = run_cli(capsys, "tiny_cpu", "train.stepz=3", "--dryrun")
    assert code == 2 and "unknown key train.stepz" in err, err
    code, _, err = run_cli(capsys, "tiny_cpu", "train.steps=many", "--dryrun")
    assert code == 2 and "train.steps" in err and "integer" in err, err
    code, _, err = run_cli(capsys, "tiny_cpu", "--executor", "slurm", "--account", "", "--dryrun")
    assert code == 2 and "--account" in err, err
    code, _, err = run_cli(capsys, "tiny_cpu", "--nproc", "0", "--dryrun")
    assert code == 2 and "--nproc must be >= 1" in err, err


# --- dry runs: NeMo-Run's generated text -----------------------------------------------------


def test_slurm_dryrun_prints_the_sbatch_script_with_pyxis_flags(capsys, tmp_path, nemorun_home):
    job_dir = tmp_path / "jobs"
    code, out, err = run_cli(
        capsys, "qwen25_1p5b_h100_bf16", "train.steps=10", "--executor", "slurm", "--account", "acct-dcd",
        "--partition", "batch", "--nodes", "2", "--gpus-per-node", "4", "--time", "01:30:00",
        "--image", "/images/dcd-megatron.sqsh", "--mount", "/data:/data", "--mount", "/results:/results",
        "--job-dir", str(job_dir), "--dryrun",
    )
    assert code == 0, err
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
    assert not (REPO / "nemo_runs").exists()


def test_docker_dryrun_prints_the_container_spec(capsys, nemorun_home):
    code, out, err = run_cli(
        capsys, "tiny_gpu_bf16", "--executor", "docker", "--image", "registry.example.com/dcd-megatron:test",
        "--nproc", "2", "--mount", "/data:/data", "--mount", "/tmp/runs:/workspace/runs", "--dryrun",
    )
    assert code == 0, err
    import yaml

    spec = yaml.safe_load(out[out.index("_target_"):] if out.lstrip().startswith("_target_") else out[out.index("\n_target_") + 1:])
    executor = spec["executor"]
    assert executor["container_image"] == "registry.example.com/dcd-megatron:test"
    assert executor["num_gpus"] == -1  # docker's DeviceRequest(count=-1): --gpus all
    assert executor["ipc_mode"] == "host"
    assert executor["volumes"] == ["/data:/data", "/tmp/runs:/workspace/runs"]
    command = " ".join(spec["containers"][0]["command"])
    assert command.startswith("torchrun ") and "--nproc-per-node 2" in command, command
    assert "-m nemo_run.core.runners.fdl_runner" in command, command


def test_local_dryrun_prints_the_torchrun_command(capsys, nemorun_home):
    code, out, err = run_cli(capsys, "tiny_cpu", "--nproc", "2", "--dryrun")
    assert code == 0, err
    assert "torchrun" in out and "--nproc-per-node" in out and "nemo_run.core.runners.fdl_runner" in out, out


# --- end to end: LocalExecutor + torchrun, 2 ranks -------------------------------------------


@pytest.mark.slow
@pytest.mark.megatron
@pytest.mark.timeout(900)
def test_tiny_recipe_trains_through_nemo_run_local_executor_with_torchrun(tmp_path):
    out = tmp_path / "run"
    steps = 4
    env = dict(os.environ, NEMORUN_HOME=str(tmp_path / "nemo_run_home"), OMP_NUM_THREADS="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "dcd_recipes.run", "tiny_cpu", "--executor", "local", "--nproc", "2",
           f"train.output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", *FAST,
           f"train.steps={steps}", f"train.save_interval={steps}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=840)
    log = proc.stdout
    assert proc.returncode == 0, log[-6000:]
    assert "tiny_cpu on local: SUCCEEDED" in log, log[-3000:]
    assert "dp=2" in log, log[-3000:]  # two torchrun ranks, data parallel
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, steps + 1)), records
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in records), records
    ckpt = out / "checkpoints"
    assert find_latest(ckpt) == checkpoint_dir(ckpt, steps), sorted(ckpt.glob("*"))
    assert json.loads((out / "final_metrics.json").read_text())["step"] == steps
    assert (tmp_path / "nemo_run_home" / "experiments" / "tiny_cpu").is_dir()  # NeMo-Run's record, not ~


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
