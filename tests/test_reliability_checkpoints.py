"""Checkpoints that are verified and fall back, foreign entries never followed, resumes that check
what changed (issue items 2, 3 and 5): unit tests on hand-made checkpoints, then a few real runs."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from dcd_megatron.checkpoint import (
    MANIFEST,
    CheckpointError,
    candidates,
    complete_checkpoints,
    locate_verified,
    read_checkpoint_config,
    resolve_resume,
    verify,
    warn_foreign,
    write_manifest,
)
from dcd_megatron.configs import apply_overrides, to_dict
from dcd_megatron.configs.overrides import ConfigError
from dcd_megatron.configs.train import TrainConfig
from dcd_megatron.train.resume import checked_resume, compare


def _fake_checkpoint(root: Path, step: int, cfg: TrainConfig | None = None) -> Path:
    """A checkpoint directory shaped like dcd-train's (shards, .metadata, common.pt, rng, meta, manifest)."""
    path = root / f"iter_{step:07d}"
    (path / "rng").mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(bytes(range(256)) * 8)
    (path / "__0_1.distcp").write_bytes(b"\x01" * 1500)
    (path / ".metadata").write_bytes(b"metadata" * 10)
    (path / "common.pt").write_bytes(b"common")
    (path / "rng" / "rank_00000.pt").write_bytes(b"rng-state")
    config = yaml.safe_dump(to_dict(cfg or TrainConfig()))
    (path / "meta.json").write_text(json.dumps({"step": step, "consumed_samples": 8 * step, "config": config}))
    write_manifest(path)
    return path


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda p: (p / "__0_1.distcp").write_bytes(b"\x01" * 100), "__0_1.distcp is 100 bytes"),
        (lambda p: (p / ".metadata").unlink(), ".metadata is missing"),
        (lambda p: (p / "common.pt").unlink(), "common.pt is missing"),
        (lambda p: (p / "meta.json").write_text('{"step": 4, "con'), "meta.json is"),
        (lambda p: (p / "rng" / "rank_00000.pt").unlink(), "rng/rank_00000.pt is missing"),
        (lambda p: (p / "__0_0.distcp").write_bytes(bytes(reversed(range(256))) * 8), "does not match its sha256"),
        (lambda p: (p / MANIFEST).unlink(), "manifest.json is missing"),
        (lambda p: (p / MANIFEST).write_text("{not json"), "manifest.json is unreadable"),
    ],
    ids=["truncated-shard", "no-metadata", "no-common", "truncated-meta", "no-rng", "flipped-bytes", "no-manifest",
         "bad-manifest"],
)
def test_every_kind_of_damage_is_named_before_loading(tmp_path, damage, needle):
    ckpt = _fake_checkpoint(tmp_path, 4)
    assert verify(ckpt) == []
    damage(ckpt)
    problems = verify(ckpt)
    assert any(needle in p for p in problems), problems


def test_a_file_swapped_for_a_symlink_is_damage(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, 4)
    elsewhere = tmp_path / "elsewhere.pt"
    shutil.copy(ckpt / "common.pt", elsewhere)
    (ckpt / "common.pt").unlink()
    (ckpt / "common.pt").symlink_to(elsewhere)
    assert any("common.pt is a symbolic link" in p for p in verify(ckpt))


def test_split_verification_over_ranks_agrees_with_one_process(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, 4)
    (ckpt / "common.pt").unlink()
    (ckpt / "__0_1.distcp").write_bytes(b"short")
    shares = [verify(ckpt, part=(rank, 3)) for rank in range(3)]
    joined = [p for share in shares for p in share]
    assert sorted(joined) == verify(ckpt) and len(joined) == 2
    assert sum(1 for share in shares if share) >= 1  # each rank checks only its share
    assert verify(ckpt, part=(0, 3), gather=lambda mine: joined) == verify(ckpt)


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 2)
    four = _fake_checkpoint(root, 4)
    six = _fake_checkpoint(root, 6)
    (six / "__0_1.distcp").write_bytes(b"")
    shutil.rmtree(four / "rng")
    selection = resolve_resume("auto", root)
    assert selection.chosen == root / "iter_0000002"
    assert [p for p, _ in selection.rejected] == [six, four]
    lines = selection.fallback_lines()
    assert "iter_0000006 is damaged (__0_1.distcp is 0 bytes" in lines[0] and "falling back to iter_0000002" in lines[0]
    assert "rng/rank_00000.pt is missing" in lines[1]


