"""Issue 13, item 1 (and item 9's `train.output_dir` that is a file): one run per output directory.

Unit tests of `dcd_megatron/runtime/output_lock.py` (no torch), then the real commands: a second
`dcd-train` on a running run's directory stops at once while the first finishes intact, a
`kill -9`'d run resumes (its stale lock taken over), and under torchrun a bad directory stops
every rank with one line instead of leaving the others waiting.
"""

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from dcd_megatron.runtime import output_lock as ol
from tests.train_helpers import (
    kill_group,
    metrics,
    ranks_exited_2,
    run_train,
    start_train,
    train_command,
    train_env,
    wait_for_step,
)


@pytest.fixture
def live_pid():
    """A process of this host that stays alive for the test."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _plant(directory, **fields) -> dict:
    """A lock file as another run would have left it (our own record, with `fields` changed)."""
    directory.mkdir(parents=True, exist_ok=True)
    record = dict(ol.owner_record("dcd-train --recipe other"), token="theirs", **fields)
    (directory / ol.LOCK_NAME).write_text(json.dumps(record))
    return record


def _within(seconds: float, condition) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass (a loaded machine delays the heartbeat)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _age(directory, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(directory / ol.LOCK_NAME, (past, past))


def test_take_records_the_holder_and_release_removes_it(tmp_path):
    out = tmp_path / "run" / "nested"  # made, parents too
    lock = ol.acquire(out, command="dcd-train --recipe tiny_cpu")
    record = json.loads((out / ol.LOCK_NAME).read_text())
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    assert record["command"] == "dcd-train --recipe tiny_cpu" and record["started_at"]
    assert "slurm_job_id" in record
    assert lock.release() is True
    assert not (out / ol.LOCK_NAME).exists()
    assert lock.release() is False  # twice is harmless
    ol.acquire(out).release()  # free again


def test_a_live_holder_is_named_with_the_fix(tmp_path, live_pid):
    out = tmp_path / "run"
    _plant(out, pid=live_pid, pid_start=(ol._proc_stat(live_pid) or (None, None))[1], slurm_job_id="4242")
    with pytest.raises(ol.OutputDirBusyError) as err:
        ol.acquire(out)
    message = str(err.value)
    assert "\n" not in message
    for part in (f"train.output_dir={out}", f"host {socket.gethostname()}", f"pid {live_pid}", "Slurm job 4242",
                 "dcd-train --recipe other", "wait for it", "another train.output_dir", f"delete {out / ol.LOCK_NAME}"):
        assert part in message, (part, message)
    assert json.loads((out / ol.LOCK_NAME).read_text())["token"] == "theirs"  # untouched


def test_a_second_take_in_the_same_process_is_refused(tmp_path):
    with ol.acquire(tmp_path / "run"):
        with pytest.raises(ol.OutputDirBusyError, match="this same process"):
            ol.acquire(tmp_path / "run")


def test_a_dead_pid_on_this_host_is_taken_over_with_a_line(tmp_path):
    out = tmp_path / "run"
    dead = _dead_pid()
    _plant(out, pid=dead)
    lines = []
    lock = ol.acquire(out, log=lambda line, **kw: lines.append(line))
    assert json.loads((out / ol.LOCK_NAME).read_text())["token"] == lock.token
    assert len(lines) == 1 and "took over the stale lock" in lines[0] and f"process {dead} is gone" in lines[0]
    lock.release()
    assert not list(out.iterdir())  # nothing set aside is left behind


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc for process start times")
def test_a_reused_pid_is_stale(tmp_path, live_pid):
    _plant(tmp_path, pid=live_pid, pid_start="1")  # alive, but not the process that took the lock
    lines = []
    ol.acquire(tmp_path, log=lambda line, **kw: lines.append(line)).release()
    assert "another process" in lines[0]


def test_another_hosts_lock_is_kept_until_its_heartbeat_is_old(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _plant(out, host="node-17", pid=1234)
    _age(out, 9 * 60)  # refreshed 9 minutes ago: its holder may be alive
    with pytest.raises(ol.OutputDirBusyError, match="host node-17, pid 1234"):
        ol.acquire(out)
    _age(out, 11 * 60)
    monkeypatch.setenv(ol.STALE_ENV, "0")  # never by age
    with pytest.raises(ol.OutputDirBusyError):
        ol.acquire(out)
    monkeypatch.delenv(ol.STALE_ENV)
    lines = []
    ol.acquire(out, log=lambda line, **kw: lines.append(line)).release()
    assert "stopped refreshing it 11 min ago" in lines[0]
    monkeypatch.setenv(ol.STALE_ENV, "soon")
    with pytest.raises(ol.OutputDirError, match=f"{ol.STALE_ENV}='soon'"):
        ol.acquire(out)


def _fake_squeue(tmp_path, monkeypatch, state: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "squeue"
    script.write_text(f"#!/bin/sh\necho {state}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "c1")


def test_another_hosts_lock_goes_when_slurm_says_its_job_is_over(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _fake_squeue(tmp_path, monkeypatch, "RUNNING")
    _plant(out, host="node-17", slurm_job_id="77", slurm_cluster="c1")
    with pytest.raises(ol.OutputDirBusyError, match="Slurm job 77"):
        ol.acquire(out)
    _fake_squeue(tmp_path, monkeypatch, "COMPLETED")
    lines = []
    ol.acquire(out, log=lambda line, **kw: lines.append(line)).release()
    assert "Slurm job 77 has finished" in lines[0]
    _plant(out, host="node-17", slurm_job_id="77", slurm_cluster="c2")  # another cluster: squeue cannot tell
    with pytest.raises(ol.OutputDirBusyError):
        ol.acquire(out)


def test_a_requeued_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    _plant(tmp_path, host="node-17", slurm_job_id="88", slurm_restart_count="0")
    monkeypatch.setenv("SLURM_JOB_ID", "88")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lines = []
    ol.acquire(tmp_path, log=lambda line, **kw: lines.append(line)).release()
    assert "requeued" in lines[0]


def test_an_unreadable_lock_waits_for_its_writer_then_goes(tmp_path):
    (tmp_path / ol.LOCK_NAME).write_text("")
    with pytest.raises(ol.OutputDirBusyError, match="unreadable"):
        ol.acquire(tmp_path)
    _age(tmp_path, 2 * ol.UNREADABLE_GRACE_S)
    ol.acquire(tmp_path, log=lambda *a, **k: None).release()


def test_release_removes_only_its_own_lock(tmp_path):
    lock = ol.acquire(tmp_path)
    theirs = _plant(tmp_path, host="node-3")  # taken over while we were away
    assert lock.release() is False
    assert json.loads((tmp_path / ol.LOCK_NAME).read_text()) == theirs


def test_released_on_an_exception(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with ol.acquire(tmp_path):
            raise KeyboardInterrupt
    assert not (tmp_path / ol.LOCK_NAME).exists()


def test_the_heartbeat_refreshes_the_lock_and_notices_a_loss(tmp_path, capsys):
    lock = ol.acquire(tmp_path, heartbeat_s=0.05)
    _age(tmp_path, 3600)
    assert _within(30, lambda: time.time() - (tmp_path / ol.LOCK_NAME).stat().st_mtime < 60)  # refreshed
    (tmp_path / ol.LOCK_NAME).unlink()
    assert _within(30, lambda: lock.lost)
    assert "was removed or replaced" in capsys.readouterr().err
    assert lock.release() is False


def test_a_file_is_no_output_dir(tmp_path):
    path = tmp_path / "run.txt"
    path.write_text("not a directory")
    with pytest.raises(ol.OutputDirError, match=f"train.output_dir={path} is a regular file") as err:
        ol.acquire(path)
    assert "\n" not in str(err.value)
    with pytest.raises(ol.OutputDirError, match="a part of the path is a file"):
        ol.acquire(path / "run", setting="--out")


def test_setup_releases_the_lock_when_a_later_step_fails(tmp_path, monkeypatch):
    from dcd_megatron.recipes import RECIPES
    from dcd_megatron.runtime.distributed import ProcessInfo
    from dcd_megatron.train import setup as setup_module

    cfg = RECIPES["tiny_cpu"]()
    cfg.train.output_dir = str(tmp_path / "run")
    monkeypatch.setattr(setup_module, "_start_processes", lambda cfg: (None, ProcessInfo(0, 1, 0, "127.0.0.1", 1)))

    def failing(*args):
        assert (tmp_path / "run" / ol.LOCK_NAME).is_file()  # held while the run is set up
        raise FileNotFoundError("no such tokenizer")

    monkeypatch.setattr(setup_module, "_set_up", failing)
    with pytest.raises(FileNotFoundError):
        setup_module.setup(cfg, "")
    assert not (tmp_path / "run" / ol.LOCK_NAME).exists()


@pytest.mark.parametrize("how, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stop_during_setup_is_one_line_and_frees_the_lock(tmp_path, monkeypatch, capsys, how, code):
    """Issue 24: SIGTERM during setup used to kill the run silently and leave the lock; Ctrl-C, a traceback."""
    import signal as signals

    from dcd_megatron.cli.train import run_config
    from dcd_megatron.recipes import RECIPES
    from dcd_megatron.runtime.distributed import ProcessInfo
    from dcd_megatron.train import setup as setup_module

    cfg = RECIPES["tiny_cpu"]()
    cfg.train.output_dir = str(tmp_path / "run")
    monkeypatch.setattr(setup_module, "_start_processes", lambda cfg: (None, ProcessInfo(0, 1, 0, "127.0.0.1", 1)))

    def stopped(*args):  # e.g. while tokenizing
        assert (tmp_path / "run" / ol.LOCK_NAME).is_file()
        if how == "SIGINT":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signals.SIGTERM)
        time.sleep(30)  # the handler interrupts this at once
        raise AssertionError("SIGTERM did not stop the setup")

    monkeypatch.setattr(setup_module, "_set_up", stopped)
    before = signals.getsignal(signals.SIGTERM)
    assert run_config(cfg) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and f"stopped by {how}" in err, err
    assert not (tmp_path / "run" / ol.LOCK_NAME).exists()
    assert signals.getsignal(signals.SIGTERM) is before  # restored


def test_dcd_score_locks_its_out_dir(tmp_path, monkeypatch, live_pid):
    from dcd_megatron.recipes import RECIPES
    from dcd_megatron.runtime.distributed import ProcessInfo
    from dcd_megatron.score import ScoreConfig, runner

    cfg = ScoreConfig(teacher="t", data_path="d", out_dir=str(tmp_path / "scored"), data=RECIPES["tiny_cpu"]().data)
    monkeypatch.setattr(runner, "_checked_teacher", lambda cfg: None)
    monkeypatch.setattr(runner, "_start_processes", lambda cfg: (None, ProcessInfo(0, 1, 0, "127.0.0.1", 1), None))
    seen = []
    monkeypatch.setattr(runner, "_score_locked", lambda *a, **k: seen.append((tmp_path / "scored" / ol.LOCK_NAME).is_file()))
    runner.score(cfg)
    assert seen == [True] and not (tmp_path / "scored" / ol.LOCK_NAME).exists()  # held while scoring, then freed
    _plant(tmp_path / "scored", pid=live_pid, pid_start=None)
    with pytest.raises(ol.OutputDirBusyError, match=f"--out={tmp_path / 'scored'} is in use"):
        runner.score(cfg)
    assert seen == [True]


# ---- the real commands ----------------------------------------------------------------------


def _lock_holder(out, runs, timeout: float = 300):
    """The run whose pid the lock file names, once one of them has taken it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid = json.loads((out / ol.LOCK_NAME).read_text())["pid"]
        except (OSError, ValueError, KeyError):  # not there yet, or not written to the end yet
            pid = None
        for run in runs:
            if run.pid == pid:
                return run
        assert all(run.poll() is None for run in runs), [run.returncode for run in runs]
        time.sleep(0.01)
    raise AssertionError(f"no run took {out / ol.LOCK_NAME} within {timeout}s")


