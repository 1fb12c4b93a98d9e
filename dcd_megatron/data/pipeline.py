"""The data entry points the trainer calls: build the token caches (rank 0), then open samples (all ranks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dcd_megatron.data.cache import TokenCache, build_token_cache, token_cache_path
from dcd_megatron.data.config import DataConfig
from dcd_megatron.data.packing import PackedSamples, holdout_split
from dcd_megatron.data.tokenizer import Tokenizer, load_tokenizer


@dataclass(frozen=True)
class DataCaches:
    """Cache directories of the train data and, when a valid_path is set, of the validation data."""

    train: Path
    valid: Path | None


@dataclass
class TraceData:
    """Training and validation samples plus the cache metadata (counts, skip reasons)."""

    train: PackedSamples
    valid: PackedSamples | None
    tokenizer: Tokenizer
    train_meta: dict
    valid_meta: dict | None


def _tokenizer(cfg: DataConfig, tokenizer: Tokenizer | None) -> Tokenizer:
    return tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer, cfg.tokenizer_type)


def build_caches(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> DataCaches:
    """Tokenize train (and valid) data unless cached. Call on one rank, then barrier."""
    cfg.require_sources()
    tok = _tokenizer(cfg, tokenizer)
    train = build_token_cache(cfg.train_path, cfg, tok)
    valid = build_token_cache(cfg.valid_path, cfg, tok, role="data.valid_path") if cfg.valid_path else None
    return DataCaches(train, valid)


def find_caches(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> DataCaches:
    """The cache directories these settings map to (without building them)."""
    cfg.require_sources()
    tok = _tokenizer(cfg, tokenizer)
    train = token_cache_path(cfg.train_path, cfg, tok)
    valid = token_cache_path(cfg.valid_path, cfg, tok) if cfg.valid_path else None
    return DataCaches(train, valid)


def load_trace_data(
    cfg: DataConfig,
    tokenizer: Tokenizer | None = None,
    *,
    caches: DataCaches | None = None,
    build: bool = True,
) -> TraceData:
    """Open (building first when ``build``) the caches and cut them into packed samples.

    With ``valid_fraction`` a deterministic share of the train documents is held out
    (`holdout_split`); with ``valid_path`` the validation file is used; otherwise no validation.
    """
    tok = _tokenizer(cfg, tokenizer)
    if caches is None:
        caches = build_caches(cfg, tok) if build else find_caches(cfg, tok)
    train_cache = TokenCache.open(caches.train)
    valid = None
    valid_meta = None
    if caches.valid is not None:
        valid_cache = TokenCache.open(caches.valid)
        valid = PackedSamples(valid_cache, cfg.seq_length, pack=cfg.pack)
        valid_meta = valid_cache.meta
        train = PackedSamples(train_cache, cfg.seq_length, pack=cfg.pack)
    elif cfg.valid_fraction > 0:
        train_ids, valid_ids = holdout_split(train_cache.doc_rows, cfg.valid_fraction)
        train = PackedSamples(train_cache, cfg.seq_length, pack=cfg.pack, doc_ids=train_ids)
        valid = PackedSamples(train_cache, cfg.seq_length, pack=cfg.pack, doc_ids=valid_ids)
        valid_meta = {"held_out_docs": int(len(valid_ids)), "fraction": cfg.valid_fraction}
    else:
        train = PackedSamples(train_cache, cfg.seq_length, pack=cfg.pack)
    return TraceData(train, valid, tok, train_cache.meta, valid_meta)
