"""Sampling from a causal LM, below every job that samples (`dcd-eval`, `dcd-generate`, the lab).

``rule``: the kept distribution (temperature, top-k, top-p) and one sampling step that returns the
sampled token's log-prob under it. ``generation``: batched, reproducible decoding over a model
callable or a KV-cached decoder.
"""
