"""Re-initialising megatron-core's parallel state in one process (the drift lab's workers train
again and again) must not leak process groups or their gloo threads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.megatron

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, os, torch
from torch.distributed import distributed_c10d as c10d
from dcd_megatron.runtime.distributed import ensure_single_process_group
from dcd_megatron.runtime.distributed import init_model_parallel
from dcd_megatron.runtime.layout import Layout
ensure_single_process_group(torch.device("cpu"))
counts = []
for i in range(5):
    init_model_parallel(Layout(1, 1, 1, 1), seed=i)
    counts.append([len(os.listdir("/proc/self/task")), len(c10d._world.pg_map)])
print("COUNTS", json.dumps(counts))
"""


def test_repeated_init_model_parallel_keeps_threads_and_groups_flat():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.split("COUNTS", 1)[1])
    threads, groups = zip(*counts)
    assert len(set(groups)) == 1, counts  # before the fix: +17 groups a run
    assert max(threads) - min(threads) <= 2, counts  # before the fix: +51 threads a run
