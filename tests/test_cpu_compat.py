"""Each CPU patch for megatron-core is still needed (its probe fails without it) and still works."""

import pytest

from tests.dist import run_ranks

pytestmark = pytest.mark.megatron


def _check_each_patch(rank, world_size):
    from megatron.core import parallel_state

    from dcd_megatron.runtime import cpu_compat

    parallel_state.initialize_model_parallel(1, 1)
    report = {}
    for patch in cpu_compat.PATCHES:
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
    for patch in cpu_compat.PATCHES:
        try:
            patch.probe()
        except Exception as exc:
            failures[patch.name] = repr(exc)
    report["installed"] = installed
    report["failures_with_patches"] = failures
    return report


def test_every_patch_is_needed_and_works():
    from dcd_megatron.runtime import cpu_compat

    (report,) = run_ranks(_check_each_patch, 1, patch=False)
    assert report["failures_with_patches"] == {}, report
    for patch in cpu_compat.PATCHES:
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


def test_apply_is_idempotent_and_reversible():
    import torch

    from dcd_megatron.runtime import cpu_compat

    original = torch.cuda.current_device
    first = cpu_compat.apply()
    try:
        assert cpu_compat.apply() == []  # already installed
        assert "current_device" in first
        assert torch.cuda.current_device() == torch.device("cpu")
    finally:
        cpu_compat.remove()
    assert torch.cuda.current_device is original
    assert cpu_compat.applied() == frozenset()
