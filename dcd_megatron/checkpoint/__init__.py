"""Checkpoints: written atomically with a manifest (`saving`), verified and found (`finding`, `manifest`).

One checkpoint is an `iter_NNNNNNN` directory of megatron-core's distributed checkpoint, the
per-rank RNG states, `meta.json` (the config it was trained with, the step, the data position)
and `manifest.json` (every file's size and sha256). Readers load only what verifies, and hold
what they read against a run rotating its checkpoints (`leases`).
"""

from dcd_megatron.checkpoint import leases
from dcd_megatron.checkpoint.finding import (
    META,
    CheckpointError,
    Selection,
    candidates,
    checkpoint_dir,
    complete_checkpoints,
    find_latest,
    foreign_entries,
    is_ours,
    locate_verified,
    move_aside,
    read_checkpoint_config,
    read_meta,
    resolve_resume,
    select_verified,
    warn_foreign,
)
from dcd_megatron.checkpoint.manifest import MANIFEST, fingerprint, verify, write_manifest
from dcd_megatron.checkpoint.saving import (
    load_checkpoint,
    save_checkpoint,
    start_writer_helpers,
    use_in_process_write_results,
)

__all__ = [
    "META", "MANIFEST", "CheckpointError", "Selection", "candidates", "checkpoint_dir", "complete_checkpoints",
    "find_latest",
    "fingerprint", "foreign_entries", "is_ours", "locate_verified", "move_aside", "read_checkpoint_config", "read_meta",
    "resolve_resume", "select_verified", "warn_foreign", "verify", "write_manifest", "load_checkpoint",
    "save_checkpoint", "start_writer_helpers", "use_in_process_write_results", "leases",
]
