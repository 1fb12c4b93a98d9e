"""Digit sums written as running sums, in three trace styles of different difficulty.

Prompt `35272:`; traces: verbose `3+5=8,8+2=10,10+7=17,17+2=19>19`, skip2 (two digits added per
step) `3+5+2=10,10+7+2=19>19`, skip3 `3+5+2+7=17,17+2=19>19`. The answer after `>` and every
step can be checked exactly, so accuracy and the position of the first error are known.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

STYLES = {"verbose": 1, "skip2": 2, "skip3": 3}  # digits added per step after the first operand
ALPHABET = "0123456789+=,>:"
SPECIALS = ("<pad>", "<s>", "</s>")


def vocabulary() -> list[str]:
    """The tokenizer's symbols in id order; the end-of-sequence token is `"\\0"` here."""
    return ["<pad>", "<s>", "\0", *ALPHABET]


def token_id(symbol: str) -> int:
    """The tokenizer id of one character of a trace (`"\\0"`: the end-of-sequence token)."""
    return vocabulary().index(symbol)


def make_prompt(digits: str) -> str:
    return f"{digits}:"


def random_digits(rng: random.Random, k: int) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(k))


def make_trace(digits: str, style: str) -> str:
    """The correct response for `digits` in `style`."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; use one of {sorted(STYLES)}")
    if len(digits) < 2 or not digits.isdigit():
        raise ValueError(f"need at least two digits, got {digits!r}")
    per_step = STYLES[style]
    values = [int(d) for d in digits]
    steps = []
    total, i = values[0], 1
    operands = [str(values[0])]
    while i < len(values):
        chunk = values[i : i + per_step]
        operands += [str(v) for v in chunk]
        total += sum(chunk)
        steps.append("+".join(operands) + f"={total}")
        operands = [str(total)]
        i += per_step
    return ",".join(steps) + f">{total}"


def accuracy_record(digits: list[str], texts: list[str]) -> dict:
    """Problems, correct answers, and the style each answer was written in (with its correct count)."""
    names = (*STYLES, "other")
    styles, correct_by_style, correct = dict.fromkeys(names, 0), dict.fromkeys(names, 0), 0
    for d, text in zip(digits, texts, strict=True):
        style, ok = style_of(text), is_correct(d, text)
        styles[style] += 1
        correct_by_style[style] += int(ok)
        correct += int(ok)
    return {"n": len(digits), "correct": correct, "styles": styles, "correct_by_style": correct_by_style}


def answer_of(response: str) -> int | None:
    """The integer after the last `>`, or None."""
    if ">" not in response:
        return None
    tail = response.rsplit(">", 1)[1].strip()
    return int(tail) if tail.isdigit() else None


def is_correct(digits: str, response: str) -> bool:
    """Whether the final answer equals the digit sum."""
    return answer_of(response) == sum(int(d) for d in digits)


def first_error(digits: str, response: str) -> int | None:
    """Index of the first character after which `response` cannot be completed into a correct
    trace of any style, or None if it is a correct (complete or partial) trace."""
    values = [int(d) for d in digits]
    # Build every correct trace of every style and mixed per-step widths is too loose; accept any
    # sequence of steps whose operands continue the digits in order and whose sums are right.
    pos = 0
    consumed = 0
    total = None
    segments = response.split(",")
    for index, step_text in enumerate(segments):
        is_last = index == len(segments) - 1
        final = None
        if ">" in step_text:
            step_text, final = step_text.split(">", 1)
        if "=" not in step_text:
            return None if _is_prefix_step(step_text, values, consumed, total) and final is None else pos
        lhs, rhs = step_text.split("=", 1)
        ops = lhs.split("+")
        if not all(o.isdigit() for o in ops) or len(ops) < 2:
            return pos
        ints = [int(o) for o in ops]
        if total is None:
            expect = values[: len(ints)]
            if ints != expect:
                return pos
            consumed = len(ints)
        else:
            if ints[0] != total or ints[1:] != values[consumed : consumed + len(ints) - 1]:
                return pos
            consumed += len(ints) - 1
        true_sum = sum(ints)
        if not rhs.isdigit():
            return None if (rhs == "" or str(true_sum).startswith(rhs)) and final is None else pos + len(lhs) + 1
        if int(rhs) != true_sum:
            unfinished = is_last and final is None and str(true_sum).startswith(rhs)
            return None if unfinished else pos + len(lhs) + 1
        total = true_sum
        if final is not None:
            if consumed != len(values):
                return pos + len(step_text)
            if final and not str(total).startswith(final):
                return pos + len(step_text) + 1
            if final and final != str(total):
                return None  # partial answer
            return None
        pos += len(step_text) + 1
    return None


def _is_prefix_step(text: str, values: list[int], consumed: int, total: int | None) -> bool:
    """Whether an unfinished step (no `=` yet) can still be continued correctly."""
    if text == "":
        return True
    ops = text.split("+")
    expect = ([] if total is None else [str(total)]) + [str(v) for v in values[consumed if total is not None else 0 :]]
    for i, op in enumerate(ops):
        if i >= len(expect):
            return False
        last = i == len(ops) - 1
        if (op != expect[i]) and not (last and expect[i].startswith(op)):
            return False
    return True


def build_tokenizer(out_dir: str | Path) -> Path:
    """A character-level Hugging Face `tokenizer.json` for the task (18 symbols)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + list(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    )
    return out / "tokenizer.json"


def teacher_rows(n: int, *, k_min: int, k_max: int, style_weights: dict[str, float], seed: int) -> list[dict]:
    """Correct traces for teacher training: `n` rows, k uniform in [k_min, k_max]."""
    rng = random.Random(seed)
    styles, weights = zip(*style_weights.items())
    rows = []
    for _ in range(n):
        digits = random_digits(rng, rng.randint(k_min, k_max))
        style = rng.choices(styles, weights)[0]
        rows.append({"prompt": make_prompt(digits), "response": make_trace(digits, style), "style": style})
    return rows


def style_of(response: str) -> str:
    """The style a response is written in (by operands in its first step)."""
    first = response.split(",", 1)[0].split(">", 1)[0].split("=", 1)[0]
    n_ops = len(first.split("+"))
    return {2: "verbose", 3: "skip2", 4: "skip3"}.get(n_ops, "other")
