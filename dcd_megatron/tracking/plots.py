"""Render the DCD weight diagnostics as PNGs with matplotlib's Agg canvas (no pyplot, thread-safe)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def as_float_array(values: Any, name: str) -> np.ndarray:
    """A 1-D float64 copy of a list, numpy array or (CPU/GPU) torch tensor, or a ValueError naming ``name``."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    array = np.array(values, dtype=np.float64, copy=True)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {array.shape}")  # internal
    return array


def check_binned(edges: np.ndarray, values: np.ndarray, edges_name: str, values_name: str) -> None:
    """Edges must be increasing and one longer than the per-bin values."""
    if edges.size != values.size + 1:
        raise ValueError(  # internal
            f"{edges_name} has {edges.size} entries but {values_name} has {values.size}: "
            f"pass n+1 bin edges for n bins"
        )
    if not np.all(np.isfinite(edges)) or not np.all(np.diff(edges) > 0):
        raise ValueError(f"{edges_name} must be finite and strictly increasing, got {edges.tolist()}")  # internal


def trim_empty_bins(edges: np.ndarray, counts: np.ndarray, margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Drop the empty bins at both ends (keeping ``margin``), so a wide fixed histogram shows its data."""
    filled = np.flatnonzero(counts > 0)
    if filled.size == 0:
        return edges, counts
    lo, hi = max(filled[0] - margin, 0), min(filled[-1] + margin, counts.size - 1)
    return edges[lo : hi + 2], counts[lo : hi + 1]


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def render_weight_histogram(path: Path, step: int, edges: np.ndarray, counts: np.ndarray) -> Path:
    """Bar chart of how many response tokens fell in each weight bin at ``step``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot()
    edges, counts = trim_empty_bins(edges, counts)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="black", linewidth=0.4)
    if edges[0] > 0 and edges[-1] / edges[0] > 10:
        ax.set_xscale("log")
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=0.8)
    total = float(np.sum(counts))
    ax.set_title(f"DCD token weights before normalisation, step {step} ({total:.0f} tokens)")
    ax.set_xlabel("weight w_t")
    ax.set_ylabel("tokens")
    fig.tight_layout()
    return _save(fig, path)


def render_weight_by_position(path: Path, step: int, edges: np.ndarray, mean_weight: np.ndarray) -> Path:
    """Mean weight against relative position in the response (empty bins, NaN, are left as gaps)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot()
    centers = 0.5 * (edges[:-1] + edges[1:])
    ax.plot(centers, mean_weight, marker="o", markersize=3)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_title(f"Mean DCD weight by position in response, step {step}")
    ax.set_xlabel("position in response (fraction of its length)")
    ax.set_ylabel("mean weight")
    fig.tight_layout()
    return _save(fig, path)


def check_curves(curves: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (steps, values)}`` as float arrays of equal, non-zero length, or a ValueError naming the curve."""
    if not curves:
        raise ValueError("curves is empty: pass {metric name: (steps, values)} with at least one curve")  # internal
    out = {}
    for name, pair in curves.items():
        steps, values = (as_float_array(x, f"curves[{name!r}] {part}") for x, part in zip(pair, ("steps", "values")))
        if steps.size != values.size:
            raise ValueError(f"curves[{name!r}] has {steps.size} steps but {values.size} values: pass one value a step")  # internal
        out[name] = (steps, values)
    return out


def render_metric_curves(
    path: Path, step: int, title: str, curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    reference: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None, ylabel: str = "value",
) -> Path:
    """Metrics against the optimizer step, one line each; ``reference`` curves are drawn dashed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot()
    for name, (steps, values) in curves.items():
        ax.plot(steps, values, marker="o" if steps.size < 30 else None, markersize=3, label=name)
    for name, (steps, values) in (reference or {}).items():
        ax.plot(steps, values, linestyle="--", color="gray", linewidth=0.9, label=name)
    ax.set_ylim(bottom=0.0)
    ax.set_title(f"{title}, up to step {step}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
