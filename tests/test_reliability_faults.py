"""Fault injection: a run killed with `kill -9` at random points (one during a save) and resumed
each time ends exactly as an uninterrupted run: the same per-step losses, each step recorded
once in metrics.jsonl, and bit-identical final weights and optimizer state."""

import json
import os
import random
import time

import pytest

from tests.train_helpers import kill_group, losses, metrics, run_train, start_train, wait_for_step

pytestmark = [pytest.mark.megatron, pytest.mark.slow, pytest.mark.later]

STEPS = 12
RUN = [f"train.steps={STEPS}", "train.save_interval=2"]
SEED = int(os.environ.get("DCD_FAULT_SEED", "0")) or random.SystemRandom().randrange(1, 10**6)


def _shard_digests(out) -> dict:
    """sha256 of the model/optimizer shards of the final checkpoint, from its manifest."""
    manifest = json.loads((out / "checkpoints" / f"iter_{STEPS:07d}" / "manifest.json").read_text())
    return {name: rec["sha256"] for name, rec in manifest["files"].items() if name.endswith(".distcp")}


def _kill_during_a_save(out, proc, skip: int, timeout: float = 120) -> str:
    """kill -9 the moment a checkpoint is half written (its .tmp directory exists), letting the
    first ``skip`` saves seen pass (so which save dies varies with the seed)."""
    ckpts = out / "checkpoints"
    seen: set[str] = set()
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        tmp = {p.name for p in ckpts.glob("iter_*.tmp")} if ckpts.is_dir() else set()
        if tmp - seen and len(seen | tmp) > skip:
            kill_group(proc)
            return f"during a save ({sorted(tmp)[-1]})"
        seen |= tmp
        time.sleep(0.002)
    kill_group(proc)
    return f"after the run (no save caught; saw {sorted(seen)})"


def _kill_after(out, proc, rng, step: int | None) -> str:
    """kill -9 after ``step`` plus a random delay; ``None`` (no step left to kill in) lets the run end."""
    if step is None:
        proc.wait(timeout=300)
        return "skipped: no step left before the end, the run finished"
    wait_for_step(out, step, proc)
    time.sleep(rng.uniform(0, 0.3))
    ended = proc.poll() is not None
    kill_group(proc)
    return f"after step {step} + a random delay" + (" (the run had already finished)" if ended else "")


def _kill_step(rng, done: int) -> int | None:
    """A step the next run will reach that is not already in metrics.jsonl (so a stale record of the
    killed run cannot satisfy the wait) and is not the last step (so the kill can land in the run);
    None when no such step is left."""
    left = range(done + 1, STEPS)
    return rng.choice(left) if left else None


def test_kill_9_anywhere_then_resume_ends_exactly_as_an_uninterrupted_run(tmp_path):
    rng = random.Random(SEED)
    straight = tmp_path / "straight"
    ref = run_train(straight, RUN)
    assert ref.returncode == 0, ref.stdout[-3000:]

    out = tmp_path / "killed"
    events = []
    try:
        # the save kill first: it lets 0 or 1 of the six saves ahead of it pass, so a save is
        # caught even when the poller sleeps through some of them
        for plan in ("save", "step", "step"):
            proc = start_train(out, RUN)
            if plan == "save":
                events.append(_kill_during_a_save(out, proc, skip=rng.randrange(2)))
            else:
                events.append(_kill_after(out, proc, rng, _kill_step(rng, max(losses(out), default=0))))
    except AssertionError as exc:
        raise AssertionError(f"seed {SEED} (rerun with DCD_FAULT_SEED={SEED}), kills: {events}: {exc}") from exc
    final = run_train(out, RUN)
    context = f"seed {SEED} (rerun with DCD_FAULT_SEED={SEED}), kills: {events}"
    assert final.returncode == 0, (context, final.stdout[-3000:])
    assert any(e.startswith("during a save") for e in events), context

    steps = [r["step"] for r in metrics(out)]
    assert steps == list(range(1, STEPS + 1)), (context, steps)  # each step once, in order
    a, b = losses(straight), losses(out)
    for step in range(1, STEPS + 1):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (context, step, a[step], b[step])
    assert _shard_digests(out) == _shard_digests(straight), context  # weights and optimizer, bit for bit
    assert json.loads((out / "final_metrics.json").read_text())["status"] == "FINISHED"
    assert not list((out / "checkpoints").glob("iter_*.tmp")), context
