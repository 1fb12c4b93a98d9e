"""Final-answer extraction from model output and equivalence grading with ``math-verify``.

Conventions (docs/evaluation.md): the answer is the content of the last ``\\boxed{...}`` (or
``\\fbox{...}``); for GSM8K it is the final number. Grading never raises: ``math_verify``
(``parse`` + ``verify``, under a time limit) decides, with a normalised string comparison as
a fallback and a fast path.
"""

from __future__ import annotations

import logging
import re
import threading

logger = logging.getLogger(__name__)

_BOX_COMMANDS = ("\\boxed", "\\fbox")

# A number as a person writes it: optional sign, thousands separators, decimals.
_NUMBER = re.compile(
    r"(?<![0-9A-Za-z])([-\u2212])?\s?\$?\s?"
    r"((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
)


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at ``text[start] == '{'``, and the index after it.

    Escaped braces (``\\{``, ``\\}``) do not count. None when the group never closes
    (typically a generation cut off by the length limit).
    """
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def _box_argument(text: str, after: int) -> str | None:
    """The argument of a box command whose name ends at ``after``: ``{...}`` or ``\\boxed 5``."""
    j = after
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        got = _braced(text, j)
        return None if got is None else got[0]
    if j == after:
        return None  # "\boxed5" is not valid LaTeX for a boxed argument
    match = re.match(r"[^\s$]+", text[j:])
    if match is None:
        return None
    return match.group(0).rstrip(".,;")


def extract_boxed(text: str | None) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` (brace-balanced).

    Also accepts ``\\boxed 5``. Returns None when there is no box, or when the last one is
    empty or never closes (a generation cut off by the length limit has no answer).
    """
    if not text:
        return None
    ends = sorted(
        m.end()
        for cmd in _BOX_COMMANDS
        for m in re.finditer(re.escape(cmd) + r"(?![A-Za-z])", text)
    )
    if not ends:
        return None
    arg = _box_argument(text, ends[-1])  # only the last box counts, even when cut off
    return arg.strip() if arg is not None and arg.strip() else None


def _clean_number(sign: str | None, digits: str) -> str:
    """``-1,234.50`` -> ``-1234.5``: commas dropped, trailing decimal zeros dropped."""
    value = digits.replace(",", "")
    if value.startswith("."):
        value = "0" + value
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    if value == "":
        value = "0"
    return ("-" if sign and value != "0" else "") + value


def last_number(text: str | None) -> str | None:
    """The last number in ``text`` with commas, ``$`` and units removed; None if there is none."""
    if not text:
        return None
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    return _clean_number(m.group(1), m.group(2))


def extract_gsm8k(text: str | None) -> str | None:
    """A GSM8K answer: the number after the last ``####`` if present, else the last number."""
    if not text:
        return None
    if "####" in text:
        found = last_number(text.rsplit("####", 1)[1])
        if found is not None:
            return found
    return last_number(text)


def extract_answer(text: str | None, answer_format: str) -> str | None:
    """The final answer of a model output for an answer format: ``boxed`` or ``gsm8k``.

    ``gsm8k`` takes the number in the last box when the model boxed its answer (the CoT
    template asks it to), else the ``#### N`` number, else the last number in the text.
    """
    if answer_format == "boxed":
        return extract_boxed(text)
    if answer_format == "gsm8k":
        boxed = extract_boxed(text)
        if boxed is not None:
            return last_number(boxed) or boxed
        return extract_gsm8k(text)
    raise ValueError(f"answer_format={answer_format!r} is unknown; use 'boxed' or 'gsm8k'")  # internal


_TEXT_UNIT = re.compile(r"\\(?:text|textrm|mbox|mathrm)\{\s*[A-Za-z][A-Za-z .]*\}\s*$")
_STRIP_TOKENS = (
    "\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\displaystyle", "$", "\\$",
)


def normalize_answer(answer: str) -> str:
    """A canonical string form for the fallback comparison (spacing, ``\\dfrac``, units, ...)."""
    s = answer.strip()
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 3" -> "3"
    s = _TEXT_UNIT.sub("", s).strip() or s  # trailing "\text{ cm}"
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("°", "")
    for tok in _STRIP_TOKENS:
        s = s.replace(tok, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    s = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    number = re.fullmatch(r"(-?)(\d+(?:\.\d*)?|\.\d+)", s)
    if number:
        s = _clean_number(number.group(1), number.group(2))
    return s.lower()


def _timeout(seconds: int | None) -> int | None:
    """math-verify times out with SIGALRM, which only works in the main thread."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        return None
    return max(1, int(seconds))


def _as_boxed(answer: str) -> str:
    return "\\boxed{" + answer + "}"


def grade(pred: str | None, ref: str | None, *, timeout_s: int | None = 5) -> bool:
    """True when ``pred`` is equivalent to ``ref``; a missing answer is wrong. Never raises.

    Equal normalised strings count as correct; otherwise ``math_verify.verify`` decides on
    both answers parsed as LaTeX (each step limited to ``timeout_s`` seconds in the main
    thread; elsewhere math-verify's signal-based limit cannot run and is off).
    """
    if pred is None or ref is None or not str(pred).strip() or not str(ref).strip():
        return False
    pred, ref = str(pred), str(ref)
    try:
        if normalize_answer(pred) == normalize_answer(ref):
            return True
    except Exception:  # noqa: BLE001 - normalisation is best effort
        logger.debug("normalisation failed for %r / %r", pred, ref, exc_info=True)
    try:
        from math_verify import parse, verify

        limit = _timeout(timeout_s)
        gold = parse(_as_boxed(ref), parsing_timeout=limit)
        target = parse(_as_boxed(pred), parsing_timeout=limit)
        if not gold or not target:
            return False
        return bool(verify(gold, target, timeout_seconds=limit))
    except Exception:  # noqa: BLE001 - a grader must not crash an evaluation
        logger.debug("math_verify failed on %r vs %r", pred, ref, exc_info=True)
        return False
