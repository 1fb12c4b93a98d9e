"""Per-micro-batch diagnostics of the DCD loss, and their exact reduction over a step.

A micro-batch report maps a key to a float64 tensor whose reduction is given by
``REDUCTIONS`` (default "sum"): "sum" entries are ``[sum, count]`` pairs (or histograms)
that add up across micro-batches and ranks; "min"/"max" entries are ``[value, count]``
where the value counts only when ``count > 0``. ``reduce_reports`` turns a step's list of
reports into scalar metrics plus the two binned series the tracking code plots.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from dcd_megatron.loss.weights import WeightResult

POSITION_BINS = 20  # mean weight by position in the response; bins 0-1 / 18-19 = first / last 10%
HIST_LOW_EXP, HIST_HIGH_EXP, HIST_BINS_PER_DECADE = -8, 4, 20


def histogram_edges(device=None) -> torch.Tensor:
    """Log-spaced weight-histogram edges 1e-8 .. 1e4 (weights outside count in the end bins)."""
    n = (HIST_HIGH_EXP - HIST_LOW_EXP) * HIST_BINS_PER_DECADE + 1
    return torch.logspace(HIST_LOW_EXP, HIST_HIGH_EXP, n, dtype=torch.float64, device=device)


# Teacher-certain tokens (knowledge): p_teacher(token) >= CERTAIN_P; the rest are forks (choices).
# A certain token is unlearned while p_student(token) < UNLEARNED_P (the student would likely not
# write it): its mean weight falling towards 0 is the loss starving knowledge (docs/loss.md).
CERTAIN_P, UNLEARNED_P = 0.9, 0.5
# The knowledge / fork metrics of reduce_reports (plotted over steps, summarised at the end of a
# run); certain_token_frac is the level weight_mass_certain has under plain SFT.
KNOWLEDGE_KEYS: tuple[str, ...] = ("weight_mass_certain", "weight_mass_fork", "weight_certain_unlearned")
REDUCTIONS: dict[str, str] = {"weight_min": "min", "weight_max": "max"}
# Entries of reduce_reports' result that are lists (for plots), not scalar metrics.
SERIES_KEYS: tuple[str, ...] = (
    "weight_hist_counts", "weight_hist_edges",
    "weight_by_position", "weight_by_position_count", "weight_by_position_edges",
)


def build_report(
    *,
    loss_sum: torch.Tensor,
    student_logprobs: torch.Tensor,
    result: WeightResult,
    valid: torch.Tensor,
    response_frac: torch.Tensor | None,
    global_norm: bool,
) -> dict[str, torch.Tensor]:
    """The report of one micro-batch (detached float64 tensors on the logits' device)."""
    f64 = torch.float64
    u = result.weights.detach().to(f64)
    m = valid
    n = m.sum().to(f64)
    nll = torch.where(m, -student_logprobs.detach().to(f64), 0.0)

    def pair(total: torch.Tensor, count: torch.Tensor = n) -> torch.Tensor:
        return torch.stack([total.to(f64), count.to(f64)])

    report = {
        "loss": pair(loss_sum.detach()),
        "ce": pair(nll.sum()),
        "weighted_ce": pair((u * nll).sum()),
        "weight": pair(u.sum()),
        "weight_sq": pair((u * u).sum()),
        "weight_at_cap": pair(result.at_cap.sum()),
        "weight_at_floor": pair(result.at_floor.sum()),
    }
    report.update(_knowledge_entries(u, student_logprobs, result.log_ratio, m))
    zero = torch.zeros((), dtype=f64, device=u.device)
    low = torch.where(m, u, math.inf).min() if u.numel() else zero
    high = torch.where(m, u, -math.inf).max() if u.numel() else zero
    report["weight_min"] = pair(torch.where(n > 0, low, zero))
    report["weight_max"] = pair(torch.where(n > 0, high, zero))

    edges = histogram_edges(u.device)
    index = (torch.bucketize(u, edges, right=True) - 1).clamp(0, edges.numel() - 2).flatten()
    report["weight_hist"] = torch.zeros(edges.numel() - 1, dtype=f64, device=u.device).scatter_add_(
        0, index, m.flatten().to(f64)
    )

    by_position = torch.zeros(POSITION_BINS, 2, dtype=f64, device=u.device)
    if response_frac is not None:
        bins = (response_frac.detach().to(f64) * POSITION_BINS).floor().clamp(0, POSITION_BINS - 1).long().flatten()
        by_position[:, 0].scatter_add_(0, bins, u.flatten() * m.flatten())
        by_position[:, 1].scatter_add_(0, bins, m.flatten().to(f64))
    report["weight_by_position"] = by_position
    if global_norm:
        report["global_norm"] = report["weight"].clone()
    return report


def _knowledge_entries(u, student_logprobs, log_ratio, m) -> dict[str, torch.Tensor]:
    """Log-ratio sum and the weight on teacher-certain / fork / certain-but-unlearned tokens."""
    f64 = torch.float64
    if log_ratio is None:  # no teacher: the same keys, empty
        return {k: torch.zeros(2, dtype=f64, device=u.device)
                for k in ("log_ratio", "certain", "weight_certain", "weight_fork", "weight_unlearned")}
    s = student_logprobs.detach().to(f64)
    l = log_ratio.detach().to(f64)
    certain = m & (s - l >= math.log(CERTAIN_P))
    fork = m & ~certain
    unlearned = certain & (s < math.log(UNLEARNED_P))
    total = torch.where(m, u, 0.0).sum()
    return {
        "log_ratio": torch.stack([torch.where(m, l, 0.0).sum(), m.sum().to(f64)]),
        "certain": torch.stack([certain.sum().to(f64), m.sum().to(f64)]),
        "weight_certain": torch.stack([torch.where(certain, u, 0.0).sum(), total]),
        "weight_fork": torch.stack([torch.where(fork, u, 0.0).sum(), total]),
        "weight_unlearned": torch.stack([torch.where(unlearned, u, 0.0).sum(), unlearned.sum().to(f64)]),
    }


def _local_totals(reports: list[dict[str, torch.Tensor]]):
    keys = sorted(reports[0])
    for r in reports[1:]:
        if sorted(r) != keys:
            raise ValueError(f"micro-batch reports disagree on keys: {keys} vs {sorted(r)}")
    totals = {}
    for key in keys:
        stacked = torch.stack([r[key].to(torch.float64) for r in reports])
        kind = REDUCTIONS.get(key, "sum")
        if kind == "sum":
            totals[key] = stacked.sum(0)
        else:
            values, counts = stacked[:, 0], stacked[:, 1]
            fill = math.inf if kind == "min" else -math.inf
            values = torch.where(counts > 0, values, fill)
            totals[key] = values.min() if kind == "min" else values.max()
    return keys, totals


def _all_reduce_totals(keys, totals, dp_cp_group) -> None:
    """Sum the sum-entries and min/max the extremes over ``dp_cp_group`` (two collectives)."""
    if dp_cp_group is None or not dist.is_initialized() or dist.get_world_size(dp_cp_group) == 1:
        return
    sum_keys = [k for k in keys if REDUCTIONS.get(k, "sum") == "sum"]
    ext_keys = [k for k in keys if REDUCTIONS.get(k, "sum") != "sum"]
    flat = torch.cat([totals[k].flatten() for k in sum_keys])
    dist.all_reduce(flat, group=dp_cp_group)
    offset = 0
    for k in sum_keys:
        size = totals[k].numel()
        totals[k] = flat[offset : offset + size].view_as(totals[k])
        offset += size
    if ext_keys:
        signed = torch.stack([totals[k] if REDUCTIONS[k] == "max" else -totals[k] for k in ext_keys])
        dist.all_reduce(signed, op=dist.ReduceOp.MAX, group=dp_cp_group)
        for k, v in zip(ext_keys, signed):
            totals[k] = v if REDUCTIONS[k] == "max" else -v


def _percentile(hist: torch.Tensor, edges: torch.Tensor, q: float, lo: float, hi: float) -> float:
    """The q-quantile from log-spaced bin counts, log-interpolated in its bin, within [lo, hi]."""
    target = q * float(hist.sum())
    cum = hist.cumsum(0)
    i = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype)).clamp(max=hist.numel() - 1))
    before = float(cum[i - 1]) if i > 0 else 0.0
    frac = (target - before) / max(float(hist[i]), 1.0)
    a, b = math.log(float(edges[i])), math.log(float(edges[i + 1]))
    return min(max(math.exp(a + frac * (b - a)), lo), hi)


