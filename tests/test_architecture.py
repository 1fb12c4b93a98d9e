"""The layer rule of docs/architecture.md, read from the source: imports point down, no cycles,
and functions short (or saying why not).

Every module of the package belongs to one component (the longest name in `COMPONENTS` that
prefixes it) and every component to a layer. A module may import from its own layer or a
lower one, never a higher one; no two modules, and no two components, import each other
(directly or round a circle). Imports inside functions and under TYPE_CHECKING count too.
"""

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dcd_megatron"

GROUND, PIECES, JOBS, FACES = 0, 1, 2, 3
LAYER_NAMES = {GROUND: "ground", PIECES: "pieces", JOBS: "jobs", FACES: "faces"}
COMPONENTS = {
    # ground: typed configs (and the recipes that fill them)
    "": GROUND, "errors": GROUND, "configs": GROUND, "recipes": GROUND, "data.config": GROUND, "data.templates": GROUND,
    "loss.config": GROUND, "model.config": GROUND, "runtime.layout": GROUND, "tracking.config": GROUND,
    "score.config": GROUND, "generate.config": GROUND,
    # pieces: each does one thing, knows no job
    "runtime": PIECES, "loss": PIECES, "data": PIECES, "model": PIECES, "checkpoint": PIECES, "tracking": PIECES,
    "sampling": PIECES,
    # jobs: each composes the pieces for one job
    "train": JOBS, "score": JOBS, "eval": JOBS, "convert": JOBS, "generate": JOBS,
    # faces: command lines, launchers, the experiments built on the jobs
    "cli": FACES, "eval.cli": FACES, "launch": FACES, "lab": FACES, "convert.tiny": FACES,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _absolute(name: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module of a `from ... import` (relative ones resolved against `name`)."""
    if not node.level:
        return node.module or ""
    package = ["dcd_megatron", *name.split(".")] if name else ["dcd_megatron"]
    if path.name != "__init__.py":
        package = package[:-1]
    package = package[: len(package) - node.level + 1]
    return ".".join(package + ([node.module] if node.module else []))


def _local(target: str) -> str | None:
    """`dcd_megatron.x.y` -> `x.y` when that is a module of the package, else None."""
    if target == "dcd_megatron":
        return ""
    if target.startswith("dcd_megatron.") and target[len("dcd_megatron."):] in MODULES:
        return target[len("dcd_megatron."):]
    return None


def _imports(name: str, path: Path) -> set[str]:
    """The package modules `name` imports; `from pkg import sub` counts as importing `pkg.sub` only."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(_local(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(name, path, node)
            for alias in node.names:
                sub = _local(f"{source}.{alias.name}")
                found.add(sub if sub is not None else _local(source))
    found.discard(None)
    found.discard(name)
    return found


@functools.lru_cache(maxsize=1)
def _graph() -> dict[str, set[str]]:
    return {name: _imports(name, path) for name, path in MODULES.items()}


def _component(module: str) -> str:
    parts = module.split(".") if module else []
    for n in range(len(parts), -1, -1):
        key = ".".join(parts[:n])
        if key in COMPONENTS:
            return key
    raise AssertionError(f"dcd_megatron.{module} is in no component: add it to COMPONENTS in {__file__}")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _label(module: str) -> str:
    return f"dcd_megatron.{module}" if module else "dcd_megatron"


def test_every_module_has_a_layer():
    for module in MODULES:
        _component(module)


def test_imports_point_down():
    upward = []
    for module, imported in _graph().items():
        layer = COMPONENTS[_component(module)]
        for target in sorted(imported):
            if COMPONENTS[_component(target)] > layer:
                upward.append(f"{_label(module)} ({LAYER_NAMES[layer]}) imports {_label(target)} "
                              f"({LAYER_NAMES[COMPONENTS[_component(target)]]})")
    assert not upward, "imports that run up a layer:\n" + "\n".join(upward)


def test_no_module_import_cycles():
    assert not _cycles(_graph()), "modules importing each other (directly or round a circle)"


def test_no_component_import_cycles():
    components: dict[str, set[str]] = {}
    for module, imported in _graph().items():
        mine = _component(module)
        components.setdefault(mine, set()).update(c for c in map(_component, imported) if c != mine)
    assert not _cycles(components), "components importing each other"


def test_the_checker_sees_imports():
    graph = _graph()
    assert "configs.train" in graph["train.loop"]  # a plain `from x import y`
    assert "checkpoint" in graph["train.setup"]  # `from dcd_megatron import checkpoint as ckpt`, in a function
    assert "loss.cp_layout" in graph["loss.weights"]  # `from dcd_megatron.loss import cp_layout`
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


LONG_FUNCTION = 80  # lines; a longer function says why on its `def` line: `# long: <reason>`


def test_functions_are_short_or_say_why():
    long = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONG_FUNCTION and "# long:" not in lines[node.lineno - 1]:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, f"functions over {LONG_FUNCTION} lines without a `# long: reason` on their def line:\n" + "\n".join(long)
