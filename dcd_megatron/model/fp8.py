"""FP8 through Transformer Engine: validated at config time, so a bad request fails before launch."""

from __future__ import annotations

import torch

from dcd_megatron.errors import UserError

# Minimum (major, minor) compute capability per recipe, and an exclusive upper bound where a
# recipe is specific to one generation.
_RECIPE_ARCH = {
    "delayed": ((8, 9), None, "Ada/Hopper/Blackwell (sm89+)"),
    "tensorwise": ((8, 9), None, "Ada/Hopper/Blackwell (sm89+)"),
    "blockwise": ((9, 0), (10, 0), "Hopper (sm90)"),
    "mxfp8": ((10, 0), None, "Blackwell (sm100+)"),
}


class FP8Error(UserError, RuntimeError):
    """FP8 was requested where it cannot run; the message says what to change."""


def check_fp8(fp8: str | None, recipe: str, *, has_te: bool, capability: tuple[int, int] | None) -> None:
    """Raise FP8Error unless `fp8` with `recipe` can run with this TE / GPU (None = no GPU)."""
    if fp8 is None:
        return
    if recipe not in _RECIPE_ARCH:
        raise FP8Error(f"model.fp8_recipe={recipe!r} is unknown; use one of {sorted(_RECIPE_ARCH)}")
    if capability is None:
        raise FP8Error(
            f"model.fp8={fp8} needs an NVIDIA GPU, and none is visible; remove model.fp8 "
            "(train in BF16 or FP32) or run on a GPU node"
        )
    if not has_te:
        raise FP8Error(
            f"model.fp8={fp8} needs Transformer Engine, which does not import here; install the "
            "`gpu` extra (pip install 'dcd-megatron[gpu]') or use the NGC container"
        )
    low, high, what = _RECIPE_ARCH[recipe]
    if capability < low or (high is not None and capability >= high):
        raise FP8Error(
            f"model.fp8_recipe={recipe} runs on {what}; this GPU is sm{capability[0]}{capability[1]}. "
            "Use fp8_recipe=delayed or tensorwise (sm89+), blockwise (sm90) or mxfp8 (sm100+)"
        )


def current_capability() -> tuple[int, int] | None:
    """The visible GPU's compute capability, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())
