"""The offline wheelhouse's own logic (scripts/wheelhouse.py) and the GPU check's dry run, without a network.

The whole route (download, offline install, 2 training steps) is `make test-offline`, a later stage of .ci/run.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("wheelhouse", REPO / "scripts" / "wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheelhouse)


def test_closure_follows_requested_extras_and_stops_at_what_the_image_has(tmp_path):
    wheels = {
        "a": wheelhouse.stand_in_wheel(tmp_path, "a", "1", ("b>=1", "c[x]", "g; extra == 'cli'")),
        "b": wheelhouse.stand_in_wheel(tmp_path, "b", "1", ("old; python_version < '3.0'",)),
        "c": wheelhouse.stand_in_wheel(tmp_path, "c", "1", ("d; extra == 'x'", "e")),
        "d": wheelhouse.stand_in_wheel(tmp_path, "d", "1"),
        "e": wheelhouse.stand_in_wheel(tmp_path, "e", "1"),
        "g": wheelhouse.stand_in_wheel(tmp_path, "g", "1"),
        "old": wheelhouse.stand_in_wheel(tmp_path, "old", "1"),
    }
    # c is the image's: not listed, nor its own requirement e; but d, which only c[x] needs, is
    assert wheelhouse.closure({("a", frozenset())}, wheels, "3.12", stop={"c"}) == {"a", "b", "d"}
    assert wheelhouse.closure({("a", frozenset())}, wheels, "3.12", stop=set()) == {"a", "b", "c", "d", "e"}


def test_platform_options_name_every_older_manylinux_tag():
    tags = wheelhouse.platform_options("manylinux_2_28_x86_64")[1::2]
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert wheelhouse.platform_options("linux_x86_64") == ["--platform", "linux_x86_64"]


def write_set(dest: Path, name: str, wheels: list[Path]) -> None:
    pins = []
    for w in wheels:
        dist, version, _, _ = wheelhouse.parse_wheel_filename(w.name)
        pins.append(f"{dist}=={version}\n")
    (dest / f"{name}.txt").write_text("# test; Python 3.12, manylinux_2_28_x86_64\n" + "".join(pins))


def test_report_sizes_each_wheel_says_why_and_enforces_the_limit(tmp_path, capsys):
    datasets = wheelhouse.stand_in_wheel(tmp_path, "datasets", "5", ("dill",))
    dill = wheelhouse.stand_in_wheel(tmp_path, "dill", "1")
    write_set(tmp_path, "core", [datasets, dill])
    assert wheelhouse.report(tmp_path, {"core": 1.0}) == 0
    out = capsys.readouterr().out
    assert "dcd-megatron (pyproject)" in out.split("datasets-5")[1].splitlines()[0]
    assert out.split("dill-1")[1].splitlines()[0].strip().endswith("datasets")
    assert "total of core (2 wheels); limit 1 MiB: ok" in out
    assert wheelhouse.report(tmp_path, {"core": 1e-6}) == 1
    assert "OVER" in capsys.readouterr().out
    (tmp_path / dill.name).unlink()
    assert wheelhouse.report(tmp_path, {}) == 1
    assert "MISSING" in capsys.readouterr().out


def test_missing_lists_only_what_this_python_lacks(tmp_path):
    (tmp_path / "image.txt").write_text("# test\npytest==1.0\nno-such-distribution-dcd==2.0\n")
    assert wheelhouse.lacking(tmp_path, "image") == ["no-such-distribution-dcd==2.0"]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "wheelhouse.py"), "missing", "--dest",
                           str(tmp_path / "absent"), "image"], capture_output=True, text=True)
    assert proc.returncode == 2 and "make wheelhouse" in proc.stderr


def test_gpu_check_dry_run_prints_every_part_and_writes_the_table(tmp_path):
    (tmp_path / "wh").mkdir()
    (tmp_path / "wh" / "core.txt").write_text("# test\n")
    env = {**os.environ, "DCD_PYTHON": sys.executable}
    proc = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--wheelhouse", str(tmp_path / "wh"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    for part in ["install", "bf16-dcd", "bf16-sft", "fp8", "train-step", "loss-16k-32k", "decode"]:
        assert f"| {part} | dry-run |" in table
    assert "loss.method=sft" in table and "--preset h100" in table and "--seqs 16384 32768" in table
    limits = [int(row.split("|")[4]) for row in table.splitlines() if "| dry-run |" in row]
    assert sum(limits) <= 480  # under 8 minutes even when every part runs to its limit
    bad = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--bogus"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown argument '--bogus'" in bad.stderr
