"""Keep secrets out of everything that leaves the process: MLflow params, tags and artifacts,
checkpoint meta.json, the output-dir lock, and the console (`redacted_console`).

A key is secret when one of its name parts says so (``hf_token``, ``db_password``, ``apiKey``;
not ``tokenizer`` or ``max_tokens``). A value is secret when it contains the value of an
environment variable whose name is secret (``HF_TOKEN``, ``WANDB_API_KEY``, ...), or is the
password in a URI's ``user:password@`` part.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

REDACTED = "***REDACTED***"

# Whole name parts (after splitting on non-alphanumerics and camelCase) that mark a secret.
_SECRET_PARTS = frozenset(
    {
        "token",
        "password",
        "passwd",
        "passphrase",
        "secret",
        "apikey",
        "credential",
        "credentials",
        "auth",
        "authorization",
        "privatekey",
    }
)
# Adjacent part pairs that mark a secret when joined (api_key, private_key, access_key...).
_SECRET_PAIRS = frozenset({("api", "key"), ("private", "key"), ("secret", "key"), ("access", "key")})
# Env values shorter than this (or boolean-like) are flags, not secrets: redacting "1" everywhere helps nobody.
_MIN_SECRET_LEN = 6
_FLAG_VALUES = frozenset({"true", "false", "yes", "no", "none", "null", "on", "off"})

_URI_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@")
# ``key: rest of line`` (YAML, INI): a secret key hides the whole rest of its line.
_KEY_LINE = re.compile(
    r"""^(?P<lead>[ \t]*(?:-[ \t]+)?["']?)(?P<key>[A-Za-z_][\w.\-]*)(?P<sep>["']?[ \t]*[:=][ \t]*)(?P<value>[^\s"'].*?)[ \t]*$""",
    re.MULTILINE,
)
# Inline ``key=value`` / ``"key": "value"`` / ``--key=value`` / ``?key=value``: hides one value token.
_KEY_INLINE = re.compile(
    r"""(?<![\w.])(?P<lead>-{0,2}["']?)(?P<key>[A-Za-z_][\w.\-]*)(?P<sep>["']?[ \t]*[:=][ \t]*)(?P<value>"[^"\n]*"|'[^'\n]*'|[^\s,;&?{}\[\]"'][^\s,;&?}\]]*)"""
)
# Command-line ``--secret value`` (space-separated flag and value).
_FLAG_SPACE = re.compile(r"""(?<![\w.])(?P<lead>--?)(?P<key>[A-Za-z_][\w.\-]*)(?P<sep>[ \t]+)(?P<value>[^\s\-]\S*)""")
_EMPTY_VALUES = frozenset({"", "null", "none", "~", REDACTED.lower()})


def _name_parts(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [p for p in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if p]


def looks_secret(name: str) -> bool:
    """True when a config key or environment variable name names a secret."""
    parts = _name_parts(str(name))
    # "token" names a secret at the end of a name (HF_TOKEN, auth_token), not inside one (certain_token_frac)
    if any(p in _SECRET_PARTS for p in parts if p != "token") or parts[-1:] == ["token"]:
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(parts, parts[1:]))


def secret_env_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables with secret names, longest first (so overlaps redact fully)."""
    env = os.environ if env is None else env
    values = {
        v
        for k, v in env.items()
        if looks_secret(k) and v and len(v.strip()) >= _MIN_SECRET_LEN and v.strip().lower() not in _FLAG_VALUES
    }
    return sorted(values, key=len, reverse=True)


def redact_uri(uri: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***REDACTED***@host``."""
    return _URI_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", uri)


def redact_text(text: str, env: Mapping[str, str] | None = None, secrets: Iterable[str] | None = None) -> str:
    """Redact secret env values, URI passwords, and the values of ``secret_key: value``, ``SECRET=value``,
    ``"secret": "value"`` and ``--secret value`` in free text."""
    values = secret_env_values(env) if secrets is None else list(secrets)
    for value in values:
        text = text.replace(value, REDACTED)
    text = redact_uri(text)

    def scrub(m: re.Match) -> str:
        if not looks_secret(m["key"]) or m["value"].strip("\"' ").lower() in _EMPTY_VALUES:
            return m.group(0)
        return f"{m['lead']}{m['key']}{m['sep']}{REDACTED}"

    return _FLAG_SPACE.sub(scrub, _KEY_INLINE.sub(scrub, _KEY_LINE.sub(scrub, text)))


def redact(obj: Any, env: Mapping[str, str] | None = None) -> Any:
    """A copy of a nested dict/list/str structure with every secret replaced by ``***REDACTED***``.

    Keys that look secret lose their (non-empty) value; strings anywhere lose secret env values,
    URI passwords and inline ``key=value`` secrets. ``env`` defaults to ``os.environ``.
    """
    secrets = secret_env_values(env)

    def walk(value: Any) -> Any:
        if isinstance(value, Mapping):
            out = {}
            for k, v in value.items():
                out[k] = _hide(v) if looks_secret(str(k)) else walk(v)
            return out
        if isinstance(value, (list, tuple)):
            return type(value)(walk(v) for v in value)
        if isinstance(value, str):
            return redact_text(value, secrets=secrets)
        return value

    def _hide(value: Any) -> Any:
        # Under a secret key: keep structure, empty values and booleans (no secret in a flag).
        if isinstance(value, Mapping):
            return walk(value)
        if isinstance(value, (list, tuple)):
            return type(value)(_hide(v) for v in value)
        if value is None or value == "" or isinstance(value, bool):
            return value
        return REDACTED

    return walk(obj)


class RedactingStream:
    """A text stream that passes every write through `redact_text` (the secret values read once)."""

    def __init__(self, stream, secrets: list[str]):
        self._stream, self._secrets = stream, secrets

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text, secrets=self._secrets) if isinstance(text, str) else text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_console() -> Iterator[None]:
    """While it lasts, what anything in this process prints to stdout / stderr is redacted
    (MLflow's messages, library warnings, tracebacks); the streams are restored after a normal exit.
    Output written to the file descriptors directly (child processes, C libraries) is not covered."""
    secrets = secret_env_values()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(sys.stdout, secrets), RedactingStream(sys.stderr, secrets)
    yield  # an exception leaves the wrapped streams in place: the traceback printed next is redacted too
    sys.stdout, sys.stderr = saved
