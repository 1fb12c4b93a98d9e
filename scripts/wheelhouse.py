"""The offline wheelhouse (docs/offline.md): download, report, and list what an image lacks.

An air-gapped GPU node has an image with torch (NGC PyTorch or any other); this puts the wheels of
the project and of every dependency such an image lacks into one folder, in named sets, each with
a pinned list ``<set>.txt`` that installs with ``pip install --no-index --no-deps``:

- ``core``: the project and what training needs beyond the image (megatron-core, datasets, ...);
- ``image``: what NGC PyTorch has but a bare torch image lacks (numpy, pyarrow, transformers, ...);
- ``mlflow``, ``nemo-run``: the tracking server client and the launcher, optional.

Resolution never fetches torch, the NVIDIA wheels or a set's "provided" packages: they are
stand-in wheels with no dependencies (a local folder, pinned by a constraints file), so pip
resolves the rest as it would on top of the image.

    python scripts/wheelhouse.py build --python-version 3.12 --dest dist/wheelhouse
    python scripts/wheelhouse.py report --dest dist/wheelhouse [--max-mib core=60]
    python scripts/wheelhouse.py missing --dest dist/wheelhouse image   # lines this Python lacks
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

try:  # build and report need packaging; `missing` runs on the image's bare Python, which may lack it
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # pragma: no cover - the project's venv has packaging
    Requirement = None

ROOT = Path(__file__).resolve().parents[1]

# torch and what it brings: an image with torch has them all, so no set lists them. Only torch and
# triton are stand-ins for the resolver (gigabytes with the NVIDIA wheels); the rest are small.
TORCH_STACK = ["torch", "triton", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "filelock", "fsspec",
               "typing-extensions", "setuptools"]
STAND_INS = ["torch", "triton"]
STAND_IN_VERSION = "9999"  # above every lower bound; nothing we depend on caps torch
# What NGC PyTorch ships beyond torch, left out of core; the `image` set carries them (and what only
# they need) for an image without them: the CPU route's torch-only venv, a bare torch image.
IMAGE = ["numpy", "pyarrow", "sentencepiece", "transformers", "tokenizers", "safetensors", "huggingface-hub"]
# The project's dependencies that are separate sets, not core.
OPTIONAL = {"mlflow": ["mlflow"], "nemo-run": ["nemo-run", "leptonai"]}
SETS = ["core", "image", *OPTIONAL]
WHY = {"core": "training (no tracking server, no Transformer Engine)",
       "image": "in NGC PyTorch, not in a bare torch image",
       "mlflow": "MLflow tracking (optional)", "nemo-run": "NeMo-Run launcher (optional)"}


def project_requirements() -> list:
    """The project's dependencies as pyproject.toml lists them."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [Requirement(r) for r in data["project"]["dependencies"]]


def canonical(names) -> set[str]:
    return {canonicalize_name(n) for n in names}


def stand_in_wheel(folder: Path, name: str, version: str, requires_dist: tuple[str, ...] = ()) -> Path:
    """A wheel that installs nothing (and requires nothing, by default): the image's copy of ``name``."""
    dist = re.sub(r"[-.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires_dist)
    files = {f"{info}/METADATA": meta,
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: dcd-wheelhouse\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for member, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{member},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in files.items():
            zf.writestr(member, text)
    return path


def pip(*args: str) -> None:
    """Run pip with this interpreter, ignoring the machine's pip configuration (its indexes and constraints)."""
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for key in ("PIP_CONSTRAINT", "PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def platform_options(platform: str) -> list[str]:
    """``--platform`` for ``manylinux_2_X_ARCH`` and every older manylinux tag (pip does not expand them)."""
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not match:
        return ["--platform", platform]
    glibc, arch = int(match.group(1)), match.group(2)
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc, 4, -1)]
    tags += [alias for minor, alias in ((17, "manylinux2014"), (12, "manylinux2010"), (5, "manylinux1"))
             if minor <= glibc for alias in [f"{alias}_{arch}"]]
    return [opt for tag in tags for opt in ("--platform", tag)]


def download(tmp: Path, tag: str, roots: list[str], pins: dict[str, str], python_version: str,
             platform: str) -> dict[str, Path]:
    """Resolve ``roots`` for the node (torch a stand-in, ``pins`` as constraints); {canonical name: wheel}."""
    stubs, got = tmp / "stand-ins", tmp / f"got-{tag}"
    if not stubs.is_dir():
        stubs.mkdir()
        for name in STAND_INS:
            stand_in_wheel(stubs, name, STAND_IN_VERSION)
    constraints = tmp / f"constraints-{tag}.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    pip("download", "--quiet", "--only-binary=:all:", *platform_options(platform), "--python-version",
        python_version, "--implementation", "cp", "--find-links", str(stubs), "--constraint", str(constraints),
        "--dest", str(got), *roots)
    return {parse_wheel_filename(w.name)[0]: w for w in got.glob("*.whl")}


