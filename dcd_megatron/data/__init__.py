"""Trace data: loading (datasets), tokenizers, validation, token cache, packing, batching.

Import cost is small: `datasets` and megatron-core are imported only where used.
"""

from dcd_megatron.data.batches import MicroBatchIterator, ValidationIterator, to_torch
from dcd_megatron.data.cache import CacheError, TokenCache, build_token_cache, token_cache_path
from dcd_megatron.data.config import DataConfig, DataConfigError
from dcd_megatron.data.context_parallel import merge_context_parallel, split_for_context_parallel
from dcd_megatron.data.loading import DataLoadError, load_rows
from dcd_megatron.data.masks import packed_causal_mask, packed_seq_params_from_segments
from dcd_megatron.data.packing import PackedSamples, holdout_split, plan_samples
from dcd_megatron.data.pipeline import DataCaches, TraceData, build_caches, find_caches, load_trace_data
from dcd_megatron.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer, require_same_vocabulary
from dcd_megatron.data.tiny import build_hf_tokenizer, train_sentencepiece
from dcd_megatron.data.validation import BadRowError

__all__ = [
    "BadRowError", "build_hf_tokenizer", "train_sentencepiece", "CacheError", "DataCaches", "DataConfig", "DataConfigError", "DataLoadError",
    "MicroBatchIterator", "PackedSamples", "TokenCache", "Tokenizer", "TokenizerError", "TraceData",
    "ValidationIterator", "build_caches", "build_token_cache", "find_caches", "holdout_split",
    "load_rows", "load_tokenizer", "load_trace_data", "merge_context_parallel",
    "packed_causal_mask", "packed_seq_params_from_segments", "plan_samples",
    "require_same_vocabulary", "split_for_context_parallel", "to_torch", "token_cache_path",
]
