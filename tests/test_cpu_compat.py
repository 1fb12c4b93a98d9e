"""Each CPU patch for megatron-core is still needed (its probe fails without it) and still works."""

import pytest

from dcd_megatron.runtime import cpu_compat
from tests.dist import run_ranks

pytestmark = pytest.mark.megatron


def _check_each_patch(rank, world_size):
    """Probe the patches that need this many ranks (as pipeline stages), without and with each."""
    from megatron.core import parallel_state

    from dcd_megatron.runtime import cpu_compat

    parallel_state.initialize_model_parallel(1, world_size)
    mine = [p for p in cpu_compat.PATCHES if p.probe_ranks == world_size]
    report = {"probed": [p.name for p in mine]}
    for patch in mine:
        others = tuple(p.name for p in cpu_compat.PATCHES if p is not patch)
        cpu_compat.apply(only=others)
        try:
            patch.probe()
            works_without = True
        except Exception as exc:  # the failure we expect when the patch is needed
            works_without = False
            report.setdefault("errors", {})[patch.name] = repr(exc)[:200]
        cpu_compat.remove()
        report[patch.name] = {"applies": patch.applies(), "works_without": works_without}
    installed = cpu_compat.apply()
    failures = {}
    for patch in mine:
        try:
            patch.probe()
        except Exception as exc:
            failures[patch.name] = repr(exc)
    report["installed"] = installed
    report["failures_with_patches"] = failures
    return report


# A probe's failure without its patch must be the same on every rank (else the other ranks wait
# in a collective forever), so probes needing several ranks are run apart from the others.
@pytest.mark.parametrize("ranks", sorted({p.probe_ranks for p in cpu_compat.PATCHES}))
def test_every_patch_is_needed_and_works(ranks):
    reports = run_ranks(_check_each_patch, ranks, patch=False)
    report = reports[0]
    assert all(r == report for r in reports[1:]), reports  # every rank saw the same
    expected = [p.name for p in cpu_compat.PATCHES if p.probe_ranks == ranks]
    assert report["probed"] == expected and expected
    assert report["failures_with_patches"] == {}, report
    for patch in cpu_compat.PATCHES:
        if patch.probe_ranks != ranks:
            continue
        entry = report[patch.name]
        if entry["applies"]:
            assert not entry["works_without"], (
                f"patch {patch.name!r} is no longer needed by this megatron-core: remove it"
            )
            assert patch.name in report["installed"]
        else:
            assert entry["works_without"], (
                f"patch {patch.name!r} is gated off for this megatron-core but its probe fails "
                f"without it: widen its `applies` gate ({report.get('errors', {}).get(patch.name)})"
            )
            assert patch.name not in report["installed"]


def _apply_twice_then_remove(rank, world_size):
    import torch

    from dcd_megatron.runtime import cpu_compat

    original = torch.cuda.current_device
    first = cpu_compat.apply()
    try:
        again = cpu_compat.apply()
        device = torch.cuda.current_device()
    finally:
        cpu_compat.remove()
    return {
        "first": first,
        "again": again,
        "device": str(device),
        "restored": torch.cuda.current_device is original,
        "applied_after": sorted(cpu_compat.applied()),
    }


def test_apply_is_idempotent_and_reversible():
    # A fresh process: an earlier in-process test may already have patched this one.
    (result,) = run_ranks(_apply_twice_then_remove, 1, patch=False)
    assert "current_device" in result["first"]
    assert result["again"] == []  # already installed
    assert result["device"] == "cpu"
    assert result["restored"]
    assert result["applied_after"] == []