def closure(start: set[tuple[str, frozenset]], wheels: dict[str, Path], python_version: str,
            stop: set[str]) -> set[str]:
    """The names reachable from ``start`` (name, extras) through the wheels' requirements. A name in
    ``stop`` (the image has it) is not entered, except for what its requested extras add."""
    seen, todo, out = set(), list(start), set()
    while todo:
        name, extras = node = todo.pop()
        if node in seen or name not in wheels:
            continue
        seen.add(node)
        deps = requires(wheels[name], python_version, ("", *extras))
        if name in stop:
            deps -= requires(wheels[name], python_version)
        else:
            out.add(name)
        todo += [d for d in deps if d[0] not in stop or d[1]]
    return out


def build(dest: Path, python_version: str, platform: str, sets: list[str]) -> None:  # long: one resolution per set
    """Download the sets' wheels into ``dest`` and write ``<set>.txt`` for each; the project wheel joins core.

    core and image come from one resolution of the project's non-optional dependencies, so their
    versions agree; mlflow and nemo-run are resolved on top of it (its versions as constraints).
    """
    dest.mkdir(parents=True, exist_ok=True)
    reqs = project_requirements()
    optional, stack, image = canonical(n for ns in OPTIONAL.values() for n in ns), canonical(TORCH_STACK), canonical(IMAGE)
    with tempfile.TemporaryDirectory(prefix="dcd-wheelhouse-") as tmp:
        tmp = Path(tmp)
        pip("wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp / "project"), str(ROOT))
        (project,) = (tmp / "project").glob("*.whl")
        base_roots = [r for r in reqs if canonicalize_name(r.name) not in optional | stack]
        base = download(tmp, "base", [str(r) for r in base_roots], {}, python_version, platform)
        core = closure({(canonicalize_name(r.name), frozenset(r.extras)) for r in base_roots
                        if canonicalize_name(r.name) not in image}, base, python_version, stack | image)
        members = {"core": core, "image": set(base) - core - stack}
        pins = {n: str(parse_wheel_filename(w.name)[1]) for n, w in base.items() if n not in STAND_INS}
        chosen = dict(base)
        for name in [s for s in OPTIONAL if s in sets]:
            roots = [str(r) for r in reqs if canonicalize_name(r.name) in canonical(OPTIONAL[name])]
            got = download(tmp, name, roots, pins, python_version, platform)
            members[name] = set(got) - set(base) - stack
            chosen |= got
        for name in [s for s in SETS if s in sets]:
            lines = [f"{n}=={parse_wheel_filename(chosen[n].name)[1]}" for n in sorted(members[name])]
            for n in members[name]:
                shutil.copy2(chosen[n], dest / chosen[n].name)
            if name == "core":
                shutil.copy2(project, dest / project.name)
                dist, version, _, _ = parse_wheel_filename(project.name)
                lines.insert(0, f"{dist}=={version}")
            (dest / f"{name}.txt").write_text(f"# {WHY[name]}; Python {python_version}, {platform}\n"
                                              + "".join(line + "\n" for line in lines))
            print(f"{name}: {len(lines)} wheels -> {dest / (name + '.txt')}")


def read_set(dest: Path, name: str) -> list[tuple[str, str]]:
    """The (canonical name, version) pins of one set's list."""
    path = dest / f"{name}.txt"
    if not path.exists():
        return []
    pins = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            n, v = line.strip().split("==")
            pins.append((n, v))  # written canonical by build
    return pins


def wheel_index(dest: Path) -> dict[tuple[str, str], Path]:
    index = {}
    for whl in dest.glob("*.whl"):
        dist, version, _, _ = parse_wheel_filename(whl.name)
        index[(dist, str(version))] = whl
    return index


def requires(whl: Path, python_version: str, extras=("",)) -> set[tuple[str, frozenset]]:
    """(canonical name, extras) a wheel requires on Linux x86-64 with that Python, with these of its extras
    (``""``: none)."""
    env = default_environment() | {"python_version": python_version, "python_full_version": python_version + ".0",
                                   "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                                   "implementation_name": "cpython", "platform_python_implementation": "CPython",
                                   "os_name": "posix"}
    with zipfile.ZipFile(whl) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode(errors="replace")
    lines = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]
    out = set()
    for line in lines:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate(env | {"extra": e}) for e in extras):
            out.add((canonicalize_name(req.name), frozenset(req.extras)))
    return out


