"""Shared test setup: thread limits, and no rendezvous address leaking between tests."""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_RENDEZVOUS_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
for _key in _RENDEZVOUS_KEYS:  # a developer's shell may have them; subprocess launches must not
    os.environ.pop(_key, None)


@pytest.fixture(autouse=True)
def _no_rendezvous_env_leak():
    """Fail a test that leaves MASTER_PORT & co. in os.environ (later launches would collide)."""
    yield
    leaked = {k: os.environ.pop(k) for k in _RENDEZVOUS_KEYS if k in os.environ}
    assert not leaked, f"this test left rendezvous variables in os.environ: {leaked}"
