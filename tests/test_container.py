"""Invariants of containers/Dockerfile that no docker engine is needed to check: a pinned NGC
PyTorch base, the image's torch and Transformer Engine kept, the project installed the way CI
installs it (containers/install.sh, shared with the CPU image), a non-root user, and a default
command that exists in the repository. The CPU image is built and run for real by
tests/test_container_build.py (`make test-container`)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "containers" / "Dockerfile"
DOCKERFILE_CPU = REPO / "containers" / "Dockerfile.cpu"
INSTALL = REPO / "containers" / "install.sh"
GPU_STACK = ("torch", "torchvision", "transformer-engine", "transformer_engine", "transformer-engine-torch",
             "triton", "flash-attn", "apex")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not buf.rstrip().endswith("\\"):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def with_install_script(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The steps with each `RUN .../containers/install.sh` followed by the script's commands as RUN steps."""
    out = []
    for kind, args in steps:
        out.append((kind, args))
        if kind == "RUN" and "containers/install.sh" in args:
            out += [("RUN", line) for line in INSTALL.read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    return out


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return with_install_script(instructions(DOCKERFILE.read_text()))


def pip_installs(steps) -> list[list[str]]:
    """The argument lists of every `pip install` in RUN steps."""
    found = []
    for kind, args in steps:
        if kind != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        cmd: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("&&", "||", "|", ";", "&"):
                if "pip" in cmd and "install" in cmd[cmd.index("pip"):]:
                    found.append(cmd[cmd.index("install") + 1:])
                cmd = []
            else:
                cmd.append(token)
    return found


def env_value(steps, key: str) -> str | None:
    value = None
    for kind, args in steps:
        if kind == "ENV":
            for token in shlex.split(args):
                if token.startswith(key + "="):
                    value = token.split("=", 1)[1]
    return value


def test_base_image_is_a_pinned_ngc_pytorch_tag(steps):
    froms = [args for kind, args in steps if kind == "FROM"]
    assert len(froms) == 1, froms
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3(@sha256:[0-9a-f]{64})?", froms[0]), froms[0]
    assert not any(kind == "ARG" for kind, _ in steps[: [k for k, _ in steps].index("FROM")]), \
        "the base tag must be written out, not taken from a build ARG"


def test_torch_and_transformer_engine_are_never_reinstalled(steps):
    installs = pip_installs(steps)
    assert installs, "no pip install found"
    for args in installs:
        names = {re.split(r"[<>=!~\[@ ]", a)[0].lower() for a in args if not a.startswith("-")}
        assert not names & set(GPU_STACK), f"pip install touches the image's GPU stack: {args}"
        assert not {"-U", "--upgrade", "--force-reinstall", "--ignore-installed"} & set(args), args
    runs = " ".join(args for kind, args in steps if kind == "RUN")
    assert "pip uninstall" not in runs
    assert "rm /etc/pip/constraint.txt" not in runs and "constraint.txt && touch" not in runs


def test_constraint_filter_keeps_gpu_pins_and_frees_pure_python_ones(steps, tmp_path):
    """Run the Dockerfile's own grep over a constraint file shaped like NGC's."""
    assert env_value(steps, "PIP_CONSTRAINT") == "/opt/dcd/gpu-stack-constraints.txt"
    run = next(args for kind, args in steps if kind == "RUN" and "/etc/pip/constraint.txt" in args)
    pattern = re.search(r"grep -iE '([^']+)'\s+/etc/pip/constraint\.txt", run).group(1)
    sample = ["torch==2.10.0a0+b4e4ee81d3", "transformer_engine==2.10.0+abc", "triton==3.5.0",
              "nvidia-cudnn-frontend==1.15.0", "numpy==2.1.0", "flash_attn==2.7.4"]
    free = ["mlflow==2.0", "packaging==23.2", "setuptools==70.0", "pyyaml==6.0.1", "datasets==2.0"]
    (tmp_path / "constraint.txt").write_text("\n".join(sample + free) + "\n")
    kept = subprocess.run(["grep", "-iE", pattern, str(tmp_path / "constraint.txt")],
                          capture_output=True, text=True).stdout.split()
    assert kept == sample


def test_project_installed_with_the_extras_ci_installs(steps):
    makefile = (REPO / "Makefile").read_text()
    ci_extras = set(re.findall(r'pip install -q -e "\.\[([\w,]+)\]"', makefile)[0].split(","))
    local = [a for args in pip_installs(steps) for a in args if re.fullmatch(r"\.?/?\[[\w,]+\]|\.", a)]
    assert local, "the project itself is never pip-installed"
    assert set(re.search(r"\[([\w,]+)\]", local[0]).group(1).split(",")) == ci_extras
    kinds = [kind for kind, _ in steps]
    copy_at = next(i for i, (k, a) in enumerate(steps) if k == "COPY" and a.split()[0] == ".")
    install_at = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "./[" in a)
    assert copy_at < install_at and "WORKDIR" in kinds[:install_at]


