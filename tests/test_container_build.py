"""The CPU image built and run for real: `containers/Dockerfile.cpu` built with buildah on a Debian
base made here (debootstrap + podman import), its default command (the demo) run inside with
`buildah run`, and the checkpoint and MLflow run it leaves in the mounted output directory checked.

Slow (minutes) and root-only: marked `container`, outside `make test`; `make test-container` runs it
(`.ci/run` installs buildah, podman and debootstrap through apt first). No docker engine and no
registry serving base images are needed: the base is `debootstrap --variant=minbase bookworm`,
cached in DCD_BASE_CACHE (default /var/tmp/dcd-megatron) and in podman's own store between runs.
pip inside the build sees this machine's pip configuration (what `pip config debug` and
`pip config list` name, and /etc/ssl/certs), mounted read-only.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.container, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[1]
STORAGE = ["--storage-driver", "vfs"]
BASE = "localhost/dcd-base:bookworm"
IMAGE = "localhost/dcd-megatron:cpu-test"
CACHE = Path(os.environ.get("DCD_BASE_CACHE", "/var/tmp/dcd-megatron"))
TOOLS = ("buildah", "podman", "debootstrap")


def sh(*cmd, timeout=1800, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def tools():
    if os.geteuid() != 0:
        pytest.skip("buildah/podman with --isolation chroot need root here")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: apt-get install -y buildah podman debootstrap (what .ci/run does)")


def pip_config_mounts() -> list[str]:
    """`--volume SRC:SRC:ro` for this machine's pip configuration: its config files, every local
    path its settings name (find-links, file:// indexes, constraints, cert), and the CA bundle."""
    pip = [sys.executable, "-m", "pip"]
    debug = subprocess.run([*pip, "config", "debug"], capture_output=True, text=True).stdout
    paths = {Path(m) for m in re.findall(r"^\s+(/\S+), exists: True", debug, re.M)}
    listing = subprocess.run([*pip, "config", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        if not re.search(r"(find-links|index-url|constraint|cert|requirement)$", key):
            continue
        for word in value.strip().strip("'\"").split():
            path = Path(word.removeprefix("file://"))
            if path.is_absolute() and path.exists():
                # a simple index (DIR/simple) links to files beside it: mount its parent
                paths.add(path.parent if path.name == "simple" else path)
    paths.add(Path("/etc/ssl/certs"))
    out = []
    for path in sorted(paths):
        if not any(parent in paths for parent in path.parents):  # mounted with a parent already
            out += ["--volume", f"{path}:{path}:ro"]
    return out


@pytest.fixture(scope="module")
def base_image(tools):
    """A Debian bookworm base with python3, made here (no registry serves one to this machine)."""
    if subprocess.run(["podman", *STORAGE, "image", "exists", BASE]).returncode == 0:
        return BASE
    rootfs = CACHE / "rootfs-bookworm"
    if not (rootfs / "usr" / "bin" / "python3").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        rootfs.parent.mkdir(parents=True, exist_ok=True)
        sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip,ca-certificates",
           "bookworm", rootfs, timeout=1200)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    sh("podman", *STORAGE, "import", "-", BASE, stdin=tar.stdout, timeout=900)
    assert tar.wait() == 0
    return BASE


@pytest.fixture(scope="module")
def cpu_image(base_image):
    sh("buildah", *STORAGE, "bud", "--isolation", "chroot", "-f", REPO / "containers" / "Dockerfile.cpu",
       "--ignorefile", REPO / "containers" / "Dockerfile.cpu.dockerignore",
       "--build-arg", f"BASE_IMAGE={base_image}", "--build-arg", "TORCH_INDEX_URL=",
       *pip_config_mounts(), "-t", IMAGE, REPO, timeout=2400)
    yield IMAGE
    subprocess.run(["buildah", *STORAGE, "rmi", "-f", IMAGE], capture_output=True)


def test_cpu_image_builds_and_its_default_command_trains_the_demo(cpu_image, tmp_path):
    import mlflow

    config = json.loads(sh("buildah", *STORAGE, "inspect", "--type", "image", cpu_image).stdout)["OCIv1"]["config"]
    command = (config.get("Entrypoint") or []) + config["Cmd"]
    assert command[:3] == ["dcd-train", "--recipe", "tiny_cpu"], command
    assert config["User"] == "1000:1000", config
    out = tmp_path / "runs"
    out.mkdir()
    out.chmod(0o777)  # the image runs as uid 1000
    container = f"dcd-cpu-test-{os.getpid()}"
    sh("buildah", *STORAGE, "from", "--name", container, cpu_image)
    try:
        proc = sh("buildah", *STORAGE, "run", "--isolation", "chroot", "--volume", f"{out}:/workspace/runs",
                  container, "--", *command, timeout=1200)
    finally:
        subprocess.run(["buildah", *STORAGE, "rm", container], capture_output=True)
    log = proc.stdout + proc.stderr
    assert "step 120/120" in log, log[-3000:]
    assert "UserWarning: Apex is not installed" not in log, log[-3000:]
    run_dir = out / "demo"
    assert (run_dir / "checkpoints" / "iter_0000120").is_dir(), sorted(run_dir.rglob("iter_*"))
    assert json.loads((run_dir / "final_metrics.json").read_text())["step"] == 120
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dcd-demo")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
    losses = client.get_metric_history(runs[0].info.run_id, "loss")
    assert len(losses) == 120 and losses[-1].value < losses[0].value, [m.value for m in losses[:3]]
