"""User errors a command reports in one line (exit 2) instead of a traceback.

Every `dcd_megatron.errors.UserError` is one, whatever module raised it: a new check subclasses
it and needs no entry here. Two more kinds count: `DCDConfigError` (dcd_megatron/loss/config.py,
not yet a UserError subclass) and the OS's own `FileNotFoundError` for a path the user gave.
"""

from __future__ import annotations

import sys

from dcd_megatron.errors import UserError


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types whose message already names the problem and the fix."""
    from dcd_megatron.loss import DCDConfigError

    return (UserError, DCDConfigError, FileNotFoundError)


def report_user_error(prog: str, exc: BaseException, rank: int | None = None) -> int:
    """Print `exc` as the one line `prog: error[ (rank N)]: ...` on stderr; the exit code, 2."""
    where = f" (rank {rank})" if rank is not None else ""
    # one write, not print's two (text, then newline): ranks sharing a pipe each keep their own line
    sys.stderr.write(f"{prog}: error{where}: {exc}\n")
    sys.stderr.flush()
    return 2