def reduce_reports(reports: list[dict[str, torch.Tensor]], dp_cp_group: dist.ProcessGroup | None = None) -> dict:
    """Scalar metrics of a step from its micro-batch reports, reduced over ``dp_cp_group``.

    Returns scalar floats, plus the lists named in ``SERIES_KEYS`` for the plots: the weight
    histogram (counts and log-spaced edges) and the mean weight in 20 bins of the position
    in the response (NaN marks an empty bin: a gap in the plot), with its counts and edges.
    An empty list (a rank that is not the last pipeline stage) gives ``{}``. Scalars with
    no tokens behind them are left out rather than reported as NaN.
    """
    if not reports:
        return {}
    keys, totals = _local_totals(reports)
    _all_reduce_totals(keys, totals, dp_cp_group)
    t = {k: v.detach().cpu() for k, v in totals.items()}
    n = float(t["weight"][1])
    out: dict = {"tokens": n}

    def mean(key: str) -> float | None:
        total, count = float(t[key][0]), float(t[key][1])
        return total / count if count > 0 else None

    for name, key in (
        ("loss_unnormalized", "loss"), ("ce", "ce"), ("weighted_ce", "weighted_ce"), ("weight_mean", "weight"),
        ("weight_at_cap_frac", "weight_at_cap"), ("weight_at_floor_frac", "weight_at_floor"),
        ("log_ratio_mean", "log_ratio"), ("certain_token_frac", "certain"),
        ("weight_mass_certain", "weight_certain"), ("weight_mass_fork", "weight_fork"),
    ):
        value = mean(key)
        if value is not None:
            out[name] = value
    unlearned = mean("weight_unlearned")  # relative to the mean weight: 1 = like an average token
    if unlearned is not None and out.get("weight_mean", 0) > 0:
        out["weight_certain_unlearned"] = unlearned / out["weight_mean"]
    weight_sum, weight_sq = float(t["weight"][0]), float(t["weight_sq"][0])
    if n > 0:
        mean_w = weight_sum / n
        out["weight_std"] = math.sqrt(max(weight_sq / n - mean_w * mean_w, 0.0))
    if n > 0 and weight_sq > 0:
        out["ess"] = weight_sum * weight_sum / (n * weight_sq)
    if weight_sum > 0:
        out["weighted_ce_normalized"] = float(t["weighted_ce"][0]) / weight_sum
    # "loss": the per-token objective whose gradient the step applies (after the global
    # rescale when normalize="global"; as back-propagated otherwise)
    if "global_norm" in t:
        out["norm_factor"] = n / weight_sum if weight_sum > 0 else 1.0
        if n > 0:
            out["loss"] = out["loss_unnormalized"] * out["norm_factor"]
    elif n > 0:
        out["loss"] = out["loss_unnormalized"]
    for key in ("weight_min", "weight_max"):
        if math.isfinite(float(t[key])):
            out[key] = float(t[key])

    edges = histogram_edges()
    hist = t["weight_hist"]
    if n > 0 and "weight_min" in out:
        for q in (50, 90, 99):
            out[f"weight_p{q}"] = _percentile(hist, edges, q / 100, out["weight_min"], out["weight_max"])
    edge_bins = POSITION_BINS // 10
    pos = t["weight_by_position"]
    counts = pos[:, 1]
    for name, sl in (("weight_first10", slice(0, edge_bins)), ("weight_last10", slice(POSITION_BINS - edge_bins, None))):
        c = float(counts[sl].sum())
        if c > 0:
            out[name] = float(pos[sl, 0].sum()) / c

    out["weight_hist_counts"] = hist.tolist()
    out["weight_hist_edges"] = edges.tolist()
    out["weight_by_position"] = torch.where(counts > 0, pos[:, 0] / counts.clamp(min=1), math.nan).tolist()
    out["weight_by_position_count"] = counts.tolist()
    out["weight_by_position_edges"] = torch.linspace(0, 1, POSITION_BINS + 1, dtype=torch.float64).tolist()
    return out


def knowledge_summary(curves: dict) -> list[str]:
    """Console lines for the end of a run: first -> last value of each knowledge metric, and how to read them."""
    shown = [k for k in KNOWLEDGE_KEYS if curves.get(k) and curves[k][0]]
    if not shown:
        return []
    frac = curves.get("certain_token_frac")
    share = f"; {frac[1][-1]:.1%} of trained tokens at the last step" if frac and frac[0] else ""
    lines = [f"knowledge vs forks (teacher-certain tokens, p_teacher >= {CERTAIN_P}{share}):"]
    for key in shown:
        steps, values = curves[key]
        first = f"{values[0]:.4f} (step {steps[0]})"
        lines.append(f"  {key:<25}{first} -> {values[-1]:.4f} (step {steps[-1]})" if len(steps) > 1
                     else f"  {key:<25}{first}")
    if "weight_certain_unlearned" in shown:
        lines.append(f"  weight_certain_unlearned is the mean weight (1 = an average token) of teacher-certain tokens "
                     f"the student still gets wrong (p_student < {UNLEARNED_P}): falling towards 0 means the loss "
                     "is starving knowledge the student must learn.")
    return lines
