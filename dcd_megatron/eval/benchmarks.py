"""Math benchmark loaders (GSM8K, MATH / MATH500, AIME, AMC, OlympiadBench) and prompt templates.

A benchmark is read from a local JSONL / JSON / Parquet file, or by name through ``datasets``
where a user has network (``hf:owner/name[:config][@split]``). Every loader returns a list of
``Problem(id, prompt, reference, meta)``; ``prompt`` is the bare question, a template turns it
into model input. Missing fields raise ``BenchmarkFormatError`` naming file, row (from 1) and fields.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcd_megatron.errors import UserError, UserFileNotFoundError
from dcd_megatron.eval.answers import extract_boxed, extract_gsm8k

# --- prompt templates -------------------------------------------------------------------------

TEMPLATES: dict[str, str] = {
    # The usual math chain-of-thought instruction (Qwen2.5-Math style), with the answer boxed.
    "math_cot": "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    # The synthetic task (and any model trained on raw prompts): the prompt as it is.
    "plain": "{question}",
}


def resolve_template(template: str) -> str:
    """A template by name (``math_cot``, ``plain``) or a literal containing ``{question}``."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{question}" not in template:
        raise BenchmarkFormatError(
            f"template {template!r} is neither a known name ({sorted(TEMPLATES)}) nor a format "
            "string with a {question} field; pass e.g. --template '{question}\\nAnswer:'"
        )
    return template


def render_prompt(question: str, template: str) -> str:
    """The model input for a question under a template (name or format string)."""
    return resolve_template(template).format(question=question)


# --- problems and errors ----------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One benchmark problem: the question text, its reference final answer, extra fields."""

    id: str
    prompt: str
    reference: str
    meta: dict[str, Any] = field(default_factory=dict)


class BenchmarkFormatError(UserError, ValueError):
    """A benchmark file or row does not have the fields its format needs."""


def _field(row: dict, names: Sequence[str], *, source: str, index: int, bench: str, expected: str):
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise BenchmarkFormatError(
        f"{source}: row {index + 1}: no field {' / '.join(repr(n) for n in names)} for benchmark "
        f"{bench!r} (expected fields: {expected}); the row has {sorted(row)}"
    )


def _row_id(row: dict, bench: str, index: int) -> str:
    for name in ("id", "ID", "unique_id", "idx", "problem_id"):
        if row.get(name) not in (None, ""):
            return str(row[name])
    return f"{bench}-{index}"


def _number_text(value: Any) -> str:
    """``36.0`` -> ``"36"``, ``"033"`` -> ``"33"``; other text unchanged."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        return repr(value)
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return str(int(text))
    return text


def _strip_dollars(text: str) -> str:
    text = text.strip()
    while len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text[1:-1].strip()
    return text


# --- row parsers: (row, index, source) -> Problem ---------------------------------------------


def _gsm8k(row: dict, i: int, source: str) -> Problem:
    expected = "'question', 'answer' ending in '#### N'"
    question = _field(row, ["question"], source=source, index=i, bench="gsm8k", expected=expected)
    answer = str(_field(row, ["answer"], source=source, index=i, bench="gsm8k", expected=expected))
    if "####" not in answer:
        raise BenchmarkFormatError(
            f"{source}: row {i + 1}: gsm8k 'answer' has no '#### N' final line; got {answer[-80:]!r}"
        )
    reference = extract_gsm8k(answer)
    if reference is None:
        raise BenchmarkFormatError(f"{source}: row {i + 1}: no number after '####' in {answer[-80:]!r}")
    return Problem(_row_id(row, "gsm8k", i), str(question), reference, {"solution": answer})


def _math(bench: str) -> Callable[[dict, int, str], Problem]:
    def parse(row: dict, i: int, source: str) -> Problem:
        expected = "'problem', and 'answer' or 'solution' with a \\boxed{} answer"
        problem = _field(row, ["problem"], source=source, index=i, bench=bench, expected=expected)
        reference = row.get("answer")
        if reference in (None, ""):
            solution = _field(row, ["solution"], source=source, index=i, bench=bench, expected=expected)
            reference = extract_boxed(str(solution))
            if reference is None:
                raise BenchmarkFormatError(
                    f"{source}: row {i + 1}: {bench} 'solution' has no \\boxed{{}} answer and there is "
                    "no 'answer' field"
                )
        meta = {k: row[k] for k in ("level", "type", "subject") if row.get(k) is not None}
        return Problem(_row_id(row, bench, i), str(problem), _number_text(reference), meta)

    return parse


def _aime(row: dict, i: int, source: str) -> Problem:
    expected = "'problem' or 'Problem', 'answer' or 'Answer' (an integer 0-999)"
    problem = _field(row, ["problem", "Problem"], source=source, index=i, bench="aime", expected=expected)
    answer = _field(row, ["answer", "Answer"], source=source, index=i, bench="aime", expected=expected)
    meta = {k: row[k] for k in ("year", "url", "Year") if row.get(k) is not None}
    return Problem(_row_id(row, "aime", i), str(problem), _number_text(answer), meta)


def _amc(row: dict, i: int, source: str) -> Problem:
    expected = "'problem' (or 'question'), 'answer' (a number)"
    problem = _field(row, ["problem", "question"], source=source, index=i, bench="amc", expected=expected)
    answer = _field(row, ["answer"], source=source, index=i, bench="amc", expected=expected)
    meta = {k: row[k] for k in ("url",) if row.get(k) is not None}
    return Problem(_row_id(row, "amc", i), str(problem), _number_text(answer), meta)


def _olympiadbench(row: dict, i: int, source: str) -> Problem:
    expected = "'question', 'final_answer' (a list of LaTeX answers)"
    question = _field(row, ["question"], source=source, index=i, bench="olympiadbench", expected=expected)
    final = _field(row, ["final_answer"], source=source, index=i, bench="olympiadbench", expected=expected)
    answers = [final] if isinstance(final, str) else list(final)
    if not answers:
        raise BenchmarkFormatError(f"{source}: row {i + 1}: olympiadbench 'final_answer' is empty")
    reference = ", ".join(_strip_dollars(str(a)) for a in answers)
    if row.get("context"):
        question = f"{row['context']}\n{question}"
    keep = ("subfield", "answer_type", "unit", "is_multiple_answer", "error")
    meta = {k: row[k] for k in keep if row.get(k) is not None}
    return Problem(_row_id(row, "olympiadbench", i), str(question), reference, meta)


# --- registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkSpec:
    """How to read one benchmark and how to evaluate it."""

    name: str
    parse_row: Callable[[dict, int, str], Problem]
    answer_format: str  # "boxed" or "gsm8k", see answers.extract_answer
    hf_path: str | None = None  # default `datasets` name (unverified offline, see docs)
    hf_config: str | None = None
    hf_split: str = "test"
    small: bool = False  # also report the mean over n samples at temperature 1 (method.md)
    default_template: str = "math_cot"


BENCHMARKS: dict[str, BenchmarkSpec] = {}


def register_benchmark(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Add (or replace) a benchmark, e.g. a synthetic task with its own row parser."""
    if spec.answer_format not in ("boxed", "gsm8k"):
        raise BenchmarkFormatError(f"{spec.name}: answer_format={spec.answer_format!r}; use 'boxed' or 'gsm8k'")
    BENCHMARKS[spec.name] = spec
    return spec


