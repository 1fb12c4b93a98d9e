"""What a resume may change, comparing this run's config with the one saved in the checkpoint.

The weights' shapes and vocabulary never change (refused, the fields named). A change of the
data, the loss, the optimiser, the schedule or the model's numerics is refused unless the user
names it in `train.resume_changes` (then it applies, and the run logs it); the parallel
layout may change freely (distributed checkpoints reshard), as may logging, intervals and
paths that do not touch what is learned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dcd_megatron.configs import to_dict
from dcd_megatron.configs.overrides import ConfigError
from dcd_megatron.configs.train import TrainConfig
from dcd_megatron.tracking.redact import redact

# Fields that do not change what the run learns from here on.
FREE = {
    "train.log_interval", "train.eval_interval", "train.eval_iters", "train.save_interval", "train.keep_checkpoints",
    "train.stop_after", "train.output_dir", "train.resume", "train.resume_changes", "train.micro_batch_size",
    "data.cache_dir", "data.num_proc", "data.count_fields", "data.valid_path",
    "model.init_checkpoint", "model.init_method_std",
    "loss.chunk_size",  # the chunked and the full loss are the same numbers (docs/loss.md)
}
FREE_SECTIONS = ("tracking", "runtime", "parallel")
# Explicit groups of the rest (else: the section's name).
GROUP_OF = {"train.steps": "schedule", "train.global_batch_size": "schedule", "train.seed": "data"}


@dataclass
class ResumeCheck:
    """The differences between this config and the checkpoint's, sorted by what they need."""

    refused: list[str] = field(default_factory=list)  # the weights cannot survive these
    by_group: dict[str, list[str]] = field(default_factory=dict)  # need train.resume_changes=[group]
    free: list[str] = field(default_factory=list)  # allowed as they are (noted)

    def unapproved(self, approved: list[str]) -> dict[str, list[str]]:
        if "all" in approved:
            return {}
        return {g: d for g, d in self.by_group.items() if g not in approved}

    def approved(self, approved: list[str]) -> dict[str, list[str]]:
        return {g: d for g, d in self.by_group.items() if "all" in approved or g in approved}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _group(key: str) -> str | None:
    if key in FREE or key.split(".")[0] in FREE_SECTIONS:
        return None
    return GROUP_OF.get(key, key.split(".")[0])


def compare(ours: TrainConfig, theirs: TrainConfig, ours_data: dict | None = None,
            theirs_data: dict | None = None) -> ResumeCheck:
    """Classify every difference between `ours` and the checkpoint's `theirs` (and their data summaries)."""
    check = ResumeCheck(refused=[f"model.{d}" for d in ours.model.shape_differences(theirs.model)])
    refused_keys = {line.split(":")[0] for line in check.refused}
    a, b = _flat(redact(to_dict(ours))), _flat(redact(to_dict(theirs)))  # the checkpoint's is redacted
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        line = f"{key}: {a.get(key)!r} vs {b.get(key)!r}"
        group = _group(key)
        if group is None:
            check.free.append(line)
        elif key not in refused_keys:
            check.by_group.setdefault(group, []).append(line)
    if ours_data and theirs_data:
        _compare_data(check, ours_data, theirs_data)
    return check


def _compare_data(check: ResumeCheck, ours: dict, theirs: dict) -> None:
    """The tokenizer must be the same; the training data's content (docs, tokens) too, unless approved."""
    if ours.get("tokenizer") and theirs.get("tokenizer") and ours["tokenizer"] != theirs["tokenizer"]:
        check.refused.append("the tokenizer's vocabulary (its fingerprint differs: the embedding rows would mean other tokens)")
    keys = ("docs", "tokens", "response_tokens")
    if any(k in theirs for k in keys) and any(ours.get(k) != theirs.get(k) for k in keys):
        ours_s = ", ".join(f"{ours.get(k)} {k}" for k in keys)
        theirs_s = ", ".join(f"{theirs.get(k)} {k}" for k in keys)
        check.by_group.setdefault("data", []).append(f"the training data's content: {ours_s} vs {theirs_s}")


def checked_resume(ours: TrainConfig, theirs: TrainConfig, where: str, ours_data: dict | None = None,
                   theirs_data: dict | None = None) -> ResumeCheck:
    """`compare`, raising a one-line ConfigError for a refused or unapproved difference."""
    check = compare(ours, theirs, ours_data, theirs_data)
    if check.refused:
        raise ConfigError(
            f"cannot resume from {where}: the weights do not fit this config ({'; '.join(check.refused)}: "
            "this config vs the checkpoint); resume with the model section and tokenizer it was saved with "
            "(its meta.json), or start a new train.output_dir"
        )
    missing = check.unapproved(list(ours.train.resume_changes))
    if missing:
        details = "; ".join(line for lines in missing.values() for line in lines)
        groups = ",".join(sorted(missing))
        raise ConfigError(
            f"resuming from {where} would change what the run learns ({details}: this config vs the checkpoint); "
            f"to resume with the change add train.resume_changes=[{groups}] (it is logged to MLflow), "
            "or undo the change, or start a new train.output_dir"
        )
    return check


def change_lines(check: ResumeCheck, approved: list[str]) -> list[str]:
    """The console / MLflow record of what this resume changes."""
    lines = [f"[{group}, approved] {line}" for group, found in check.approved(approved).items() for line in found]
    return lines + [f"[free] {line}" for line in check.free]


__all__ = ["ResumeCheck", "change_lines", "checked_resume", "compare"]
