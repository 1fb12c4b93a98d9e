"""`slurm/dcd_8node.sh`, unchanged, on a real one-node CPU Slurm cluster: two ranks train a few
steps of the tiny recipe and checkpoint; a second submission of the same job name resumes
after the first one's last step and, sent SIGUSR1 as Slurm does before a time limit, saves a
checkpoint and ends cleanly."""

import json
import sys
import time
from pathlib import Path

import pytest

from dcd_megatron.checkpoint import checkpoint_dir, find_latest
from dcd_megatron.tracking.record import read_record
from tests.slurm_cluster import slurm_cluster  # noqa: F401 - the fixture

# Not rerun by `make test-latest`: on megatron-core 0.19.2 / torch 2.14.1 one run of the second job
# (at load average 20-70, beside a full `make test`) never saw the SIGUSR1 that `scancel --signal`
# sent and trained to the end. It has not happened again: 4 of 4 runs on that stack passed on
# 2026-11-28 (one at load 2, three beside CPU hogs at load ~5), and SIGUSR1 sent by hand to a
# torchrun job on it stops it cleanly. Suspected: Slurm's signal RPC timing out under extreme load
# (scancel returns 0 once slurmctld accepts it). The launch script does not depend on the
# megatron version; `make test` (0.16) runs this test.
pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "dcd_8node.sh"
# The command-line overrides that turn the 8-node GPU header into a 2-rank CPU job (docs/launch.md).
CPU_SBATCH_ARGS = ("--nodes=1", "--ntasks-per-node=2", "--gres=none", "--time=00:20:00")
JOB_NAME = "dcd-e2e"
# The tiny recipe made quick: 64-token samples, 8 a step (2 micro-batches of 2 per rank), no plots.
TRAIN_ARGS = ("--recipe", "tiny_cpu", "runtime.device=cpu", "data.seq_length=64", "train.global_batch_size=8",
              "train.micro_batch_size=2", "optim.warmup_steps=2", "train.eval_interval=0", "train.save_interval=3",
              "tracking.plot_interval=0")
FIRST_STEPS = 6
SECOND_STEPS = 2000  # far more than it will run: SIGUSR1 stops it


def read_metrics(path: Path) -> list[dict]:
    """The training-step records of metrics.jsonl (validation records carry no `loss`); a line still
    being written is skipped, as the trainer skips it."""
    return [r for r in read_record(path) if "loss" in r]


def submit(cluster, workdir: Path, steps: int, *extra: str) -> int:
    return cluster.submit(
        SCRIPT,
        [*TRAIN_ARGS, f"data.cache_dir={workdir / 'cache'}", f"train.steps={steps}", *extra],
        env={"DCD_NO_CONTAINER": "1", "DCD_PYTHON": sys.executable,
             "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"},
        sbatch_args=[*CPU_SBATCH_ARGS, f"--job-name={JOB_NAME}", f"--output={workdir}/%x-%j.out"],
        cwd=workdir,  # the submit dir: the default output dir is <submit dir>/runs/<job name>
    )


def wait_completed(cluster, job: int) -> str:
    state = cluster.wait(job, timeout=900)  # generous: a loaded machine is slow, not broken
    log = cluster.job_output(job)
    assert state == "COMPLETED", f"job {job} ended {state}:\n{log[-6000:]}"
    return log


@pytest.mark.timeout(1800)  # two jobs of two ranks each; minutes on a loaded 2-core machine
def test_cpu_submission_trains_checkpoints_resumes_and_stops_on_usr1(slurm_cluster, tmp_path):  # noqa: F811
    out_dir = tmp_path / "runs" / JOB_NAME
    metrics_path = out_dir / "metrics.jsonl"

    log = wait_completed(slurm_cluster, submit(slurm_cluster, tmp_path, FIRST_STEPS))
    assert "2 task(s)" in log and "container=none" in log, log[-3000:]
    first = read_metrics(metrics_path)
    assert [r["step"] for r in first] == list(range(1, FIRST_STEPS + 1)), first
    assert first[-1]["loss"] < first[0]["loss"], f"loss did not decrease: {first}"
    ckpt_dir = out_dir / "checkpoints"
    assert find_latest(ckpt_dir) == checkpoint_dir(ckpt_dir, FIRST_STEPS), sorted(ckpt_dir.glob("*"))
    assert json.loads((out_dir / "final_metrics.json").read_text())["step"] == FIRST_STEPS

    # a longer schedule than the checkpoint's is a change a resume must be told about
    job = submit(slurm_cluster, tmp_path, SECOND_STEPS, "train.resume_changes=[schedule]")
    deadline = time.monotonic() + 900
    while len(read_metrics(metrics_path)) < FIRST_STEPS + 2:  # the resumed run is training
        assert slurm_cluster.job_info(job)["JobState"] in ("PENDING", "RUNNING"), slurm_cluster.job_output(job)
        assert time.monotonic() < deadline, slurm_cluster.job_output(job)[-6000:]
        time.sleep(0.5)
    slurm_cluster.signal_job(job, "USR1")  # what `#SBATCH --signal=USR1@300` sends before the limit
    log = wait_completed(slurm_cluster, job)

    second = read_metrics(metrics_path)[len(first):]
    assert second[0]["step"] == FIRST_STEPS + 1, f"second run did not resume after step {FIRST_STEPS}: {second}"
    final = json.loads((out_dir / "final_metrics.json").read_text())
    assert final["step"] == second[-1]["step"] < SECOND_STEPS, final
    assert f"stopping after step {final['step']} (a stop signal)" in log, log[-3000:]
    assert find_latest(ckpt_dir) == checkpoint_dir(ckpt_dir, final["step"]), sorted(ckpt_dir.glob("*"))


def test_container_mode_without_pyxis_stops_with_a_clear_error(slurm_cluster, tmp_path):  # noqa: F811
    job = slurm_cluster.submit(
        SCRIPT, ["--recipe", "tiny_cpu"], env={"DCD_NO_CONTAINER": "0"},
        sbatch_args=[*CPU_SBATCH_ARGS, "--job-name=dcd-nopyxis", f"--output={tmp_path}/%x-%j.out"], cwd=tmp_path,
    )
    assert slurm_cluster.wait(job, timeout=120) == "FAILED"
    log = slurm_cluster.job_output(job)
    assert "no pyxis" in log and "DCD_NO_CONTAINER=1" in log, log
    assert not (tmp_path / "runs" / "dcd-nopyxis" / "metrics.jsonl").exists()
