"""SIGTERM / SIGUSR1 (Slurm's warning before a time limit) ask for a checkpoint and a clean stop."""

from __future__ import annotations

import signal

import torch


class StopSignal:
    """Records a stop signal; all ranks agree on stopping through an all-reduce, so they save the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device: torch.device):
        from dcd_megatron.checkpoint import start_writer_helpers

        self.device = device
        self.received = False
        self._previous = {}
        start_writer_helpers(ignoring=self.SIGNALS)  # megatron's writer process must not die of them
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        self.received = True

    def requested(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.received = bool(flag.item())
        return self.received

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
