"""Run `dcd-train` as users do (a subprocess, or torchrun), on the bundled demo data, in a temp dir."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from dcd_megatron.tracking.record import read_record
from tests.dist import free_port

# Small and quick: the tiny recipe, 64-token samples, 8 samples a step, plots off.
FAST = [
    "data.seq_length=64",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.log_interval=2",
    "train.eval_interval=0",
    "optim.warmup_steps=2",
    "tracking.plot_interval=0",
]


def train_command(out: Path, overrides: list[str], nproc: int = 1) -> list[str]:
    args = ["--recipe", "tiny_cpu", f"train.output_dir={out}", f"data.cache_dir={out.parent / 'cache'}", *FAST, *overrides]
    if nproc == 1:
        return [sys.executable, "-m", "dcd_megatron.cli.train", *args]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "dcd_megatron.cli.train", *args,
    ]


def train_env(tmp: Path, tracking_uri: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["MLFLOW_TRACKING_URI"] = tracking_uri or f"sqlite:///{tmp / 'mlflow.db'}"
    return env


def run_train(out: Path, overrides: list[str], nproc: int = 1, timeout: float = 600, env=None):
    """Run to completion; return the CompletedProcess (stdout+stderr in .stdout)."""
    proc = subprocess.run(
        train_command(out, overrides, nproc), env=env or train_env(out.parent), timeout=timeout,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    return proc


def start_train(out: Path, overrides: list[str], env=None) -> subprocess.Popen:
    """Start in its own process group (so a test can kill -9 the whole run)."""
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(
        train_command(out, overrides), env=env or train_env(out.parent), stdout=log,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def metrics(out: Path) -> list[dict]:
    """Training-step records of metrics.jsonl (validation records have no 'loss'); a line torn by a
    kill, or still being written, is skipped as the trainer itself skips it."""
    return [r for r in read_record(out / "metrics.jsonl") if "loss" in r]


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        recs = metrics(out)
        if recs and recs[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited with {proc.returncode} before step {step}")
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s")


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out)}


def torchrun_exit_codes(stdout: str) -> list[str]:
    """Each failed rank's exit code in torchrun's failure summary. A rank still on its way out when
    torchrun sees the first failure is stopped by torchrun's own SIGTERM (-15), on a loaded machine."""
    return re.findall(r"^\s+exitcode\s+:\s+(-?\d+)", stdout, re.M)  # the summary's lines, not its log lines


def ranks_exited_2(stdout: str, nproc: int) -> bool:
    """Every rank failed, the first with exit code 2, the others with 2 or torchrun's SIGTERM."""
    codes = torchrun_exit_codes(stdout)
    return len(codes) == nproc and "2" in codes and set(codes) <= {"2", "-15"}
