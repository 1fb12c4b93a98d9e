"""The lab's problem sets: held-out evaluation digits first, then training rows that avoid them.

Every set is drawn from its own seeded stream, so a lab run is reproducible and no evaluation
problem appears in the teacher's, the prior's or the distillation data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from dcd_megatron.lab import task


def heldout_problems(ks: list[int], per_k: int, seed: int) -> dict[int, list[str]]:
    """`per_k` distinct digit strings for each k (fewer when k is too small to have that many)."""
    rng = random.Random(f"eval-{seed}")
    out: dict[int, list[str]] = {}
    for k in sorted(set(ks)):
        want = min(per_k, 10**k // 2)  # never ask for most of a tiny space
        seen: set[str] = set()
        while len(seen) < want:
            seen.add(task.random_digits(rng, k))
        out[k] = sorted(seen, key=lambda d: (rng.random(), d))
    return out


def training_digits(n: int, k_range: list[int], exclude: set[str], rng: random.Random) -> list[str]:
    """`n` digit strings with k uniform in `k_range` (inclusive), none of them in `exclude`."""
    out = []
    while len(out) < n:
        digits = task.random_digits(rng, rng.randint(k_range[0], k_range[1]))
        if digits not in exclude:
            out.append(digits)
    return out


def exact_rows(digits: list[str], styles: dict[str, float], rng: random.Random) -> list[dict]:
    """Correct traces (prompt, response, style) with the style drawn by `styles` weights."""
    names, weights = zip(*styles.items())
    rows = []
    for d in digits:
        style = rng.choices(names, weights)[0]
        rows.append({"prompt": task.make_prompt(d), "response": task.make_trace(d, style), "style": style})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def digits_of(prompt: str) -> str:
    """The digit string of a task prompt (`35272:` -> `35272`)."""
    return prompt.rstrip(":")


def style_sample(rows: list[dict], per_style: int, seed: int) -> list[dict]:
    """Up to `per_style` rows of each style (the same rows for every arm and seed)."""
    rng = random.Random(f"weights-{seed}")
    by_style: dict[str, list[dict]] = {}
    for row in rows:
        by_style.setdefault(row["style"], []).append(row)
    out = []
    for style in sorted(by_style):
        group = by_style[style]
        out += rng.sample(group, min(per_style, len(group)))
    return out