@pytest.mark.megatron
@pytest.mark.slow
def test_two_runs_started_together_on_one_output_dir(tmp_path):
    """The issue's case: before, both trained and saved over each other (or one died mid-save)."""
    out = tmp_path / "run"
    args = ["train.steps=20", "train.save_interval=5"]
    runs = [subprocess.Popen(train_command(out, args), env=train_env(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True) for _ in range(2)]
    try:
        # Freeze whichever run takes the lock until the other has decided, so a winner that would
        # finish before a slow-starting loser even looks (a loaded machine) cannot turn this into two
        # runs one after the other.
        holder = _lock_holder(out, runs)
        os.killpg(holder.pid, signal.SIGSTOP)
        other = runs[1 - runs.index(holder)]
        other_log = other.communicate(timeout=300)[0]
        os.killpg(holder.pid, signal.SIGCONT)
        logs = [other_log if run is other else run.communicate(timeout=300)[0] for run in runs]
    finally:
        for run in runs:
            kill_group(run)
    codes = [run.returncode for run in runs]
    assert sorted(codes) == [0, 2], logs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    errors = [line for line in logs[loser].splitlines() if "error" in line]
    assert len(errors) == 1 and f"train.output_dir={out} is in use by another run (host " in errors[0], logs[loser]
    assert f"pid {runs[winner].pid}" in errors[0] and "Traceback" not in logs[loser]
    assert "layout tp=" not in logs[loser]  # it stopped before setting anything up
    assert [r["step"] for r in metrics(out)] == list(range(1, 21))  # each step once
    names = {p.name for p in (out / "checkpoints").iterdir()}
    assert "iter_0000020" in names and not [n for n in names if "tmp" in n], names  # no half-written save
    assert not (out / ol.LOCK_NAME).exists()


@pytest.mark.megatron
@pytest.mark.slow
def test_a_killed_run_resumes_over_its_stale_lock(tmp_path):
    out = tmp_path / "run"
    args = ["train.steps=10", "train.save_interval=3"]
    proc = start_train(out, args)
    wait_for_step(out, 4, proc)
    kill_group(proc)  # kill -9: no chance to release
    assert json.loads((out / ol.LOCK_NAME).read_text())["pid"] == proc.pid
    resumed = run_train(out, args, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"took over the stale lock {out / ol.LOCK_NAME}" in resumed.stdout
    assert f"process {proc.pid} is gone" in resumed.stdout and "resumed from" in resumed.stdout
    assert not (out / ol.LOCK_NAME).exists()


@pytest.mark.megatron
@pytest.mark.slow
def test_an_output_dir_that_is_a_file_stops_every_rank_with_one_line(tmp_path):
    out = tmp_path / "run"
    out.write_text("a file")
    proc = run_train(out, ["train.steps=2"], nproc=2, timeout=180)
    assert proc.returncode != 0 and "dcd_megatron/" not in proc.stdout, proc.stdout[-3000:]  # no traceback of ours
    errors = [line for line in proc.stdout.splitlines() if "dcd-train: error" in line]
    assert sorted(e.split(":", 2)[1] for e in errors) == [" error (rank 0)", " error (rank 1)"], proc.stdout[-3000:]
    assert all(f"train.output_dir={out} is a regular file" in e for e in errors)
    # torchrun's summary: the first rank to fail exited 2; the other exited 2 too, or, when it was still on
    # its way out as torchrun saw the first failure, was stopped by torchrun's own SIGTERM (-15: a loaded
    # machine). Both printed the one line above, so neither was left waiting in a collective.
    assert ranks_exited_2(proc.stdout, 2), proc.stdout[-3000:]
    assert out.read_text() == "a file"
