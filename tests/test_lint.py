"""Every shell script in the repository passes shellcheck; the Dockerfile passes hadolint."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def repo_files(pattern: str) -> list[str]:
    """Tracked and untracked-but-not-ignored files matching ``pattern`` (never .venv)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", pattern],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return sorted({p for p in out.splitlines() if (REPO / p).is_file()})


def linter(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is missing from {BIN}: install the dev extra (`pip install -e '.[dev]'`)")
    return str(path)


def test_shell_scripts_pass_shellcheck():
    scripts = repo_files("*.sh")
    assert "slurm/dcd_8node.sh" in scripts
    proc = subprocess.run([linter("shellcheck"), "--external-sources", *scripts], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfiles_pass_hadolint():
    dockerfiles = repo_files("*Dockerfile") + repo_files("*Dockerfile.cpu")
    assert {"containers/Dockerfile", "containers/Dockerfile.cpu"} <= set(dockerfiles)
    proc = subprocess.run([linter("hadolint"), "--failure-threshold", "warning", *dockerfiles], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_file_points_outside_the_repository():
    """Users have the repository only: no file may cite the team's notes folder (a relative `shared/` path)."""
    import re

    pattern = re.compile(r"(?<![\w/.-])shared/")  # an absolute cluster path such as /shared/containers is fine
    me = Path(__file__).resolve().relative_to(REPO).as_posix()
    hits = []
    for path in repo_files("*"):
        if path == me or not path.endswith((".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".txt", ".cfg")):
            continue
        for number, line in enumerate((REPO / path).read_text(errors="replace").splitlines(), start=1):
            if pattern.search(line):
                hits.append(f"{path}:{number}: {line.strip()}")
    assert not hits, "cite docs/ instead:\n" + "\n".join(hits)
