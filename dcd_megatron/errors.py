"""The one user-error class: anything a user can cause and fix is a `UserError`.

Every command prints a `UserError` as one line (`prog: error: ...`) and exits 2, whatever module
raised it, so a new check needs no entry in any allow-list. This module imports nothing of the
package (ground layer), so every layer can raise these.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or setup the user can fix; the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist."""
