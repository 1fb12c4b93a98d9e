"""A markdown reference of every config key with its default, read from the dataclasses.

Descriptions come from each field's comment (trailing, or the comment lines just above it), so
the reference cannot drift from the code; `tests/test_config_reference.py` keeps README in sync.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing


def _field_comments(cls) -> dict[str, str]:
    """Field name -> its comment text in the class source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for lineno, line in enumerate(lines, start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0].strip() if ":" in stripped else ""
        if name not in names or name in out:
            continue
        text = comments.get(lineno, "")
        if not text:  # the comment block right above
            block, above = [], lineno - 1
            while above in comments and lines[above - 1].strip().startswith("#"):
                block.insert(0, comments[above])
                above -= 1
            text = " ".join(block)
        out[name] = text
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _fmt(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    return f"`{value}`"


def _type_name(tp) -> str:
    text = str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("|", "\\|")


def reference_rows(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, default, type, description) for every leaf field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = _default(f)
        if dataclasses.is_dataclass(tp) or dataclasses.is_dataclass(default):
            rows += reference_rows(type(default) if default is not None else tp, prefix + f.name + ".")
            continue
        rows.append((prefix + f.name, _fmt(default), _type_name(tp), comments.get(f.name, "")))
    return rows


def reference_markdown(cls) -> str:
    """The config reference as a markdown table, one section per top-level group."""
    rows = reference_rows(cls)
    out = []
    section = None
    for key, default, tp, doc in rows:
        head = key.split(".", 1)[0]
        if head != section:
            section = head
            out += ["", f"#### `{head}`", "", "| key | default | type | meaning |", "| --- | --- | --- | --- |"]
        out.append(f"| `{key}` | {default} | {tp} | {doc} |")
    return "\n".join(out).strip() + "\n"


START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def with_reference(text: str, table: str) -> str:
    """`text` with the block between the START/END markers replaced by `table`."""
    if START not in text or END not in text:
        raise ValueError(f"the file has no {START} ... {END} block")  # internal
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}{END}{tail}"


def main(argv=None) -> int:
    import argparse
    from pathlib import Path

    from dcd_megatron.configs.train import TrainConfig

    parser = argparse.ArgumentParser(description="Print (or write into a file's marked block) the config reference.")
    parser.add_argument("--write", help="a markdown file with the config-reference markers, e.g. README.md")
    args = parser.parse_args(argv)
    table = reference_markdown(TrainConfig)
    if args.write:
        path = Path(args.write)
        path.write_text(with_reference(path.read_text(), table))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
