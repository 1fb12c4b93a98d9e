"""Checkpoint saves use an in-process results queue: no multiprocessing Manager is started.

megatron-core's default starts a spawned Manager process at the first save (about 4 s while it
imports torch) that also delays exit; dcd-train saves synchronously and does not need it.
"""

import multiprocessing
import queue

import pytest
import torch

pytestmark = pytest.mark.megatron


def test_a_save_starts_no_manager_process_and_round_trips(tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from dcd_megatron.convert.model_io import single_process_group
    from dcd_megatron.checkpoint import use_in_process_write_results

    single_process_group(torch.device("cpu"))
    before = set(multiprocessing.active_children())
    saved = filesystem_async._results_queue
    filesystem_async._results_queue = None  # as a fresh process has it
    try:
        assert use_in_process_write_results()
        getter = getattr(filesystem_async, "get_write_results_queue", None) or filesystem_async._get_write_results_queue
        assert isinstance(getter(), queue.Queue)
        tensor = torch.arange(6.0)
        dist_checkpointing.save({"t": ShardedTensor.from_rank_offsets("t", tensor)}, str(tmp_path))
        loaded = dist_checkpointing.load({"t": ShardedTensor.from_rank_offsets("t", torch.empty(6))}, str(tmp_path))
        assert torch.equal(loaded["t"], tensor)
        assert set(multiprocessing.active_children()) <= before  # no Manager left running
        assert use_in_process_write_results()  # idempotent
    finally:
        filesystem_async._results_queue = saved
