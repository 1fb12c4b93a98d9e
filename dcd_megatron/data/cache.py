"""Tokenize traces once into a memory-mappable, content-keyed cache directory.

Layout of ``<cache_root>/<name>-<key16>/`` (all ``.npy``, opened with ``mmap_mode="r"``):
``tokens`` int32 (all documents concatenated), ``loss_mask`` uint8 (1 on trained response
tokens), ``teacher_logprobs`` float32 (aligned to tokens, NaN where unknown), ``doc_offsets``
int64 [n_docs+1], ``response_start`` int32 (prompt length), ``response_tokens`` int32 (trained
tokens per document), ``doc_rows`` int64 (global source row of each document), and
``meta.json`` (counts and a manifest of every file's size and sampled checksum, written last).
It is built in a ``.tmp-*`` sibling and renamed into place, so a crash (or kill -9) during
tokenisation never leaves a directory that is later trusted; a published cache that no longer
matches its manifest (a truncated or overwritten file, a bad disk) is named in one warning, moved
aside to ``.damaged-*`` and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcd_megatron.data.config import DataConfig
from dcd_megatron.data.encoding import RowEncoder, output_features
from dcd_megatron.data.loading import DataLoadError, Source, load_sources, resolve_sources
from dcd_megatron.data.tokenizer import Tokenizer
from dcd_megatron.data.validation import BadRowError, SkipCounts
from dcd_megatron.errors import UserError
from dcd_megatron.runtime.disk import DISK_ERRNOS
from dcd_megatron.loss.contract import TOPK_KEYS

log = logging.getLogger(__name__)

CACHE_FORMAT = 5  # 2: optional teacher top-k arrays; 3: unknown-character counts; 4: a manifest of the files;
# 5: student_ref_logprobs
ARRAY_NAMES = (
    "tokens", "loss_mask", "teacher_logprobs", "student_ref_logprobs", "doc_offsets",
    "response_start", "response_tokens", "doc_rows",
)
TOPK_ARRAY_NAMES = TOPK_KEYS  # the batch keys of the teacher's top-k; only when data.topk > 0
MIN_ROWS_PER_WORKER = 256  # below this, worker start-up costs more than it saves (auto num_proc only)
_SCAN_BATCH = 4096
_SAMPLE_BLOCKS, _SAMPLE_BYTES = 16, 1 << 16  # the manifest's checksum reads 16 blocks of 64 KiB a file


class CacheError(UserError, RuntimeError):
    """A token cache is missing, incomplete, damaged or cannot be built; the message names it and the fix."""


def _sampled_checksum(path: Path, size: int) -> str:
    """blake2b of `_SAMPLE_BLOCKS` evenly spaced blocks (the whole file when small): cheap at any size."""
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        if size <= _SAMPLE_BLOCKS * _SAMPLE_BYTES:
            digest.update(f.read())
        else:
            for i in range(_SAMPLE_BLOCKS):
                f.seek((size - _SAMPLE_BYTES) * i // (_SAMPLE_BLOCKS - 1))
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def file_manifest(directory: Path) -> dict[str, dict]:
    """{file name: {"bytes", "checksum"}} of a cache's .npy files (meta.json records it, last)."""
    files = {}
    for path in sorted(Path(directory).glob("*.npy")):
        size = path.stat().st_size
        files[path.name] = {"bytes": size, "checksum": _sampled_checksum(path, size)}
    return files


