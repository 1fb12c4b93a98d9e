"""Build nested config dataclasses from dicts, YAML files and dotted ``key=value`` overrides.

Every config class validates itself (``validate``, run by ``__post_init__``), so a config built
here is checked once its overrides are in; this module only moves values in and out, converting YAML scalars to the field's declared type and naming the offending key
when a value does not fit.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dcd_megatron.errors import ConfigError  # the ground layer's; re-exported here for old imports

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a config dataclass (tuples become lists, for YAML/MLflow)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} fits none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(value)
    return value


def _did_you_mean(unknown, known, prefix: str = "") -> str:
    """`` (did you mean train.steps?)`` for the known keys closest to the unknown ones, else ""."""
    close = [m for k in unknown for m in difflib.get_close_matches(str(k), [str(n) for n in known], n=1)]
    return f" (did you mean {', '.join(prefix + m for m in close)}?)" if close else ""


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Construct dataclass ``cls`` from a nested dict, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        hint = _did_you_mean(unknown, fields, prefix)
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + str(k) for k in unknown)}{hint}; "
            f"valid keys under {prefix or 'the top level'}: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=100)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({getattr(exc, 'problem', None) or exc}); "
            f"quote it, e.g. {key}='...'"
        ) from None
    return key.split("."), value


def apply_overrides(cfg: T, overrides: list[str] | tuple[str, ...], aliases: dict[str, str] | None = None) -> T:
    """Return a new config with dotted ``key=value`` overrides applied (and re-validated).

    ``aliases`` maps short keys to full dotted paths (``tp`` -> ``parallel.tp``).
    """
    data = to_dict(cfg)
    aliases = aliases or {}
    for item in overrides:
        path, value = _parse_override(item)
        dotted = ".".join(path)
        if dotted in aliases:
            path = aliases[dotted].split(".")
        node = data
        for i, part in enumerate(path[:-1]):
            if not isinstance(node, dict) or part not in node:
                hint = _did_you_mean([part], node if isinstance(node, dict) else (), ".".join(path[:i]) + "." * bool(i))
                raise ConfigError(f"override {item!r}: unknown key {'.'.join(path[: i + 1])}{hint}")
            node = node[part]
        if not isinstance(node, dict) or path[-1] not in node:
            prefix = ".".join(path[:-1]) + "." * (len(path) > 1)
            hint = _did_you_mean([path[-1]], node if isinstance(node, dict) else (), prefix)
            raise ConfigError(f"override {item!r}: unknown key {'.'.join(path)}{hint}")
        node[path[-1]] = value
    return from_dict(type(cfg), data)


def _read_yaml_mapping(p: Path) -> dict:
    """The top-level mapping of a YAML config file; a ConfigError naming the file, line and fix otherwise."""
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; pass a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not text (UTF-8); pass a YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {p} is not valid YAML: {problem}{where}; fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {p}: the top level must be a mapping of sections (model:, data:, train: ...), "
            f"got a {type(data).__name__}"
        )
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides=(), aliases=None) -> T:
    """Load ``cls`` from a YAML file (or its defaults when ``path`` is None), then overrides.

    A problem in the file is a ConfigError naming the file (and the line, for bad YAML).
    """
    if path is None:
        cfg = cls()
    else:
        p = Path(path)
        data = _read_yaml_mapping(p)
        try:
            cfg = from_dict(cls, data)
        except ConfigError as exc:
            raise ConfigError(f"config file {p}: {exc}") from None
    return apply_overrides(cfg, list(overrides), aliases=aliases)
