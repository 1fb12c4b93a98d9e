"""Deterministic, resumable micro-batches for Megatron's schedule (train) and a finite eval pass.

Training order: epoch ``e`` is a permutation of all samples seeded with ``seed + e``, truncated
to whole global batches (``micro_batch_size * num_microbatches * dp_size`` samples). Like
Megatron's pretraining sampler, each micro-batch step consumes ``micro_batch_size * dp_size``
consecutive samples of that order and DP rank ``r`` takes the ``r``-th slice. The global
``consumed_samples`` is the whole resume state (it stays valid when ``dp_size`` changes).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from dcd_megatron.loss.contract import FLOAT_KEYS, INT_KEYS, DCDBatch
from dcd_megatron.errors import ConfigError


def to_torch(batch: dict[str, np.ndarray]) -> DCDBatch:
    """Numpy ``[b, s]`` arrays to torch: int64 ids/positions/segments, float32 mask/log-probs/frac."""
    out = {}
    for key, value in batch.items():
        if key in INT_KEYS:
            out[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.int64))
        elif key in FLOAT_KEYS:
            out[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        else:
            out[key] = torch.as_tensor(value)
    return out


def _get_batch(samples, indices: np.ndarray) -> dict[str, np.ndarray]:
    if hasattr(samples, "batch"):
        return samples.batch(indices)
    rows = [samples[int(i)] for i in indices]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r}: needs a positive integer")  # internal


class MicroBatchIterator(Iterator[DCDBatch]):
    """Endless training micro-batches ``[micro_batch_size, seq_length]`` for one DP rank."""

    def __init__(
        self,
        samples,
        *,
        micro_batch_size: int,
        num_microbatches: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        consumed_samples: int = 0,
        shuffle: bool = True,
    ):
        _check_positive(micro_batch_size=micro_batch_size, num_microbatches=num_microbatches, dp_size=dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")  # internal
        self.samples = samples
        self.micro_batch_size = micro_batch_size
        self.num_microbatches = num_microbatches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.global_batch_size = micro_batch_size * num_microbatches * dp_size
        self.step_samples = micro_batch_size * dp_size
        self.samples_per_epoch = (len(samples) // self.global_batch_size) * self.global_batch_size
        if self.samples_per_epoch == 0:
            raise ConfigError(
                f"only {len(samples)} training samples, fewer than one global batch of "
                f"{self.global_batch_size} (micro_batch_size x num_microbatches x dp_size); "
                "add data, pack (data.pack=true), or lower the batch size"
            )
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None
        self.consumed_samples = 0
        self.load_state_dict({"consumed_samples": consumed_samples})

    # ---- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": int(self.consumed_samples)}

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state["consumed_samples"])
        if consumed < 0 or consumed % self.step_samples:
            raise ConfigError(
                f"consumed_samples={consumed} is not a multiple of micro_batch_size x dp_size = "
                f"{self.step_samples}; resume from a checkpoint taken at a step boundary"
            )
        self.consumed_samples = consumed

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.samples_per_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (seeded with ``seed + epoch``), cached for the current epoch."""
        if self._order_epoch != epoch:
            n = len(self.samples)
            if self.shuffle:
                self._order = np.random.default_rng(self.seed + epoch).permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> np.ndarray:
        """Sample indices of this rank's next micro-batch (advances ``consumed_samples``)."""
        epoch, pos = divmod(self.consumed_samples, self.samples_per_epoch)
        start = pos + self.dp_rank * self.micro_batch_size
        indices = self.epoch_order(epoch)[start : start + self.micro_batch_size]
        self.consumed_samples += self.step_samples
        return indices

    def __next__(self) -> DCDBatch:
        return to_torch(_get_batch(self.samples, self.next_indices()))

    def __iter__(self) -> MicroBatchIterator:
        return self


class ValidationIterator:
    """A finite, fixed-order pass over held-out samples for one DP rank.

    Every rank yields the same number of micro-batches (collectives stay matched); the tail is
    filled with all-padding samples that carry no loss.
    """

    def __init__(self, samples, *, micro_batch_size: int, dp_rank: int, dp_size: int):
        _check_positive(micro_batch_size=micro_batch_size, dp_size=dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")  # internal
        self.samples = samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        step = micro_batch_size * dp_size
        self.num_microbatches = -(-len(samples) // step)

    def __len__(self) -> int:
        return self.num_microbatches

    def indices(self, j: int) -> np.ndarray:
        """Sample indices of micro-batch ``j`` on this rank (-1 marks a padding sample)."""
        start = j * self.micro_batch_size * self.dp_size + self.dp_rank * self.micro_batch_size
        idx = np.arange(start, start + self.micro_batch_size)
        idx[idx >= len(self.samples)] = -1
        return idx

    def __iter__(self) -> Iterator[DCDBatch]:
        for j in range(self.num_microbatches):
            idx = self.indices(j)
            if (idx < 0).any() and not hasattr(self.samples, "batch"):
                raise TypeError("padding a partial validation batch needs samples with .batch() (PackedSamples)")  # internal
            yield to_torch(_get_batch(self.samples, idx))