def cache_problem(path: str | Path, checksums: bool = True) -> str | None:
    """What is wrong with the finished cache at `path` against its manifest; None when it verifies.

    Sizes only (a stat a file) with ``checksums=False``; with them, 1 MiB read a file at most.
    """
    path = Path(path)
    try:
        files = json.loads((path / "meta.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"meta.json is unreadable ({type(exc).__name__}: {exc})"
    for name, want in sorted(files.items()):
        try:
            size = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != want["bytes"]:
            return f"{name} is {size} bytes, its manifest says {want['bytes']}"
        if checksums and _sampled_checksum(path / name, size) != want["checksum"]:
            return f"{name} does not match its manifest's checksum"
    return None


def _key_config(cfg: DataConfig, tokenizer: Tokenizer) -> dict:
    return {
        "format": CACHE_FORMAT,
        "tokenizer_model": tokenizer.model_hash,
        "tokenizer_vocab": tokenizer.fingerprint,
        "template": cfg.template_text(),
        "seq_length": cfg.seq_length,
        "add_eos": cfg.add_eos,
        "add_bos": cfg.add_bos,
        "on_long_row": cfg.on_long_row,
        "on_bad_row": cfg.on_bad_row,
        "split": cfg.split,
        "fields": [
            cfg.field_prompt, cfg.field_messages, cfg.field_response, cfg.field_teacher_logprobs,
            cfg.field_teacher_topk_ids, cfg.field_teacher_topk_logprobs, cfg.field_student_ref_logprobs,
            cfg.field_student_ref_checkpoint,
        ],
        "count_fields": list(cfg.count_fields),
        "topk": cfg.topk,
    }


def cache_key(cfg: DataConfig, tokenizer: Tokenizer, source_fingerprint: str) -> str:
    """sha256 of the source fingerprint, the tokenizer and every setting that changes the tokens."""
    payload = json.dumps({"source": source_fingerprint, **_key_config(cfg, tokenizer)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _sources_fingerprint(sources: list[Source]) -> str:
    parts = [f"{s.name}|{s.fingerprint or ''}|{len(s.dataset)}" for s in sources]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass
class TokenCache:
    """A built cache, memory-mapped read-only."""

    path: Path
    tokens: np.ndarray
    loss_mask: np.ndarray
    teacher_logprobs: np.ndarray
    student_ref_logprobs: np.ndarray  # float32, the initial student's log-probs, NaN where unknown
    doc_offsets: np.ndarray
    response_start: np.ndarray
    response_tokens: np.ndarray
    doc_rows: np.ndarray
    meta: dict
    teacher_topk_ids: np.ndarray | None = None  # [tokens, k] int32, -1 where unknown
    teacher_topk_logprobs: np.ndarray | None = None  # [tokens, k] float32, NaN where unknown

    @staticmethod
    def is_complete(path: str | Path) -> bool:
        """True when ``path`` holds a finished cache of this format (``meta.json`` is written last)."""
        meta = Path(path) / "meta.json"
        if not meta.is_file():
            return False
        try:
            return json.loads(meta.read_text()).get("format") == CACHE_FORMAT
        except (json.JSONDecodeError, OSError):
            return False

    @classmethod
    def open(cls, path: str | Path) -> TokenCache:
        """Memory-map a finished cache (``np.load(mmap_mode="r")``); refuses incomplete ones."""
        path = Path(path)
        if not cls.is_complete(path):
            raise CacheError(
                f"no complete token cache at {path} (meta.json missing or of another format); "
                "build it first with dcd_megatron.data.build_caches (rank 0), then open it"
            )
        problem = cache_problem(path, checksums=False)
        if problem:
            raise CacheError(
                f"token cache {path} is damaged: {problem}; run again (rank 0 moves a damaged cache aside "
                "and rebuilds it) or delete that directory"
            )
        meta = json.loads((path / "meta.json").read_text())
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ARRAY_NAMES}
        for name in TOPK_ARRAY_NAMES:
            if (path / f"{name}.npy").is_file():
                arrays[name] = np.load(path / f"{name}.npy", mmap_mode="r")
        return cls(path=path, meta=meta, **arrays)

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.doc_offsets)


def _scan_batches(dataset):
    """Arrow record batches of a mapped dataset (no Python row objects for the token lists)."""
    yield from dataset.with_format("arrow").iter(batch_size=_SCAN_BATCH)


def _workers(cfg: DataConfig, n_rows: int) -> int | None:
    if cfg.num_proc is not None:
        n = min(cfg.num_proc, max(1, n_rows))
    else:
        n = min(cfg.resolved_num_proc(), n_rows // MIN_ROWS_PER_WORKER)
    return n if n > 1 else None


def _tokenize_sources(sources: list[Source], cfg: DataConfig, tokenizer: Tokenizer, work: Path) -> list:
    encoder = RowEncoder(cfg, tokenizer)
    features = output_features(cfg.counted_fields())
    mapped = []
    for i, src in enumerate(sources):
        ds = src.dataset
        workers = _workers(cfg, len(ds))
        if workers:  # HF tokenizers' own thread pool does not survive fork; workers parallelize instead
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        mapped.append(
            ds.map(
                encoder,
                remove_columns=ds.column_names,
                features=features,
                num_proc=workers,
                cache_file_name=str(work / f"tokenized-{i}.arrow"),
                load_from_cache_file=False,
                desc=f"tokenizing {Path(src.name).name}",
            )
        )
    return mapped


def _check_rows(sources: list[Source], mapped: list, cfg: DataConfig, skips: SkipCounts) -> None:
    """Raise on the first bad row under ``error`` policies; count them otherwise."""
    import pyarrow.compute as pc

    for src, ds in zip(sources, mapped):
        start = 0
        for batch in _scan_batches(ds.select_columns(["reason", "detail"])):
            reasons = batch.column("reason")
            bad = np.flatnonzero(pc.not_equal(reasons, "").to_numpy(zero_copy_only=False))
            details = batch.column("detail")
            for j in bad:
                reason, detail = reasons[int(j)].as_py(), details[int(j)].as_py()
                policy = cfg.on_long_row if reason == "too_long" else cfg.on_bad_row
                row = src.where(start + int(j))
                if policy == "error":
                    raise BadRowError(src.name, row, reason, detail)
                skips.add(reason, f"{src.name}: row {row}", detail)
            start += batch.num_rows


def _write_arrays(sources: list[Source], mapped: list, cfg: DataConfig, out: Path) -> dict:
    """Two passes over the tokenized rows: sizes first, then arrays written straight to .npy."""
    import pyarrow.compute as pc

    n_tokens = 0
    n_docs = 0
    for ds in mapped:
        for batch in _scan_batches(ds.select_columns(["input_ids"])):
            lengths = pc.list_value_length(batch.column("input_ids")).to_numpy(zero_copy_only=False)
            n_tokens += int(lengths.sum())
            n_docs += int((lengths > 0).sum())
    if n_docs == 0:
        return {"docs": 0}
    arrays = _open_token_arrays(out, n_tokens, cfg.topk)
    docs = {"lengths": [], "response_start": [], "response_tokens": [], "rows": []}
    stats = Counter()
    counts: dict[str, Counter] = {name: Counter() for name in cfg.counted_fields()}
    unknown = {"chars": 0, "unknown_chars": 0, "by_file": {}, "example": None}
    cursor = 0
    row_base = 0
    for src, ds in zip(sources, mapped):
        row_in_source = 0
        for batch in _scan_batches(ds):
            ids = batch.column("input_ids").combine_chunks()
            lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
            kept = lengths > 0
            cursor += _write_token_block(arrays, cursor, batch, ids, lengths, cfg.topk)
            docs["lengths"].append(lengths[kept])
            docs["response_start"].append(batch.column("response_start").to_numpy(zero_copy_only=False)[kept])
            docs["response_tokens"].append(batch.column("n_trained").to_numpy(zero_copy_only=False)[kept])
            local_rows = row_in_source + np.flatnonzero(kept)
            if src.row_numbers is not None:  # rows were dropped at load: use original row numbers
                local_rows = src.row_numbers[local_rows] - 1
            docs["rows"].append(row_base + local_rows)
            _count_batch(stats, counts, cfg.counted_fields(), batch, kept)
            _count_unknown(unknown, src, row_in_source, batch, kept)
            row_in_source += batch.num_rows
        row_base += row_in_source if src.row_numbers is None else int(src.row_numbers.max(initial=0))
    assert cursor == n_tokens
    for arr in arrays.values():
        arr.flush()
    del arrays
    return {**_write_document_index(out, docs, stats, counts, n_tokens), **_unknown_summary(unknown)}


def _open_token_arrays(out: Path, n_tokens: int, k: int) -> dict[str, np.ndarray]:
    """The per-token .npy files, memory-mapped for writing (the top-k ones only when ``k``)."""
    fmt = np.lib.format
    arrays = {
        "tokens": fmt.open_memmap(out / "tokens.npy", mode="w+", dtype=np.int32, shape=(n_tokens,)),
        "loss_mask": fmt.open_memmap(out / "loss_mask.npy", mode="w+", dtype=np.uint8, shape=(n_tokens,)),
        "teacher_logprobs": fmt.open_memmap(out / "teacher_logprobs.npy", mode="w+", dtype=np.float32, shape=(n_tokens,)),
        "student_ref_logprobs": fmt.open_memmap(out / "student_ref_logprobs.npy", mode="w+", dtype=np.float32,
                                                shape=(n_tokens,)),
    }
    if k:
        ids_name, lp_name = TOPK_ARRAY_NAMES
        arrays[ids_name] = fmt.open_memmap(out / f"{ids_name}.npy", mode="w+", dtype=np.int32, shape=(n_tokens, k))
        arrays[lp_name] = fmt.open_memmap(out / f"{lp_name}.npy", mode="w+", dtype=np.float32, shape=(n_tokens, k))
    return arrays


def _write_token_block(arrays: dict, cursor: int, batch, ids, lengths: np.ndarray, k: int) -> int:
    """One scanned batch's tokens, loss mask, teacher log-probs (and top-k) at ``cursor``; returns their count."""
    import pyarrow.compute as pc

    flat = ids.flatten().to_numpy(zero_copy_only=False)
    n = len(flat)
    arrays["tokens"][cursor : cursor + n] = flat
    rs = batch.column("response_start").to_numpy(zero_copy_only=False).astype(np.int64)
    ntr = batch.column("n_trained").to_numpy(zero_copy_only=False).astype(np.int64)
    local = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    tok_rs, tok_ntr = np.repeat(rs, lengths), np.repeat(ntr, lengths)
    arrays["loss_mask"][cursor : cursor + n] = (local >= tok_rs) & (local < tok_rs + tok_ntr)
    for array, column in (("teacher_logprobs", "teacher"), ("student_ref_logprobs", "reference")):
        has = batch.column(f"has_{column}").to_numpy(zero_copy_only=False)
        block = np.full(n, np.nan, dtype=np.float32)
        if has.any():
            block[np.repeat(has, lengths)] = batch.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        arrays[array][cursor : cursor + n] = block
    if k:
        has_topk = batch.column("topk_ids").combine_chunks()
        flat_ids = has_topk.flatten().to_numpy(zero_copy_only=False)
        flat_lp = batch.column("topk_logprobs").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        with_topk = np.repeat(pc.list_value_length(has_topk).to_numpy(zero_copy_only=False) > 0, lengths)
        ids_block = np.full((n, k), -1, dtype=np.int32)
        lp_block = np.full((n, k), np.nan, dtype=np.float32)
        ids_block[with_topk] = flat_ids.reshape(-1, k)
        lp_block[with_topk] = flat_lp.reshape(-1, k)
        ids_name, lp_name = TOPK_ARRAY_NAMES
        arrays[ids_name][cursor : cursor + n] = ids_block
        arrays[lp_name][cursor : cursor + n] = lp_block
    return n


def _count_batch(stats: Counter, counts: dict[str, Counter], names, batch, kept: np.ndarray) -> None:
    """Truncation, teacher coverage and ``count_fields`` tallies of one scanned batch's kept documents."""
    trunc = batch.column("truncated_tokens").to_numpy(zero_copy_only=False)
    stats["truncated"] += int((trunc > 0).sum())
    stats["truncated_tokens"] += int(trunc.sum())
    stats["with_teacher"] += int(batch.column("has_teacher").to_numpy(zero_copy_only=False)[kept].sum())
    stats["with_reference"] += int(batch.column("has_reference").to_numpy(zero_copy_only=False)[kept].sum())
    stats["with_topk"] += int(batch.column("has_topk").to_numpy(zero_copy_only=False)[kept].sum())
    stats["eos_untrained"] += int(batch.column("eos_untrained").to_numpy(zero_copy_only=False)[kept].sum())
    for name in names:
        values = batch.column(f"meta::{name}").to_pylist()
        counts[name].update(v for v, k in zip(values, kept) if k and v != "")


def _count_unknown(tally: dict, src: Source, row_in_source: int, batch, kept: np.ndarray) -> None:
    """Characters (and those the tokenizer could only encode as its unknown token) of one batch's kept rows."""
    chars = batch.column("chars").to_numpy(zero_copy_only=False)[kept]
    unknown = batch.column("unknown_chars").to_numpy(zero_copy_only=False)
    tally["chars"] += int(chars.sum())
    n = int(unknown[kept].sum())
    if not n:
        return
    tally["unknown_chars"] += n
    tally["by_file"][src.name] = tally["by_file"].get(src.name, 0) + n
    if tally["example"] is None:
        first = int(np.flatnonzero(kept & (unknown > 0))[0])
        tally["example"] = f"{src.name}: row {src.where(row_in_source + first)}"


def _unknown_summary(tally: dict) -> dict:
    return {
        "chars": tally["chars"],
        "unknown_chars": tally["unknown_chars"],
        "unknown_char_fraction": tally["unknown_chars"] / max(1, tally["chars"]),
        "unknown_chars_by_file": dict(sorted(tally["by_file"].items())),
        "unknown_char_example": tally["example"],
    }


def warn_truncated(meta: dict, location: str) -> None:
    """Say on the console how much of the responses ``data.on_long_row=truncate`` cut (not only in meta.json)."""
    if meta.get("truncated"):
        log.warning(
            "%s: %d of %d rows were truncated to data.seq_length (%d response tokens cut from their ends; "
            "raise data.seq_length to keep them, or data.on_long_row=skip to drop such rows)",
            location, meta["truncated"], meta.get("kept", 0), meta.get("truncated_tokens", 0),
        )


def check_unknown_chars(meta: dict, cfg: DataConfig, location: str) -> None:
    """Refuse a cache whose share of unknown-token characters exceeds data.max_unknown_char_frac; warn below it."""
    n, total = meta.get("unknown_chars", 0), meta.get("chars", 0)
    if not n:
        return
    frac = meta.get("unknown_char_fraction", n / max(1, total))
    what = (
        f"{location}: {n} of {total} characters ({frac:.3%}) are not in the tokenizer's vocabulary and "
        f"become its unknown token, which training would learn to predict (first in {meta.get('unknown_char_example')})"
    )
    if frac > cfg.max_unknown_char_frac:
        raise DataLoadError(
            f"{what}; use the tokenizer the traces were written for (data.tokenizer), clean the text, or raise "
            f"data.max_unknown_char_frac (now {cfg.max_unknown_char_frac:g}) to train on them anyway"
        )
    log.warning("%s; accepted (data.max_unknown_char_frac=%g)", what, cfg.max_unknown_char_frac)


def _write_document_index(out: Path, docs: dict, stats: Counter, counts: dict, n_tokens: int) -> dict:
    """The per-document .npy files (offsets, response spans, source rows) and the cache's summary."""
    lengths_all = np.concatenate(docs["lengths"])
    offsets = np.zeros(len(lengths_all) + 1, dtype=np.int64)
    np.cumsum(lengths_all, out=offsets[1:])
    np.save(out / "doc_offsets.npy", offsets)
    np.save(out / "response_start.npy", np.concatenate(docs["response_start"]).astype(np.int32))
    rtok = np.concatenate(docs["response_tokens"]).astype(np.int32)
    np.save(out / "response_tokens.npy", rtok)
    np.save(out / "doc_rows.npy", np.concatenate(docs["rows"]).astype(np.int64))
    return {
        "docs": int(len(lengths_all)),
        "tokens": int(n_tokens),
        "response_tokens": int(rtok.sum()),
        "max_doc_tokens": int(lengths_all.max()),
        "mean_doc_tokens": float(lengths_all.mean()),
        "truncated": stats["truncated"],
        "truncated_tokens": stats["truncated_tokens"],
        "has_teacher_logprobs_fraction": stats["with_teacher"] / len(lengths_all),
        "has_teacher_topk_fraction": stats["with_topk"] / len(lengths_all),
        "has_student_ref_logprobs_fraction": stats["with_reference"] / len(lengths_all),
        "eos_untrained": stats["eos_untrained"],
        "counts": {name: dict(sorted(c.items())) for name, c in counts.items()},
    }


def _source_spec_and_fingerprint(path: str, cfg: DataConfig, root: Path, role: str = "data.train_path"):
    try:
        spec = resolve_sources(path)
    except DataLoadError as exc:  # name the setting that gave the path
        raise DataLoadError(f"{role}: {exc}") from None
    fp = spec.fingerprint()
    sources = None
    if fp is None:  # a dataset name: its fingerprint is known only after loading (from its cache)
        sources = load_sources(spec, cfg, hf_cache=root / "hf-datasets")
        fp = _sources_fingerprint(sources)
    return spec, fp, sources


def token_cache_path(path: str, cfg: DataConfig, tokenizer: Tokenizer, root: Path | None = None) -> Path:
    """Where the cache of ``path`` under these settings lives (built or not)."""
    root = Path(root) if root else cfg.resolved_cache_dir()
    spec, fp, _ = _source_spec_and_fingerprint(path, cfg, root)
    return root / f"{spec.short_name}-{cache_key(cfg, tokenizer, fp)[:16]}"


def _cache_meta(key, spec, sources, n_rows: int, skips, written: dict, tokenizer, cfg: DataConfig, seconds: float,
                out: Path) -> dict:
    """The cache's meta.json (written last: its presence marks the cache complete)."""
    return {
        "format": CACHE_FORMAT,
        "key": key,
        "source": {"kind": spec.kind, "location": spec.location, "files": [s.name for s in sources]},
        "rows": n_rows,
        "kept": written["docs"],
        "skipped": skips.as_dict(),
        "skipped_examples": dict(sorted(skips.examples.items())),
        **{k: v for k, v in written.items() if k != "docs"},
        "tokenizer": {"kind": tokenizer.kind, "path": str(tokenizer.path), "fingerprint": tokenizer.fingerprint,
                      "model_hash": tokenizer.model_hash, "vocab_size": tokenizer.vocab_size,
                      "eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id, "pad_id": tokenizer.pad_id},
        "config": _key_config(cfg, tokenizer),
        "build_seconds": round(seconds, 3),
        "files": file_manifest(out),
    }


def _publish(tmp: Path, final: Path, root: Path) -> bool:
    """Rename the finished ``tmp`` to ``final``; False when another builder's complete cache won the race."""
    if final.exists() and not TokenCache.is_complete(final):
        # not written by this code (renames are atomic), e.g. a partial copy: never trust it
        stale = root / f".stale-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
        log.warning("replaced incomplete token cache directory %s", final)
    try:
        os.rename(tmp, final)
    except OSError:
        if not TokenCache.is_complete(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another builder won the race
        log.info("token cache %s was built concurrently; using it", final)
        return False
    return True


def _damaged(final: Path, root: Path) -> str | None:
    """Move a published cache that fails its manifest aside (one warning line); what was wrong, or None."""
    problem = cache_problem(final)
    if problem is None:
        return None
    aside = root / f".damaged-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(final, aside)
    except FileNotFoundError:  # another rank or run moved it first
        return problem
    log.warning("token cache %s is damaged (%s): moved it aside to %s and rebuilding it (delete that folder)",
                final, problem, aside)
    return problem


def _all_skipped(role: str, location: str, n_rows: int, skips: SkipCounts) -> DataLoadError:
    return DataLoadError(
        f"{role}={location}: no usable rows: all {n_rows} were skipped as bad {skips.as_dict()}, "
        f"e.g. {next(iter(skips.examples.values()), '')}; fix the data or the data.field_* names"
    )


def _rows_to_tokenize(sources: list[Source], skips: SkipCounts, location: str, role: str) -> list[Source]:
    """The sources that hold rows; a path with none at all is a one-line error naming the setting."""
    with_rows = [s for s in sources if len(s.dataset)]
    if with_rows:
        for src in sources:
            if not len(src.dataset) and not src.skipped.total:
                log.warning("%s holds no rows (empty, or only blank lines); nothing read from it", src.name)
        return with_rows
    if skips.total:
        raise _all_skipped(role, location, skips.total, skips)
    use = "validate on" if role == "data.valid_path" else "train on"
    alternative = ", or set data.valid_path=null" if role == "data.valid_path" else ""
    raise DataLoadError(
        f"{role}={location} holds no rows to {use} (the file is empty or only blank lines); point {role} "
        f"at trace rows (JSONL: one JSON object a line){alternative}"
    )


def build_token_cache(
    path: str, cfg: DataConfig, tokenizer: Tokenizer, root: Path | None = None, *, role: str = "data.train_path",
) -> Path:  # long: one atomic build, step by step (load, check, write, publish)
    """Tokenize ``path`` into its cache directory unless a complete one exists; return the directory.

    Idempotent and atomic: concurrent builders each write a private ``.tmp-*`` directory and
    the first rename wins; a leftover ``.tmp-*`` from a crash is never read. ``role`` is the
    setting that named ``path`` (for messages). A path whose share of characters the tokenizer
    cannot encode exceeds ``data.max_unknown_char_frac`` is refused (its cache is kept).
    """
    root = Path(root) if root else cfg.resolved_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    spec, fp, sources = _source_spec_and_fingerprint(path, cfg, root, role)
    key = cache_key(cfg, tokenizer, fp)
    final = root / f"{spec.short_name}-{key[:16]}"
    damaged = _damaged(final, root) if TokenCache.is_complete(final) else None
    if TokenCache.is_complete(final):
        log.info("reusing token cache %s", final)
        meta = json.loads((final / "meta.json").read_text())
        warn_truncated(meta, f"{role}={spec.location}")
        check_unknown_chars(meta, cfg, f"{role}={spec.location}")
        return final
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    t0 = time.time()
    try:
        work = tmp / "work"
        work.mkdir()
        if sources is None:
            sources = load_sources(spec, cfg, hf_cache=root / "hf-datasets")
        skips = SkipCounts.empty()
        for src in sources:
            skips.merge(src.skipped)
        n_rows = sum(len(s.dataset) for s in sources) + sum(s.skipped.total for s in sources)
        with_rows = _rows_to_tokenize(sources, skips, spec.location, role)
        mapped = _tokenize_sources(with_rows, cfg, tokenizer, work)
        _check_rows(with_rows, mapped, cfg, skips)
        written = _write_arrays(with_rows, mapped, cfg, tmp)
        if written["docs"] == 0:
            raise _all_skipped(role, spec.location, n_rows, skips)
        del mapped
        shutil.rmtree(work)
        meta = _cache_meta(key, spec, sources, n_rows, skips, written, tokenizer, cfg, time.time() - t0, tmp)
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if not _publish(tmp, final, root):
            return final
    except OSError as exc:  # a full or read-only disk: one line, naming the cache
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno not in DISK_ERRNOS:
            raise
        again = f"token cache {final} did not verify ({damaged}) and rebuilding it failed" if damaged else (
            f"building token cache {final} failed")
        raise CacheError(f"{again}: {exc}; free space in {root} or point data.cache_dir at a writable disk") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if skips.total:
        log.warning(
            "%s: skipped %d of %d rows: %s (e.g. %s)", spec.location, skips.total, n_rows,
            skips.as_dict(), next(iter(skips.examples.values())),
        )
    log.info(
        "token cache %s: %d docs, %d tokens (%d trained), %d truncated, %.1fs",
        final, meta["kept"], meta["tokens"], meta["response_tokens"], meta["truncated"], meta["build_seconds"],
    )
    warn_truncated(meta, f"{role}={spec.location}")
    check_unknown_chars(meta, cfg, f"{role}={spec.location}")
    return final
