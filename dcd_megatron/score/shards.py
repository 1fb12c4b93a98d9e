"""The scored dataset on disk: shards written atomically, a manifest for safe resumption, a merge.

    OUT/score_manifest.json       the settings of the run (a rerun must match them)
    OUT/shards/part-00007.parquet  rows [7 * R, 8 * R) of the input, scored (written via .tmp + rename)
    OUT/shards/part-00007.json     that shard's skipped-row counts
    OUT/scored.parquet             all shards in input order (written last; the shards are then removed)
    OUT/score_summary.json         counts and settings of the finished run
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

MANIFEST = "score_manifest.json"
SUMMARY = "score_summary.json"
SCORED = "scored.parquet"


def shard_ranges(n_rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges; the last one may be short."""
    return [(s, min(s + rows_per_shard, n_rows)) for s in range(0, n_rows, rows_per_shard)]


def my_shards(n_shards: int, dp_rank: int, dp_size: int) -> list[int]:
    """Shards of one data-parallel rank (round robin, so ranks finish together)."""
    return list(range(dp_rank, n_shards, dp_size))


def shard_path(out: Path, index: int) -> Path:
    return Path(out) / "shards" / f"part-{index:05d}.parquet"


def is_done(out: Path, index: int) -> bool:
    return shard_path(out, index).is_file()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_shard(out: Path, index: int, table, skipped: dict[str, int]) -> Path:
    """Write one shard: its skip counts, then the Parquet file under a temporary name, renamed last."""
    import pyarrow.parquet as pq

    path = shard_path(out, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(path.with_suffix(".json"), json.dumps(skipped))
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def check_manifest(out: Path, manifest: dict, *, name: str = MANIFEST, what: str = "a scoring run",
                   error: type[Exception] | None = None) -> bool:
    """Whether `out` already holds a run with these settings (False: a fresh run). Raises on a mismatch
    (`error`, default ScoreError; `name` and `what` let another sharded job, dcd-generate, share this)."""
    from dcd_megatron.score.config import ScoreError

    path = Path(out) / name
    if not path.is_file():
        return False
    old = json.loads(path.read_text())
    changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
    if changed:
        raise (error or ScoreError)(
            f"{out} holds {what} with other settings ({', '.join(changed)} differ); "
            "rerun with the same settings to resume, or use a new --out"
        )
    return True


def write_manifest(out: Path, manifest: dict, *, name: str = MANIFEST) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    _write_text_atomic(Path(out) / name, json.dumps(manifest, indent=1, sort_keys=True))


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` via a temporary file and a rename (a crash leaves the old file or none)."""
    _write_text_atomic(Path(path), text)


def merge_shards(out: Path, n_shards: int, summary: dict) -> Path:
    """Concatenate the shards in order into OUT/scored.parquet, write the summary, drop the shards."""
    import pyarrow.parquet as pq

    out = Path(out)
    final = out / SCORED
    tmp = final.with_name(final.name + ".tmp")
    skipped: Counter = Counter()
    rows = 0
    writer = None
    try:
        for i in range(n_shards):
            table = pq.read_table(shard_path(out, i))
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            rows += table.num_rows
            skipped.update(json.loads(shard_path(out, i).with_suffix(".json").read_text()))
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, final)
    _write_text_atomic(out / SUMMARY, json.dumps(dict(summary, rows=rows, skipped=dict(sorted(skipped.items()))), indent=1))
    shutil.rmtree(out / "shards", ignore_errors=True)
    return final
