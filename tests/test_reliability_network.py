"""Issue 24, item 3: no network unless asked.

A short `dcd-train` on local data runs with every name lookup and connection to a non-loopback
address refused and recorded: it must pass and have tried none (before, `datasets` looked up
s3.amazonaws.com on every load of a local JSON file, to count downloads).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from dcd_megatron.data.loading import OFFLINE_ENV, hub_offline
from tests.train_helpers import train_command, train_env

GUARD = """
    import ipaddress, socket, sys

    log_path = sys.argv.pop(1)
    LOCAL_NAMES = {"localhost", socket.gethostname(), ""}

    def _local(host) -> bool:
        host = host.decode() if isinstance(host, bytes) else str(host)
        if host in LOCAL_NAMES:
            return True
        try:
            return ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            return False

    def _refuse(what):
        with open(log_path, "a") as log:
            log.write(f"{what}\\n")
        raise OSError(f"no network in this test: {what}")

    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _local(host):
            _refuse(f"lookup {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _refuse(f"connect {address}")
        return real_connect(self, address)

    socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
    from dcd_megatron.cli.train import main
    sys.argv[0] = "dcd-train"
    sys.exit(main())
"""


def test_a_training_on_local_data_makes_no_network_call(tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "network.log"
    command = train_command(out, ["train.steps=2", "train.save_interval=0"])
    assert command[1:3] == ["-m", "dcd_megatron.cli.train"]
    env = {k: v for k, v in train_env(tmp_path).items() if k not in OFFLINE_ENV}  # not set by the user
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(GUARD), str(log), *command[3:]], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (out / "final_metrics.json").is_file()
    assert not log.exists(), log.read_text()


def test_the_offline_switches_hold_for_local_data_only_and_are_restored(monkeypatch):
    import datasets
    from huggingface_hub import constants

    for name in OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    with hub_offline(True):
        assert datasets.config.HF_HUB_OFFLINE and constants.HF_HUB_OFFLINE
        assert all(os.environ[name] == "1" for name in OFFLINE_ENV)
    assert not datasets.config.HF_HUB_OFFLINE and not any(name in os.environ for name in OFFLINE_ENV)
    with hub_offline(False):  # a Hub dataset the user named: fetched as asked
        assert not datasets.config.HF_HUB_OFFLINE and not constants.HF_HUB_OFFLINE
    assert datasets.config.HF_UPDATE_DOWNLOAD_COUNTS is False  # the download-count ping stays off
