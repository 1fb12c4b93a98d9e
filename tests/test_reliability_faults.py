"""Fault injection: a run killed with `kill -9` at random points (one during a save) and resumed
each time ends exactly as an uninterrupted run: the same per-step losses, each step recorded
once in metrics.jsonl, and bit-identical final weights and optimizer state."""

import json
import os
import random
import time

import pytest

from tests.train_helpers import kill_group, losses, metrics, run_train, start_train, wait_for_step

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

STEPS = 12
RUN = [f"train.steps={STEPS}", "train.save_interval=2"]
SEED = int(os.environ.get("DCD_FAULT_SEED", "0")) or random.SystemRandom().randrange(1, 10**6)


def _shard_digests(out) -> dict:
    """sha256 of the model/optimizer shards of the final checkpoint, from its manifest."""
    manifest = json.loads((out / "checkpoints" / f"iter_{STEPS:07d}" / "manifest.json").read_text())
    return {name: rec["sha256"] for name, rec in manifest["files"].items() if name.endswith(".distcp")}


def _kill_during_a_save(out, proc, timeout: float = 120) -> str:
    """kill -9 the moment a checkpoint is half written (its .tmp directory exists)."""
    ckpts = out / "checkpoints"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any(ckpts.glob("iter_*.tmp")):
            kill_group(proc)
            return "during a save"
        time.sleep(0.002)
    kill_group(proc)
    return "after the run (no save was caught)"


def _kill_after(out, proc, rng, step: int) -> str:
    wait_for_step(out, step, proc)
    time.sleep(rng.uniform(0, 0.3))
    kill_group(proc)
    return f"after step {step} + a random delay"


def test_kill_9_anywhere_then_resume_ends_exactly_as_an_uninterrupted_run(tmp_path):
    rng = random.Random(SEED)
    straight = tmp_path / "straight"
    ref = run_train(straight, RUN)
    assert ref.returncode == 0, ref.stdout[-3000:]

    out = tmp_path / "killed"
    kill_steps = sorted(rng.sample(range(2, STEPS - 1), 2))
    events = []
    for plan in ("step", "save", "step"):
        done = max(losses(out), default=0)
        proc = start_train(out, RUN)
        if plan == "save":
            events.append(_kill_during_a_save(out, proc))
        else:
            events.append(_kill_after(out, proc, rng, max(kill_steps.pop(0), done + 1)))
    final = run_train(out, RUN)
    context = f"seed {SEED} (rerun with DCD_FAULT_SEED={SEED}), kills: {events}"
    assert final.returncode == 0, (context, final.stdout[-3000:])
    assert "during a save" in events, context

    steps = [r["step"] for r in metrics(out)]
    assert steps == list(range(1, STEPS + 1)), (context, steps)  # each step once, in order
    a, b = losses(straight), losses(out)
    for step in range(1, STEPS + 1):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (context, step, a[step], b[step])
    assert _shard_digests(out) == _shard_digests(straight), context  # weights and optimizer, bit for bit
    assert json.loads((out / "final_metrics.json").read_text())["status"] == "FINISHED"
    assert not list((out / "checkpoints").glob("iter_*.tmp")), context