def test_both_images_share_the_install_steps():
    assert os.access(INSTALL, os.X_OK)
    for dockerfile in (DOCKERFILE, DOCKERFILE_CPU):
        runs = [a for k, a in instructions(dockerfile.read_text()) if k == "RUN"]
        assert sum("${DCD_HOME}/containers/install.sh" in a for a in runs) == 1, dockerfile
    assert (REPO / "containers" / "Dockerfile.cpu.dockerignore").read_text() == \
        (REPO / "containers" / "Dockerfile.dockerignore").read_text()


def test_cpu_image_takes_its_base_from_a_build_arg_defaulting_to_official_python():
    cpu = instructions(DOCKERFILE_CPU.read_text())
    assert cpu[0][0] == "ARG" and re.fullmatch(r"BASE_IMAGE=python:3\.11-slim(-bookworm)?", cpu[0][1]), cpu[0]
    assert cpu[1] == ("FROM", "${BASE_IMAGE}")
    cmd = json.loads(next(a for k, a in cpu if k == "CMD"))
    assert cmd[:3] == ["dcd-train", "--recipe", "tiny_cpu"], cmd


def test_runs_as_non_root_with_an_entrypoint_and_a_default_command_in_the_repo(steps):
    users = [args for kind, args in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    entrypoint = [json.loads(args) for kind, args in steps if kind == "ENTRYPOINT"]
    cmd = [json.loads(args) for kind, args in steps if kind == "CMD"]
    assert len(entrypoint) == 1 and len(cmd) == 1, "exec-form ENTRYPOINT and CMD expected"
    home = env_value(steps, "DCD_HOME")
    assert home and cmd[0][0].startswith(home + "/"), cmd
    script = REPO / cmd[0][0][len(home) + 1:]
    assert script.is_file() and script.stat().st_mode & 0o111, f"{script} must exist and be executable"


def test_build_context_leaves_out_local_environments():
    ignored = (REPO / "containers" / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "mlruns"} <= set(ignored)


@pytest.mark.slow
def test_default_command_resolves_a_valid_config_through_torchrun(tmp_path):
    """The smoke script's torchrun line and overrides are accepted by the real dcd-train."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DCD_NPROC": "1", "DCD_STEPS": "5", "DCD_OUTPUT_DIR": str(tmp_path / "smoke"), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([str(REPO / "scripts" / "container_smoke.sh"), "--print-config"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    banner, _, config_text = proc.stdout.partition("\n")
    assert "0 GPU(s) visible: 1 rank(s), recipe tiny_cpu" in banner
    cfg = yaml.safe_load(config_text)
    assert cfg["train"]["steps"] == 5 and cfg["train"]["output_dir"] == str(tmp_path / "smoke")
    # the script's batch sizing replaced the recipe's: two micro-batches per data-parallel rank
    assert (cfg["train"]["micro_batch_size"], cfg["train"]["global_batch_size"]) == (2, 4)
    assert cfg["runtime"]["device"] == "cpu"
