"""Cut cached documents into fixed-length training samples (packed greedily, or one per sample).

A sample holds ``seq_length`` input tokens; ``labels[i]`` is the next token of the same
document. Only labels that are trained response tokens of the same document get
``loss_mask = 1``: the last position of every document, cross-document pairs and padding
are never trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dcd_megatron.data.cache import TokenCache
from dcd_megatron.errors import UserError


class PackingError(UserError, ValueError):
    """Documents and ``seq_length`` do not fit together."""


def plan_samples(doc_lengths: np.ndarray, seq_length: int, pack: bool) -> np.ndarray:
    """Sample boundaries ``[n_samples+1]`` into the document order (next-fit greedy when packing).

    Sample ``i`` holds documents ``bounds[i]:bounds[i+1]`` of the order; documents keep their
    order and never straddle two samples.
    """
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > seq_length:
        raise PackingError(
            f"a document of {int(lengths.max())} tokens exceeds seq_length={seq_length}; the "
            "token cache must be built with the same data.seq_length (its on_long_row applies there)"
        )
    if not pack:
        return np.arange(len(lengths) + 1, dtype=np.int64)
    bounds = [0]
    used = 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > seq_length:
            bounds.append(i)
            used = 0
        used += n
    if len(lengths):
        bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64)


def empty_sample(seq_length: int, pad_id: int, topk: int = 0) -> dict[str, np.ndarray]:
    """An all-padding sample: nothing trained, segment -1 (fills the last validation batch)."""
    sample = {
        "tokens": np.full(seq_length, pad_id, dtype=np.int64),
        "labels": np.full(seq_length, pad_id, dtype=np.int64),
        "loss_mask": np.zeros(seq_length, dtype=np.float32),
        "teacher_logprobs": np.full(seq_length, np.nan, dtype=np.float32),
        "student_ref_logprobs": np.full(seq_length, np.nan, dtype=np.float32),
        "segment_ids": np.full(seq_length, -1, dtype=np.int64),
        "position_ids": np.zeros(seq_length, dtype=np.int64),
        "response_frac": np.zeros(seq_length, dtype=np.float32),
    }
    if topk:
        sample["teacher_topk_ids"] = np.full((seq_length, topk), -1, dtype=np.int64)
        sample["teacher_topk_logprobs"] = np.full((seq_length, topk), np.nan, dtype=np.float32)
    return sample


def assemble_sample(cache: TokenCache, docs: np.ndarray, seq_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Concatenate documents ``docs`` of ``cache`` into one padded sample (see module docstring)."""
    topk = 0 if cache.teacher_topk_ids is None else int(cache.teacher_topk_ids.shape[1])
    out = empty_sample(seq_length, pad_id, topk)
    cur = 0
    for seg, d in enumerate(np.asarray(docs).tolist()):
        a, b = int(cache.doc_offsets[d]), int(cache.doc_offsets[d + 1])
        n = b - a
        if cur + n > seq_length:
            raise PackingError(f"documents overflow seq_length={seq_length} (internal plan error)")
        out["tokens"][cur : cur + n] = cache.tokens[a:b]
        out["segment_ids"][cur : cur + n] = seg
        out["position_ids"][cur : cur + n] = np.arange(n)
        # position j predicts document token j+1 (same document); the last position predicts nothing
        lo, hi = cur, cur + n - 1
        out["labels"][lo:hi] = cache.tokens[a + 1 : b]
        mask = cache.loss_mask[a + 1 : b].astype(np.float32)
        out["loss_mask"][lo:hi] = mask
        out["teacher_logprobs"][lo:hi] = cache.teacher_logprobs[a + 1 : b]
        out["student_ref_logprobs"][lo:hi] = cache.student_ref_logprobs[a + 1 : b]
        if topk:  # like the log-probs: the entry of the label token
            out["teacher_topk_ids"][lo:hi] = cache.teacher_topk_ids[a + 1 : b]
            out["teacher_topk_logprobs"][lo:hi] = cache.teacher_topk_logprobs[a + 1 : b]
        trained = int(cache.response_tokens[d])
        if trained:
            label_index = np.arange(1, n) - int(cache.response_start[d])
            out["response_frac"][lo:hi] = np.where(mask > 0, label_index / trained, 0.0)
        cur += n
    return out


def holdout_split(doc_rows: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, valid) document ids: the ``fraction`` whose source rows hash lowest.

    The hash depends only on the source row number, so the held-out rows stay held out across
    seeds, skip policies and appended data.
    """
    n = len(doc_rows)
    if fraction <= 0 or n == 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    n_valid = min(n - 1, max(1, round(fraction * n)))
    if n_valid < 1:
        raise PackingError(f"data.valid_fraction={fraction}: only {n} document(s), none left to hold out")
    with np.errstate(over="ignore"):  # splitmix64 relies on uint64 wrap-around
        z = np.asarray(doc_rows, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    order = np.argsort(z, kind="stable")
    valid = np.sort(order[:n_valid]).astype(np.int64)
    train = np.setdiff1d(np.arange(n, dtype=np.int64), valid)
    return train, valid


@dataclass
class PackingStats:
    docs: int
    samples: int
    tokens: int
    fill: float  # non-padding fraction of all sample positions


class PackedSamples:
    """Random access to fixed-length samples of a `TokenCache` (optionally a document subset)."""

    def __init__(self, cache: TokenCache, seq_length: int, *, pack: bool = True, doc_ids: np.ndarray | None = None):
        self.cache = cache
        self.seq_length = int(seq_length)
        self.pack = pack
        self.pad_id = int(cache.meta["tokenizer"]["pad_id"])
        self.doc_ids = np.arange(cache.n_docs, dtype=np.int64) if doc_ids is None else np.asarray(doc_ids, np.int64)
        lengths = cache.doc_lengths[self.doc_ids]
        self.bounds = plan_samples(lengths, self.seq_length, pack)
        n = len(self)
        tokens = int(lengths.sum())
        self.stats = PackingStats(len(self.doc_ids), n, tokens, tokens / max(1, n * self.seq_length))

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def docs_of(self, index: int) -> np.ndarray:
        """Cache document ids packed into sample ``index``."""
        return self.doc_ids[self.bounds[index] : self.bounds[index + 1]]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range ({len(self)} samples)")
        index %= len(self)
        return assemble_sample(self.cache, self.docs_of(index), self.seq_length, self.pad_id)

    def empty(self) -> dict[str, np.ndarray]:
        ids = self.cache.teacher_topk_ids
        return empty_sample(self.seq_length, self.pad_id, 0 if ids is None else int(ids.shape[1]))

    def batch(self, indices) -> dict[str, np.ndarray]:
        """Stack samples (index -1 gives an all-padding sample) into ``[b, seq_length]`` arrays."""
        rows = [self[i] if i >= 0 else self.empty() for i in np.asarray(indices).tolist()]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