def report(dest: Path, limits: dict[str, float]) -> int:
    """Print each set's wheels (size, why) and totals; 1 when a set is over its limit in MiB."""
    index = wheel_index(dest)
    header = (dest / "core.txt").read_text().splitlines()[0] if (dest / "core.txt").exists() else ""
    match = re.search(r"Python (\d+\.\d+)", header)
    pyver = match.group(1) if match else f"{sys.version_info.major}.{sys.version_info.minor}"
    roots = {canonicalize_name(r.name) for r in project_requirements()}
    status, grand = 0, 0
    for name in SETS:
        pins = read_set(dest, name)
        if not pins:
            continue
        wheels = {n: index[(n, v)] for n, v in pins if (n, v) in index}
        missing = [f"{n}=={v}" for n, v in pins if (n, v) not in index]
        graph = {m: {d for d, _ in requires(w, pyver)} for m, w in wheels.items() if m != "dcd-megatron"}
        needed_by = {n: sorted(m for m in graph if m != n and n in graph[m]) for n in wheels}
        print(f"\n## {name}: {WHY[name]}")
        print(f"{'MiB':>8}  {'wheel':<72} why")
        total = 0
        for n, w in sorted(wheels.items(), key=lambda kv: -kv[1].stat().st_size):
            size = w.stat().st_size
            total += size
            why = "the project" if n == "dcd-megatron" else ", ".join(
                (["dcd-megatron (pyproject)"] if n in roots else []) + needed_by[n]) or "a root of this set"
            print(f"{size / 2**20:8.2f}  {w.name:<72} {why}")
        grand += total
        line = f"{total / 2**20:8.2f}  total of {name} ({len(wheels)} wheels)"
        if name in limits:
            over = total / 2**20 > limits[name]
            line += f"; limit {limits[name]:g} MiB: {'OVER' if over else 'ok'}"
            status |= int(over)
        print(line)
        for m in missing:
            print(f"  MISSING from {dest}: {m}")
            status = 1
    print(f"\n{grand / 2**20:8.2f}  MiB in {dest} (every set)")
    return status


def lacking(dest: Path, name: str) -> list[str]:
    """The pins of a set whose distribution this interpreter does not have (what an image lacks)."""
    out = []
    for dist, version in read_set(dest, name):
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist}=={version}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download the sets")
    b.add_argument("--dest", type=Path, default=ROOT / "dist" / "wheelhouse")
    b.add_argument("--python-version", default="3.12")
    b.add_argument("--platform", default="manylinux_2_28_x86_64", help="the newest manylinux tag the node takes")
    b.add_argument("--sets", nargs="+", choices=SETS, default=SETS)
    r = sub.add_parser("report", help="each wheel, its size and why it is there")
    r.add_argument("--dest", type=Path, default=ROOT / "dist" / "wheelhouse")
    r.add_argument("--max-mib", action="append", default=[], metavar="SET=MIB", help="fail when a set is larger")
    m = sub.add_parser("missing", help="print the pins of a set this Python lacks")
    m.add_argument("--dest", type=Path, default=ROOT / "dist" / "wheelhouse")
    m.add_argument("set", choices=SETS)
    args = parser.parse_args(argv)
    if args.command == "build":
        try:
            build(args.dest, args.python_version, args.platform, args.sets)
        except subprocess.CalledProcessError as exc:
            print(f"wheelhouse: pip failed (exit code {exc.returncode}, its message above); an optional set that "
                  "cannot resolve on top of core and image can be left out: --sets core image", file=sys.stderr)
            return 1
        return 0
    if not args.dest.is_dir():
        print(f"no wheelhouse at {args.dest}: run `make wheelhouse` first", file=sys.stderr)
        return 2
    if args.command == "report":
        try:
            limits = {k: float(v) for k, v in (item.split("=", 1) for item in args.max_mib)}
        except ValueError:
            print("--max-mib takes SET=MIB, e.g. --max-mib core=60", file=sys.stderr)
            return 2
        return report(args.dest, limits)
    print("\n".join(lacking(args.dest, args.set)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
