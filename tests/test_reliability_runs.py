"""Real tiny runs (in this process: no interpreter start-up per run) against damaged checkpoints,
foreign entries in checkpoints/ and resumes that change the config (issue items 2, 3, 5)."""

import json
import shutil

import pytest

from tests.train_helpers import losses, metrics, train_command

pytestmark = [pytest.mark.megatron, pytest.mark.slow]


def _train(out, overrides, capsys, monkeypatch):
    """dcd-train's own path (resolve_config -> run_config) in this process; (exit code, its output)."""
    from dcd_megatron.cli.train import parse_args, resolve_config, run_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out.parent / 'mlflow.db'}")
    capsys.readouterr()
    rc = run_config(resolve_config(parse_args(train_command(out, overrides)[3:])))
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints at 2 and 4 (copied by each test that damages it)."""
    pytest.importorskip("megatron.core")
    out = tmp_path_factory.mktemp("trained") / "run"
    monkeypatch = pytest.MonkeyPatch()
    try:
        from dcd_megatron.cli.train import parse_args, resolve_config, run_config

        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out.parent / 'mlflow.db'}")
        assert run_config(resolve_config(parse_args(train_command(out, ["train.steps=4", "train.save_interval=2"])[3:]))) == 0
    finally:
        monkeypatch.undo()
    return out


def _copy(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out, symlinks=True)
    shutil.copytree(trained.parent / "cache", tmp_path / "cache")
    return out


def _shard(checkpoint):
    """The name of a model/optimizer shard file (megatron-core versions name and split them differently)."""
    return sorted(p.name for p in checkpoint.glob("*.distcp"))[-1]


def test_a_damaged_newest_checkpoint_falls_back_and_the_run_goes_on_identically(trained, tmp_path, capsys, monkeypatch):
    out = _copy(trained, tmp_path)
    ckpts = out / "checkpoints"
    shard = _shard(ckpts / "iter_0000004")
    (ckpts / "iter_0000004" / shard).write_bytes(b"\0" * 10)  # truncated shard (EOFError deep in a load)
    rc, log = _train(out, ["train.steps=4", "train.save_interval=2"], capsys, monkeypatch)
    assert rc == 0, log[-3000:]
    assert f"iter_0000004 is damaged ({shard} is 10 bytes" in log and "falling back to iter_0000002" in log
    assert "resumed from" in log and "iter_0000002 at step 2" in log
    assert (ckpts / "iter_0000004.damaged-1" / shard).stat().st_size == 10  # kept for inspection
    before, after = losses(trained), losses(out)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]  # steps 3-4 again, each recorded once
    for step in (3, 4):
        assert after[step] == pytest.approx(before[step], rel=1e-6, abs=1e-7)


def test_no_checkpoint_that_verifies_stops_with_one_line(trained, tmp_path, capsys, monkeypatch):
    out = _copy(trained, tmp_path)
    for step in (2, 4):
        (out / "checkpoints" / f"iter_{step:07d}" / ".metadata").unlink()
    rc, log = _train(out, ["train.steps=6"], capsys, monkeypatch)
    assert rc == 2
    (line,) = [x for x in log.splitlines() if x.startswith("dcd-train: error")]
    assert "no checkpoint under" in line and "iter_0000004: .metadata is missing" in line and "train.resume=never" in line
    assert "Traceback" not in log


def test_another_architecture_is_refused_before_megatron_sees_it(trained, tmp_path, capsys, monkeypatch):
    out = _copy(trained, tmp_path)
    rc, log = _train(out, ["train.steps=4", "model.hidden_size=128"], capsys, monkeypatch)
    assert rc == 2 and "Traceback" not in log and "CheckpointingException" not in log
    assert "the weights do not fit this config (model.hidden_size: 128 vs 64" in log


def test_other_data_is_refused_unless_asked_for_and_then_logged(trained, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    out = _copy(trained, tmp_path)
    rows = (out.parent / "half.jsonl")
    source = json.loads((out / "checkpoints" / "iter_0000004" / "meta.json").read_text())["config"]
    train_path = next(line.split(": ", 1)[1] for line in source.splitlines() if line.strip().startswith("train_path:"))
    lines = open(train_path.strip().strip("'\"")).read().splitlines()
    rows.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    change = [f"data.train_path={rows}", "train.steps=6"]
    rc, log = _train(out, change, capsys, monkeypatch)
    assert rc == 2 and "would change what the run learns" in log
    assert "data.train_path" in log and "train.resume_changes=[data,schedule]" in log
    rc, log = _train(out, [*change, "train.resume_changes=[data,schedule]"], capsys, monkeypatch)
    assert rc == 0, log[-3000:]
    assert "resume changes [data, approved] data.train_path" in log
    client = MlflowClient(f"sqlite:///{out.parent / 'mlflow.db'}")
    run_id = (out / "mlflow_run_id").read_text().strip()
    names = {a.path for a in client.list_artifacts(run_id, "config")}
    assert "config/resume-changes-step-4.txt" in names, names


def test_links_in_checkpoints_are_never_loaded_or_deleted_through(trained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "fresh"
    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True)
    victim_ckpt = trained / "checkpoints" / "iter_0000002"  # a real checkpoint of another run
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    (victim_dir / "precious.txt").write_text("keep me")
    (ckpts / "iter_0000001").symlink_to(victim_ckpt, target_is_directory=True)
    (ckpts / "iter_0000002").symlink_to(victim_dir, target_is_directory=True)
    shutil.copytree(trained.parent / "cache", tmp_path / "cache")
    rc, log = _train(out, ["train.steps=2"], capsys, monkeypatch)
    assert rc == 0, log[-3000:]
    assert "resumed from" not in log  # started from scratch: the link to another run is not ours
    assert f"ignoring {ckpts / 'iter_0000001'} -> {victim_ckpt}" in log
    assert (victim_dir / "precious.txt").read_text() == "keep me" and victim_ckpt.is_dir()
    saved = ckpts / "iter_0000002"
    assert saved.is_dir() and not saved.is_symlink() and (saved / "manifest.json").is_file()
    assert (ckpts / "iter_0000002.foreign-1").is_symlink()  # moved aside, not followed


def test_dcd_eval_and_dcd_convert_refuse_a_damaged_checkpoint_in_one_line(trained, tmp_path, capsys):
    from dcd_megatron.cli.convert import main as convert_main
    from dcd_megatron.eval.cli import main as eval_main

    out = _copy(trained, tmp_path)
    newest = out / "checkpoints" / "iter_0000004"
    (newest / ".metadata").unlink()  # megatron: "AssertionError: metadata is None"
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n")
    capsys.readouterr()
    assert convert_main(["mcore-to-hf", "--checkpoint", str(newest), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "iter_0000004" in x]  # one line (beside the TE/Apex notice)
    assert ".metadata is missing" in line and "Traceback" not in err
    rc = eval_main(["--benchmark", f"gsm8k={bench}", "--checkpoint", str(newest), "--no-mlflow", "--no-progress",
                    "--output-dir", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert rc == 2 and "iter_0000004: .metadata is missing" in err and "Traceback" not in err


def test_a_run_whose_lock_was_taken_over_stops_before_writing_a_checkpoint(trained, tmp_path, capsys, monkeypatch):
    from dcd_megatron.runtime import output_lock

    out = _copy(trained, tmp_path)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    monkeypatch.setattr(output_lock.OutputLock, "held", lambda self: False)  # as if another run took the directory
    rc, log = _train(out, ["train.steps=6", "train.resume_changes=[schedule]"], capsys, monkeypatch)
    assert rc == 2 and "was taken over by another run" in log and "without writing a checkpoint" in log
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_resume_never_does_not_write_a_new_run_over_an_old_one(trained, tmp_path, capsys, monkeypatch):
    out = _copy(trained, tmp_path)
    record = (out / "metrics.jsonl").read_text()
    rc, log = _train(out, ["train.steps=4", "train.resume=never"], capsys, monkeypatch)
    assert rc == 2 and "already holds a run (checkpoints up to iter_0000004, metrics.jsonl)" in log
    assert (out / "metrics.jsonl").read_text() == record
