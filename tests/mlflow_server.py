"""A real ``mlflow server`` on loopback for tests: SQLite backend and artifacts in a temp folder.

Use the pytest fixture (``from tests.mlflow_server import mlflow_server`` in a test module,
then take ``mlflow_server`` as an argument) or the context manager ``running_mlflow_server(root)``.
Both yield a ``RunningMlflowServer`` with ``.uri``; ``.stop()`` kills it mid-test to simulate
a dead server and ``.start()`` brings it back on the same port and database. The whole process group is killed on exit, also when the test fails.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcd_megatron.runtime.distributed import free_port

STARTUP_TIMEOUT_S = 300.0  # generous: only a broken server waits this long, and a loaded CI box is slow to start one


def _mlflow_executable() -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]


class RunningMlflowServer:
    """A started server: ``uri`` for clients, ``backend_uri`` to read its database after ``stop()``."""

    def __init__(self, root: Path, port: int):
        self.root = root
        self.port = port
        self.uri = f"http://127.0.0.1:{port}"
        self.backend_uri = f"sqlite:///{root / 'server.db'}"
        self.artifact_root = root / "server-artifacts"
        self.log_path = root / "server.log"
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Launch (or relaunch after ``stop()``, same port and database) and wait until /health answers."""
        if self.is_running():
            return
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PYTHONUNBUFFERED="1")
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = _mlflow_executable() + [
            "server",
            "--workers", "1",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(self.artifact_root),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True
            )
        atexit.register(self.stop)
        try:
            self._wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self, grace_s: float = 10.0) -> None:
        """Kill the server's process group (SIGTERM, then SIGKILL after ``grace_s``); idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # Workers that outlived the leader are still in its group: make sure none is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.is_running():
                code = None if self.process is None else self.process.returncode
                raise RuntimeError(f"mlflow server exited with {code}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"mlflow server not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")


def start_mlflow_server(root: Path, timeout_s: float = STARTUP_TIMEOUT_S) -> RunningMlflowServer:
    """Start ``mlflow server --workers 1`` on a free loopback port with its state under ``root``; wait for /health."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    server = RunningMlflowServer(root, free_port())
    server.start(timeout_s)
    return server


@contextlib.contextmanager
def running_mlflow_server(root: Path, timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[RunningMlflowServer]:
    """Context manager around :func:`start_mlflow_server` that always stops the server."""
    server = start_mlflow_server(root, timeout_s)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[RunningMlflowServer]:
    """A fresh real MLflow server for one test (``.uri``, ``.stop()``, ``.start()``, ``.backend_uri``)."""
    with running_mlflow_server(tmp_path / "mlflow-server") as server:
        yield server


@pytest.fixture(scope="module")
def mlflow_server_module(tmp_path_factory) -> Iterator[RunningMlflowServer]:
    """One real MLflow server shared by a test module (saves ~7-15 s a test); a test that stops it
    should ``start()`` it again, or call ``start()`` first itself (a no-op while it runs)."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server
