"""The one error type of checkpoint conversion: its message names the problem and the fix."""

from __future__ import annotations

from dcd_megatron.errors import UserError


class ConvertError(UserError, ValueError):
    """A checkpoint cannot be converted as asked; the message says why and what to do."""
