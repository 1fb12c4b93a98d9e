"""What evaluation needs from a trained model: a causal LM callable plus its tokenizer.

The integrator's checkpoint loader returns an ``EvalModel``; tests use ``eval.fake``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dcd_megatron.eval.generation import IncrementalDecoder, ModelFn


@dataclass
class EvalModel:
    """A model ready for ``generate``: logits callable (or KV-cached decoder) and text <-> ids.

    ``encode`` must add whatever the model expects at the start (e.g. BOS, a chat template);
    ``decode`` turns generated ids (eos already stripped) back into text.
    """

    model: ModelFn | IncrementalDecoder
    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    eos_id: int | Sequence[int] | None
    device: str | torch.device = "cpu"
    pad_id: int = 0
    name: str = "model"