def test_when_no_checkpoint_verifies_the_error_names_each_and_the_fix(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (_fake_checkpoint(root, step) / "common.pt").unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint under .* verifies \(iter_0000004: common.pt is missing"
                                              r" \| iter_0000002: common.pt is missing\); .*train.resume=never"):
        resolve_resume("auto", root)


def test_an_explicit_iter_dir_that_is_damaged_is_refused_not_swapped(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 2)
    four = _fake_checkpoint(root, 4)
    (four / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="iter_0000004: .metadata is missing"):
        resolve_resume(str(four), root)
    assert resolve_resume(str(tmp_path), tmp_path / "unused").chosen == root / "iter_0000002"  # a run dir falls back


def test_symlinks_and_files_in_checkpoints_are_foreign(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    real = _fake_checkpoint(root, 2)
    victim = _fake_checkpoint(tmp_path / "other-run", 5)
    (root / "iter_0000005").symlink_to(victim, target_is_directory=True)
    (root / "iter_0000007").write_text("not a directory")
    assert complete_checkpoints(root) == [real]
    assert candidates(root) == [real]
    assert resolve_resume("auto", root).chosen == real
    said = []
    assert warn_foreign(root, say=said.append) == [root / "iter_0000005", root / "iter_0000007"]
    assert "iter_0000005 -> " in said[0] and "never loaded or deleted through" in said[0]
    assert victim.is_dir() and verify(victim) == []


def test_readers_verify_too(tmp_path, caplog):
    """dcd-eval, dcd-convert, dcd-score and model.init_checkpoint read through read_checkpoint_config."""
    run = tmp_path / "run"
    _fake_checkpoint(run / "checkpoints", 2)
    four = _fake_checkpoint(run / "checkpoints", 4)
    (four / "common.pt").write_bytes(b"x")
    path, cfg, meta = read_checkpoint_config(run)  # a run dir: the newest that verifies, saying why
    assert path.name == "iter_0000002" and meta["step"] == 2 and isinstance(cfg, TrainConfig)
    assert "iter_0000004 is damaged" in caplog.text
    with pytest.raises(CheckpointError, match="iter_0000004: common.pt is 1 bytes"):
        locate_verified(four)  # one named checkpoint: no silent substitute
    with pytest.raises(FileNotFoundError, match="holds no dcd-train checkpoint"):
        locate_verified(tmp_path / "empty")


def _cfg(*overrides: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), list(overrides))


def test_resume_refuses_what_the_weights_cannot_survive():
    with pytest.raises(ConfigError, match=r"model.hidden_size: 128 vs 64.*resume with the model section"):
        checked_resume(_cfg("model.hidden_size=128", "train.resume_changes=[all]"), _cfg(), "ckpt")
    tokenizer_changed = ({"tokenizer": "a"}, {"tokenizer": "b"})
    with pytest.raises(ConfigError, match="tokenizer's vocabulary"):
        checked_resume(_cfg("train.resume_changes=[all]"), _cfg(), "ckpt", *tokenizer_changed)


@pytest.mark.parametrize(
    "override, group",
    [
        ("data.train_path=other.jsonl", "data"),
        ("data.seq_length=64", "data"),
        ("train.seed=7", "data"),
        ("loss.method=sft", "loss"),
        ("optim.lr=0.01", "optim"),
        ("train.steps=500", "schedule"),
        ("train.global_batch_size=16", "schedule"),
        ("model.hidden_dropout=0.1", "model"),
    ],
)
def test_resume_changes_need_the_switch_naming_their_group(override, group):
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}.*train.resume_changes=\[{group}\]"):
        checked_resume(_cfg(override), _cfg(), "ckpt")
    check = checked_resume(_cfg(override, f"train.resume_changes=[{group}]"), _cfg(), "ckpt")
    assert list(check.by_group) == [group]


