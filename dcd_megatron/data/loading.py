"""Find and load trace rows with `datasets`: JSONL/Parquet files, globs, directories, saved datasets, names.

Each file is loaded on its own (files may differ in their optional columns), so a bad row is
always reported by file and row number. `resolve_sources` only looks at the file system and
gives a cheap fingerprint (path, size, mtime) for the token cache key.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dcd_megatron.data.config import DataConfig
from dcd_megatron.data.validation import BadRowError, SkipCounts
from dcd_megatron.errors import UserError

log = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
CANONICAL_FIELDS = (
    "prompt", "messages", "response", "teacher_logprobs", "student_ref_logprobs",
    "teacher_topk_ids", "teacher_topk_logprobs", "answer",
)


class DataLoadError(UserError, ValueError):
    """The data path cannot be found or read; the message says what was expected."""


def _file_format(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSON_SUFFIXES):
        return "json"
    return None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _stat_fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class SourceSpec:
    """Where rows come from: ``files`` (JSONL/Parquet), ``disk`` (save_to_disk dir) or ``hub`` (a name)."""

    kind: str
    location: str
    files: tuple[Path, ...] = ()

    def fingerprint(self) -> str | None:
        """Size+mtime hash of the files; None for ``hub`` (known only after loading)."""
        if self.kind == "files":
            return _stat_fingerprint(list(self.files))
        if self.kind == "disk":
            root = Path(self.location)
            return _stat_fingerprint(sorted(p for p in root.rglob("*") if p.is_file()))
        return None

    @property
    def short_name(self) -> str:
        """A file-system-safe name for cache directories."""
        stem = Path(self.location.rstrip("/*")).name or "data"
        for suffix in (".gz", ".jsonl", ".json", ".ndjson", ".parquet"):
            stem = stem.removesuffix(suffix)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
        return safe[:48] or "data"


def resolve_sources(path: str) -> SourceSpec:
    """Classify ``path`` as files (a file, a glob, a directory of files), a saved dataset, or a name."""
    if not path:
        raise DataLoadError("empty data path: set data.train_path (or data.valid_path)")
    p = Path(path).expanduser()
    if any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        files = [f for f in files if _file_format(f)]
        if not files:
            raise DataLoadError(f"the glob {path!r} matches no .jsonl/.json/.parquet files")
        return SourceSpec("files", path, tuple(files))
    if p.is_file():
        if _file_format(p) is None:
            raise DataLoadError(
                f"{path}: unknown file type; use one of {', '.join(JSON_SUFFIXES + PARQUET_SUFFIXES)}"
            )
        return SourceSpec("files", str(p), (p,))
    if p.is_dir():
        if _is_saved_dataset(p):
            return SourceSpec("disk", str(p))
        files = sorted(f for f in p.rglob("*") if f.is_file() and _file_format(f))
        if not files:
            raise DataLoadError(
                f"the directory {path} holds no .jsonl/.json/.parquet files and is not a "
                "datasets.save_to_disk directory"
            )
        return SourceSpec("files", str(p), tuple(files))
    if path.startswith((".", "/", "~")) or Path(path).suffix in (".jsonl", ".json", ".parquet"):
        raise DataLoadError(f"{path} does not exist")
    return SourceSpec("hub", path)


@dataclass
class Source:
    """Rows of one file (or one saved/named dataset) and how to name a row in messages."""

    name: str
    dataset: object  # datasets.Dataset
    row_numbers: np.ndarray | None = None  # 1-based original rows when some were dropped at load
    fingerprint: str | None = None
    skipped: SkipCounts = field(default_factory=SkipCounts.empty)

    def where(self, index: int) -> int:
        """1-based row number in the original file of dataset row ``index``."""
        if self.row_numbers is not None:
            return int(self.row_numbers[index])
        return index + 1


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


RAW_JSON_COLUMN = "__dcd_raw_json__"


def _count_rows(path: Path) -> int:
    with _open_text(path) as f:
        return sum(1 for line in f if line.strip())


def _load_json_lines_checked(path: Path, cfg: DataConfig, cause: str) -> Source:
    """Read ``path`` line by line when `datasets` cannot be trusted with it.

    Malformed lines raise (``on_bad_row=error``) or are counted and dropped (``skip``); the
    good lines are kept as raw JSON strings (one column, so no schema inference can fail or
    reshape rows) and decoded row by row during tokenization.
    """
    import datasets

    good_lines: list[str] = []
    good_rows: list[int] = []
    skipped = SkipCounts.empty()
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
                ok = isinstance(value, dict)
                detail = f"expected a JSON object, got {type(value).__name__}"
            except json.JSONDecodeError as exc:
                ok, detail = False, f"not valid JSON ({exc.msg} at column {exc.colno})"
            if ok:
                good_lines.append(line)
                good_rows.append(lineno)
            elif cfg.on_bad_row == "error":
                raise BadRowError(str(path), lineno, "invalid_json", detail)
            else:
                skipped.add("invalid_json", f"{path}: row {lineno}", detail)
    log.info("%s: read line by line (%s)", path, cause)
    if skipped.total:
        log.warning("%s: skipped %d malformed JSON line(s), e.g. %s", path, skipped.total, skipped.examples["invalid_json"])
    ds = datasets.Dataset.from_dict({RAW_JSON_COLUMN: good_lines})
    return Source(str(path), ds, np.asarray(good_rows, dtype=np.int64), skipped=skipped)


def _has_untyped(feature) -> bool:
    """Whether `datasets` stored some column as free JSON (its ``Json`` feature): values of mixed types.

    It decodes such values back from JSON text and loses the difference between ``-0.5`` and
    ``"-0.5"``, so a string log-prob would pass as a number (and a numeric string as a number).
    """
    if type(feature).__name__ == "Json":
        return True
    if isinstance(feature, dict):
        return any(_has_untyped(v) for v in feature.values())
    if isinstance(feature, (list, tuple)):
        return any(_has_untyped(v) for v in feature)
    inner = getattr(feature, "feature", None)
    return inner is not None and _has_untyped(inner)


def _load_file(path: Path, cfg: DataConfig, hf_cache: Path) -> Source:
    import datasets

    fmt = _file_format(path)
    lines = fmt == "json" and not path.name.lower().endswith((".json", ".json.gz"))
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=str(hf_cache))
    except Exception as exc:  # datasets wraps parser errors in DatasetGenerationError
        if lines:
            return _load_json_lines_checked(path, cfg, f"datasets could not parse it: {exc.__cause__ or exc}")
        raise DataLoadError(f"could not load {path} with datasets ({fmt}): {exc} / {exc.__cause__}") from exc
    if lines:
        # datasets' pandas fallback can silently reshape rows (e.g. on 1e999); trust it only
        # when it returns one row per non-blank line, each column of one type
        n_lines = _count_rows(path)
        if n_lines != len(ds):
            return _load_json_lines_checked(path, cfg, f"datasets returned {len(ds)} rows for {n_lines} lines")
        if _has_untyped(ds.features):
            return _load_json_lines_checked(path, cfg, "a column mixes value types")
    elif fmt == "json" and _has_untyped(ds.features):
        raise DataLoadError(
            f"{path}: a column mixes value types (e.g. a string among the teacher_logprobs numbers), which "
            "datasets cannot read faithfully from a .json file; fix the values, or write the rows as JSONL "
            "(one object a line), where each row is checked on its own"
        )
    return Source(str(path), ds)


OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@contextlib.contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """No network call from `datasets` / `huggingface_hub` while local data loads (``offline``).

    `datasets` pings its S3 bucket to count every load of its json/parquet readers and may ask the Hub
    about a path; both are switched off here, at run time (the libraries read the variables at import),
    and in the environment (for tokenizing workers). The download-count ping is off in any case; a Hub
    dataset named by the user (``offline=False``) is fetched as asked. The previous state is restored.
    """
    import datasets
    from huggingface_hub import constants

    saved_env = {name: os.environ.get(name) for name in OFFLINE_ENV}
    saved = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    if offline:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
        os.environ.update({name: "1" for name in OFFLINE_ENV})
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_sources(spec: SourceSpec, cfg: DataConfig, *, hf_cache: Path) -> list[Source]:
    """Load every source of ``spec`` as its own `datasets.Dataset` (no cross-file schema merge);
    with no network call unless ``spec`` names a Hub dataset (`hub_offline`)."""
    with hub_offline(spec.kind != "hub"):
        return _load_sources(spec, cfg, hf_cache)


def _load_sources(spec: SourceSpec, cfg: DataConfig, hf_cache: Path) -> list[Source]:
    import datasets

    if spec.kind == "files":
        return [_load_file(f, cfg, hf_cache) for f in spec.files]
    if spec.kind == "disk":
        ds = datasets.load_from_disk(spec.location)
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise DataLoadError(
                    f"{spec.location} has splits {sorted(ds)}, not {cfg.split!r}: set data.split"
                )
            ds = ds[cfg.split]
        return [Source(spec.location, ds)]
    try:
        ds = datasets.load_dataset(spec.location, split=cfg.split, cache_dir=str(hf_cache))
    except Exception as exc:
        raise DataLoadError(
            f"{spec.location!r} is neither an existing path nor a dataset `datasets` can load "
            f"(split {cfg.split!r}): {exc}"
        ) from exc
    return [Source(spec.location, ds, fingerprint=getattr(ds, "_fingerprint", None))]


def load_rows(path: str, cfg: DataConfig | None = None, *, cache_dir: str | Path | None = None):
    """All rows of ``path`` as one `datasets.Dataset`, configured field names renamed to canonical ones.

    Files must share a schema to be concatenated here; the token cache does not need that.
    """
    import datasets

    cfg = cfg or DataConfig()
    root = Path(cache_dir) if cache_dir else cfg.resolved_cache_dir()
    sources = load_sources(resolve_sources(path), cfg, hf_cache=root / "hf-datasets")
    renames = {getattr(cfg, f"field_{name}"): name for name in CANONICAL_FIELDS}
    parts = []
    for src in sources:
        ds = src.dataset
        mapping = {old: new for old, new in renames.items() if old in ds.column_names and old != new}
        parts.append(ds.rename_columns(mapping) if mapping else ds)
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as exc:
        raise DataLoadError(
            f"the files under {path} have different columns or types and cannot be concatenated "
            f"into one Dataset ({exc}); the token cache (build_caches) reads them file by file"
        ) from exc


def locate_row(path: str, cfg: DataConfig, index: int, *, cache_dir: str | Path) -> tuple[str, int]:
    """(file, row numbered from 1 in that file) of row ``index`` of `load_rows` (for messages: it loads again)."""
    sources = load_sources(resolve_sources(path), cfg, hf_cache=Path(cache_dir) / "hf-datasets")
    for src in sources:
        if index < len(src.dataset):
            return src.name, src.where(index)
        index -= len(src.dataset)
    return path, index + 1
