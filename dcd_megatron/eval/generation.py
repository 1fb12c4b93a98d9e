"""`dcd-eval`'s generation: the shared sampler of `dcd_megatron.sampling` (one rule for eval and dcd-generate)."""

from dcd_megatron.sampling.generation import (  # noqa: F401  (re-exported for the eval job and its users)
    IncrementalDecoder,
    ModelFn,
    RecomputeDecoder,
    generate,
    strip_eos,
)
from dcd_megatron.sampling.rule import next_tokens  # noqa: F401