def test_same_path_other_content_is_a_data_change():
    ours = {"tokenizer": "t", "docs": 77, "tokens": 4000, "response_tokens": 3000}
    theirs = {"tokenizer": "t", "docs": 154, "tokens": 8000, "response_tokens": 6000}
    with pytest.raises(ConfigError, match=r"the training data's content: 77 docs.* vs 154 docs.*\[data\]"):
        checked_resume(_cfg(), _cfg(), "ckpt", ours, theirs)
    assert compare(_cfg(), _cfg(), ours, dict(ours)).by_group == {}


def test_layout_logging_and_paths_change_freely():
    ours = _cfg("parallel.tp=2", "train.log_interval=1", "train.output_dir=/elsewhere", "tracking.experiment=x",
                "data.cache_dir=/tmp/c", "runtime.num_threads=3", "train.stop_after=5", "loss.chunk_size=0")
    check = checked_resume(ours, _cfg(), "ckpt")
    assert check.by_group == {} and check.refused == [] and len(check.free) == 8


# --- readers never race a rotating run (issue "No traceback left", item 3) ---------------------


def test_a_held_checkpoint_outlives_rotation_until_its_reader_lets_go(tmp_path, caplog):
    from dcd_megatron.checkpoint import leases
    from dcd_megatron.checkpoint.saving import _after_save

    root = tmp_path / "run" / "checkpoints"
    one, two, three = (_fake_checkpoint(root, s) for s in (1, 2, 3))
    assert locate_verified(one, hold=True) == one  # dcd-eval reading the oldest one
    _after_save(root, three, keep=1)  # the trainer saved step 3: 1 and 2 are due to go
    assert one.is_dir() and not two.exists() and three.is_dir()
    assert "kept iter_0000001 for now: a reader" in caplog.text
    leases.release(one)
    _after_save(root, three, keep=1)
    assert [p.name for p in complete_checkpoints(root)] == ["iter_0000003"]
    assert not (root / leases.LEASES).exists()  # nothing left behind once no one reads
    assert (root / "latest").read_text() == "iter_0000003"


def test_a_lease_is_only_verification_long_unless_held(tmp_path):
    from dcd_megatron.checkpoint.saving import _after_save

    root = tmp_path / "run" / "checkpoints"
    one, two = _fake_checkpoint(root, 1), _fake_checkpoint(root, 2)
    assert read_checkpoint_config(one)[0] == one  # reading the config alone holds nothing afterwards
    _after_save(root, two, keep=1)
    assert not one.exists()


def test_a_checkpoint_removed_before_its_lease_is_passed_over(tmp_path, monkeypatch):
    from dcd_megatron.checkpoint import leases

    root = tmp_path / "run" / "checkpoints"
    _fake_checkpoint(root, 2)
    four = _fake_checkpoint(root, 4)
    real_take = leases.take

    def rotated_first(path, *args):  # the trainer removes iter 4 between the listing and the lease
        if path == four and four.exists():
            shutil.rmtree(four)
        return real_take(path, *args)

    monkeypatch.setattr(leases, "take", rotated_first)
    assert locate_verified(tmp_path / "run").name == "iter_0000002"
    four = _fake_checkpoint(root, 4)
    with pytest.raises(CheckpointError, match=r"iter_0000004 was removed before it could be read .*pass the run's "
                                              r"output_dir to read its newest checkpoint"):
        locate_verified(four)


def test_a_reader_that_cannot_take_a_lease_says_so(tmp_path, monkeypatch, caplog):
    from dcd_megatron.checkpoint import leases

    root = tmp_path / "run" / "checkpoints"
    two = _fake_checkpoint(root, 2)

    def read_only(path, flags):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(leases, "_open", read_only)
    assert locate_verified(root, hold=True) == two
    assert f"reading {two} without a read lease ({root / leases.LEASES} is not writable here (Permission denied))" \
        in caplog.text
    converted = tmp_path / "converted"  # a dcd-convert output is never rotated: no lease, no warning
    shutil.copytree(two, converted)
    caplog.clear()
    assert locate_verified(converted, hold=True) == converted and "lease" not in caplog.text
