"""Per-document statistics along packed ``[b, S]`` rows: prefix means, document means, positions.

A document is a maximal run of equal ``segment_ids`` within a row (every row starts a new
one); without ``segment_ids`` each row is one document. Only "response" tokens
(``valid``) contribute. Sums run in float64 so long rows do not lose precision.
"""

from __future__ import annotations

import torch


def document_ids(segment_ids: torch.Tensor | None, shape: torch.Size, device) -> torch.Tensor:
    """Dense document index per token, unique across rows, non-decreasing in row-major order."""
    b, s = shape
    starts = torch.zeros((b, s), dtype=torch.bool, device=device)
    starts[:, 0] = True
    if segment_ids is not None:
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts.flatten().cumsum(0).sub_(1).view(b, s)


def _counts_before(valid: torch.Tensor, docs: torch.Tensor):
    """Response tokens before each position (row-major, exclusive), and before its document."""
    m = valid.flatten().to(torch.long)
    before = m.cumsum(0) - m
    flat_docs = docs.flatten()
    # ``before`` never decreases, so its minimum over a document is its value at the start
    per_doc = torch.zeros_like(before).scatter_reduce_(0, flat_docs, before, "amin", include_self=False)
    return before, per_doc[flat_docs]


def prefix_mean(values: torch.Tensor, valid: torch.Tensor, docs: torch.Tensor, window: int = 0):
    """Mean of ``values`` over earlier response tokens of the same document (exclusive).

    ``window=0`` averages the whole prefix; ``window=k`` the last ``k`` response tokens.
    Returns ``(mean, count)`` ``[b, S]``; the mean is 0 where the count is 0 (no prior token).
    """
    total, count = _prefix_total(values, valid, docs, window)
    mean = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return mean.view(values.shape), count.view(values.shape)


def prefix_sum(values: torch.Tensor, valid: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """Sum (float64) of ``values`` over the earlier response tokens of the same document (exclusive)."""
    return _prefix_total(values, valid, docs, 0)[0].view(values.shape)


def _prefix_total(values: torch.Tensor, valid: torch.Tensor, docs: torch.Tensor, window: int):
    """Flat ``(sum, count)`` of ``values`` over each token's earlier response tokens of its document."""
    n = values.numel()
    flat_valid = valid.flatten()
    before, start = _counts_before(valid, docs)
    # cum[j] = sum of the first j response tokens' values (row-major); no host sync needed
    slot = torch.where(flat_valid, before + 1, torch.full_like(before, n + 1))
    v = torch.where(flat_valid, values.flatten().to(torch.float64), 0.0)
    cum = torch.zeros(n + 2, dtype=torch.float64, device=values.device).index_put_((slot,), v)
    cum = cum[: n + 1].cumsum(0)
    low = start if window == 0 else torch.maximum(before - window, start)
    return cum[before] - cum[low], before - low


def document_mean(values: torch.Tensor, valid: torch.Tensor, docs: torch.Tensor):
    """Mean of ``values`` over the response tokens of each token's document, and that count."""
    flat_docs = docs.flatten()
    n = flat_docs.numel()  # an upper bound on the number of documents
    v = torch.where(valid, values, torch.zeros_like(values)).flatten().to(torch.float64)
    sums = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, flat_docs, v)
    counts = torch.zeros(n, dtype=torch.long, device=values.device).index_add_(
        0, flat_docs, valid.flatten().to(torch.long)
    )
    mean = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    return mean[flat_docs].view(values.shape), counts[flat_docs].view(values.shape)


def response_position(valid: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """Position of each response token within its document's response, in [0, 1) (0 elsewhere)."""
    before, start = _counts_before(valid, docs)
    index = (before - start).view(valid.shape)
    _, total = document_mean(torch.zeros(valid.shape, device=valid.device), valid, docs)
    frac = index.to(torch.float32) / total.clamp(min=1).to(torch.float32)
    return torch.where(valid, frac, torch.zeros_like(frac))


def masked_median(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Median of ``values`` over ``valid`` (mean of the two middle values when even; 0 if empty)."""
    flat = torch.where(valid, values.to(torch.float64), torch.inf).flatten()
    ordered = flat.sort().values
    n = valid.sum()
    lo = ((n - 1) // 2).clamp(min=0)
    hi = (n // 2).clamp(max=max(flat.numel() - 1, 0))
    if flat.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=values.device)
    median = (ordered[lo] + ordered[hi]) / 2
    return torch.where(n > 0, median, torch.zeros_like(median))