for _spec in (
    BenchmarkSpec("gsm8k", _gsm8k, "gsm8k", "openai/gsm8k", "main", "test"),
    BenchmarkSpec("math", _math("math"), "boxed", "DigitalLearningGmbH/MATH-lighteval", None, "test"),
    BenchmarkSpec("math500", _math("math500"), "boxed", "HuggingFaceH4/MATH-500", None, "test"),
    BenchmarkSpec("aime", _aime, "boxed", "Maxwell-Jia/AIME_2024", None, "train", small=True),
    BenchmarkSpec("amc", _amc, "boxed", "AI-MO/aimo-validation-amc", None, "train", small=True),
    BenchmarkSpec(
        "olympiadbench", _olympiadbench, "boxed", "Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"
    ),
):
    register_benchmark(_spec)


def get_benchmark(name: str) -> BenchmarkSpec:
    try:
        return BENCHMARKS[name.lower()]
    except KeyError:
        raise BenchmarkFormatError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}") from None


# --- reading rows -----------------------------------------------------------------------------


def read_records(path: str | Path) -> list[dict]:
    """Rows of a local ``.jsonl``, ``.json`` (a list, or columns) or ``.parquet`` file."""
    path = Path(path)
    if not path.is_file():
        raise UserFileNotFoundError(f"benchmark file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise BenchmarkFormatError(
                        f"{path}: line {lineno} is not JSON ({exc}); fix or remove that line"
                    ) from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise BenchmarkFormatError(
                f"{path} is not JSON ({exc}); give a JSON list of rows, or write the rows as JSONL (one a line)"
            ) from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]}
        if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
            lengths = {len(v) for v in data.values()}
            if len(lengths) != 1:
                raise BenchmarkFormatError(f"{path}: columns have different lengths {sorted(lengths)}")
            keys = list(data)
            return [dict(zip(keys, vals, strict=True)) for vals in zip(*data.values(), strict=True)]
        if isinstance(data, list):
            return data
        raise BenchmarkFormatError(
            f"{path}: expected a JSON list of rows or a mapping of columns, got {type(data).__name__}"
        )
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise BenchmarkFormatError(f"{path} is not a readable Parquet file ({exc}); rewrite it") from None
    raise BenchmarkFormatError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")


def _hf_records(source: str, spec: BenchmarkSpec) -> list[dict]:
    """Rows of ``hf:owner/name[:config][@split]`` (or the spec's default) via ``datasets``."""
    ref = source[3:] if source.startswith("hf:") else (spec.hf_path or "")
    if not ref:
        raise BenchmarkFormatError(f"benchmark {spec.name!r} has no default dataset name; give a local file")
    split, config = spec.hf_split, None
    if "@" in ref:
        ref, split = ref.rsplit("@", 1)
    if ":" in ref:
        ref, config = ref.split(":", 1)
    elif ref == spec.hf_path:
        config = spec.hf_config
    import datasets

    return list(datasets.load_dataset(ref, config, split=split))


def load_problems(
    name: str, source: str | Path | None = None, *, limit: int | None = None
) -> list[Problem]:
    """Problems of benchmark ``name`` from a local file, ``hf:...``, or (None) its default dataset."""
    spec = get_benchmark(name)
    if source is None or str(source).startswith("hf:"):
        rows, label = _hf_records(str(source or ""), spec), str(source or spec.hf_path)
    else:
        rows, label = read_records(source), str(source)
    if limit is not None:
        rows = rows[:limit]
    problems = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BenchmarkFormatError(f"{label}: row {i + 1} is a {type(row).__name__}, not an object; give one JSON object a row")
        problems.append(spec.parse_row(row, i, label))
    if not problems:
        raise BenchmarkFormatError(
            f"{label}: no problems for benchmark {name!r} (the file holds no rows); give a file with one "
            "problem a row (JSONL), a JSON list of rows, or a Parquet table"
        )
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        problems = [Problem(f"{p.id}#{i}", p.prompt, p.reference, p.meta) for i, p in enumerate(problems)]
    return problems
