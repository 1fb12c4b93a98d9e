"""The distribution-corrected loss: vocab-parallel log-probs, the weight family, the Megatron loss function.

Layout: per-token tensors are ``[b, s]`` (batch first); logits are ``[b, s, V/tp]``.
Nothing here imports megatron-core: process groups are passed in. See docs/loss.md.
"""

from dcd_megatron.loss.config import METHODS, DCDConfig, DCDConfigError
from dcd_megatron.loss.global_norm import global_weight_factor, rescale_grads_for_global_weight_mean
from dcd_megatron.loss.logprobs import vocab_parallel_logprobs
from dcd_megatron.loss.loss_func import DCDLossFunction, TokenTerm, make_loss_func, nll_term
from dcd_megatron.loss.report import reduce_reports
from dcd_megatron.loss.weights import dcd_weights, normalize_weights

__all__ = [
    "METHODS",
    "DCDConfig",
    "DCDConfigError",
    "DCDLossFunction",
    "TokenTerm",
    "dcd_weights",
    "global_weight_factor",
    "make_loss_func",
    "nll_term",
    "normalize_weights",
    "reduce_reports",
    "rescale_grads_for_global_weight_mean",
    "vocab_parallel_logprobs",
]
