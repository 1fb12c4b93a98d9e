"""User errors a command reports in one line (exit 2) instead of a traceback."""

from __future__ import annotations


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types whose message already names the problem and the fix."""
    from dcd_megatron.checkpoint import CheckpointError
    from dcd_megatron.configs.overrides import ConfigError
    from dcd_megatron.data import BadRowError, DataConfigError, TokenizerError
    from dcd_megatron.data.loading import DataLoadError
    from dcd_megatron.loss import DCDConfigError
    from dcd_megatron.model.fp8 import FP8Error
    from dcd_megatron.runtime.layout import LayoutError
    from dcd_megatron.runtime.output_lock import OutputDirError

    return (
        ConfigError,
        CheckpointError,
        LayoutError,
        OutputDirError,
        FP8Error,
        BadRowError,
        DataConfigError,
        DataLoadError,
        TokenizerError,
        DCDConfigError,
        FileNotFoundError,
    )
