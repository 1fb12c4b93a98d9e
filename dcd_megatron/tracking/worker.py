"""A background thread that runs logging calls in order, so a slow or dead server never blocks training.

The queue is bounded: when full, the oldest droppable call is discarded and counted. Calls
marked ``essential`` (run setup, finish) are dropped only when nothing else is left to drop.
A failing call is counted and handed to ``on_error``; the worker carries on with the next one.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Task:
    name: str
    fn: Callable[[], None]
    essential: bool


@dataclass
class WorkerStats:
    """Counters since the worker started."""

    done: int = 0
    failed: int = 0
    dropped: int = 0
    pending: int = 0


class BackgroundWorker:
    """Runs submitted callables one at a time on a daemon thread."""

    def __init__(
        self,
        max_pending: int,
        on_error: Callable[[str, BaseException], None],
        on_success: Callable[[str], None] | None = None,
        name: str = "dcd-tracking",
    ):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")  # internal
        self._max_pending = max_pending
        self._on_error = on_error
        self._on_success = on_success
        self._queue: collections.deque[_Task] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._stats = WorkerStats()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, name: str, fn: Callable[[], None], essential: bool = False) -> bool:
        """Queue ``fn``; returns False if the worker is closed. Never blocks on the call itself."""
        with self._cond:
            if self._closed:
                return False
            if len(self._queue) >= self._max_pending:
                self._drop_one()
            self._queue.append(_Task(name, fn, essential))
            self._cond.notify_all()
            return True

    def _drop_one(self) -> None:
        for i, task in enumerate(self._queue):
            if not task.essential:
                del self._queue[i]
                break
        else:
            self._queue.popleft()
        self._stats.dropped += 1

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                task = self._queue.popleft()
                self._busy = True
            try:
                task.fn()
            except BaseException as exc:  # noqa: BLE001 - logging must never kill training
                with self._cond:
                    self._stats.failed += 1
                try:
                    self._on_error(task.name, exc)
                except Exception:
                    pass
            else:
                with self._cond:
                    self._stats.done += 1
                if self._on_success is not None:
                    try:
                        self._on_success(task.name)
                    except Exception:
                        pass
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued call has run (True) or ``timeout_s`` has passed (False)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout_s: float) -> bool:
        """Flush for at most ``timeout_s``, then stop; unsent calls are discarded and counted as dropped."""
        flushed = self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._stats.dropped += len(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        if flushed:
            self._thread.join(timeout=1.0)
        return flushed

    @property
    def stats(self) -> WorkerStats:
        with self._cond:
            return WorkerStats(self._stats.done, self._stats.failed, self._stats.dropped, len(self._queue) + int(self._busy))
