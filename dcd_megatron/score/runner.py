"""The scoring job: a teacher checkpoint over a trace dataset -> a Parquet dataset with teacher log-probs.

Read top to bottom: check the teacher's tokenizer against the student's, lay out TP x PP x DP,
load the rows, agree on the manifest, load this rank's stage of the teacher (resharded to this
layout), score this DP rank's unfinished shards (the batches of a shard are micro-batches of one
forward-only pipeline pass; the last stage scores them and writes the shard), then merge on
rank 0. Runs as one process or under torchrun.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from dcd_megatron.configs import to_dict
from dcd_megatron.score.config import ScoreConfig, ScoreError
from dcd_megatron.score.rows import RowToScore, ScoringEncoder, plan_batches, problem_fix, scored_columns
from dcd_megatron.score import shards as sh

POSITIONS_PER_CHUNK = 4096  # logits rows turned into fp32 at once (bounds memory for big vocabularies)


@dataclass
class ScoreResult:
    """What a finished run reports (on every rank)."""

    output: Path
    rows: int
    skipped: dict[str, int]
    shards_total: int
    shards_scored_here: int  # by this rank in this invocation
    shards_already_done: int  # found finished at start (all ranks)


def _manifest(cfg: ScoreConfig, teacher_path: Path, teacher_meta: dict, n_rows: int, student_fp: str) -> dict:
    from dcd_megatron.checkpoint import fingerprint

    data = cfg.data
    encoding = {k: v for k, v in to_dict(data).items() if k.startswith("field_") or k in ("add_bos", "add_eos", "split")}
    encoding["chat_template_sha256"] = hashlib.sha256(data.template_text().encode()).hexdigest()
    return {
        "teacher": str(teacher_path.resolve()),
        "teacher_step": teacher_meta.get("step"),
        "teacher_identity": fingerprint(teacher_path),
        "data_path": str(Path(cfg.data_path).resolve()) if Path(cfg.data_path).exists() else cfg.data_path,
        "input_rows": n_rows,
        "temperature": cfg.temperature,
        "top_k": cfg.top_k,
        "rows_per_shard": cfg.rows_per_shard,
        "max_length": cfg.max_length,
        "student_tokenizer": student_fp,
        "encoding": encoding,
        "on_bad_row": data.on_bad_row,
        "reference": cfg.reference,
    }


def _reading_config(cfg: ScoreConfig):
    """The data settings rows are read with (the student's tokenizer, split and bad-row policy; no field renames)."""
    from dcd_megatron.data.config import DataConfig

    return DataConfig(tokenizer=cfg.data.tokenizer, split=cfg.data.split, on_bad_row=cfg.data.on_bad_row)


def _bad_row(cfg: ScoreConfig, index: int, problem) -> Exception:
    """The one-line error for input row `index` (0-based), named by its file and row from 1."""
    from dcd_megatron.data import BadRowError
    from dcd_megatron.data.loading import locate_row

    source, row = locate_row(cfg.data_path, _reading_config(cfg), index, cache_dir=cfg.data.resolved_cache_dir())
    return BadRowError(source, row, problem.reason, problem.detail, fix=problem_fix(problem.reason, Path(cfg.out_dir)))


def _mixed_column(rows: list[dict]) -> str | None:
    """The first column Arrow cannot type (for the error message only)."""
    import pyarrow as pa

    for name in dict.fromkeys(k for r in rows for k in r):
        try:
            pa.array([r.get(name) for r in rows])
        except (pa.ArrowException, TypeError, ValueError):
            return name
    return None


def _load_input(cfg: ScoreConfig):
    """The input rows as one `datasets.Dataset`, columns exactly as in the files."""
    import datasets
    import pyarrow as pa

    from dcd_megatron.data import load_rows
    from dcd_megatron.data.loading import RAW_JSON_COLUMN

    ds = load_rows(cfg.data_path, _reading_config(cfg), cache_dir=cfg.data.resolved_cache_dir())
    if RAW_JSON_COLUMN in ds.column_names:  # a JSONL file `datasets` could not type: rebuild from the lines
        stale = set(scored_columns(cfg.data, cfg.reference))  # replaced by the scores; often the column of mixed types
        rows = [{k: v for k, v in json.loads(s).items() if k not in stale} for s in ds[RAW_JSON_COLUMN]]
        try:
            ds = datasets.Dataset.from_list(rows)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise ScoreError(
                f"{cfg.data_path}: column {_mixed_column(rows)!r} mixes value types across rows ({exc}); give "
                "each column one type (the scored dataset keeps every input column)"
            ) from None
    if len(ds) == 0:
        raise ScoreError(f"{cfg.data_path} holds no rows to score (an empty file, blank lines, or no valid JSON line)")
    return ds


def _tokens(batch: list[RowToScore], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and their positions, `[b, longest]` each."""
    longest = max(len(r.input_ids) for r in batch)
    tokens = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    for j, r in enumerate(batch):
        tokens[j, : len(r.input_ids)] = torch.tensor(r.input_ids)
    tokens = tokens.to(device)
    return tokens, torch.arange(longest, device=device).unsqueeze(0).expand_as(tokens)


def _score_logits(logits, batch, *, cfg: ScoreConfig, device, vocab, tp_rank, tp_group) -> dict:
    """{row index: (log-probs, top-k ids, top-k log-probs)} from one batch's `[b, s, V/tp]` logits."""
    from dcd_megatron.score.logprobs import scored_logprobs

    width = logits.shape[-1]
    out = {}
    for j, row in enumerate(batch):
        targets = torch.tensor(row.input_ids[row.start : row.start + row.count], device=device)
        lp, ids, tlp = [], [], []
        for c in range(0, row.count, POSITIONS_PER_CHUNK):
            sl = slice(row.start - 1 + c, row.start - 1 + min(c + POSITIONS_PER_CHUNK, row.count))
            a, b, d = scored_logprobs(
                logits[j, sl], targets[c : c + POSITIONS_PER_CHUNK], temperature=cfg.temperature, top_k=cfg.top_k,
                vocab_start=tp_rank * width, vocab_size=vocab, group=tp_group,
            )
            lp.append(a)
            if cfg.top_k:
                ids.append(b)
                tlp.append(d)
        out[row.index] = (
            torch.cat(lp).cpu().tolist(),
            torch.cat(ids).cpu().int().tolist() if cfg.top_k else None,
            torch.cat(tlp).cpu().tolist() if cfg.top_k else None,
        )
    return out


def _score_batches(module, batches: list[list[RowToScore]], *, pad_id, device, on_batch, **score_kw) -> dict:
    """Run the batches through the teacher as megatron micro-batches (forward only); scores on the last stage.

    One code path for PP=1 and PP>1: megatron-core's schedule pipelines the batches over the
    stages (shapes are exchanged per micro-batch, so batches may differ in size and length) and
    the last stage turns each batch's logits into scores as it arrives. Other stages return {}.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    scores: dict = {}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens, positions = _tokens(batch, pad_id, device)
        # causal attention: right padding never influences the positions scored
        output = model(input_ids=tokens, position_ids=positions, attention_mask=None)
        on_batch(len(batch))

        def collect(logits):
            scores.update(_score_logits(logits, batch, device=device, **score_kw))
            return logits.new_zeros(()), {}

        return output, collect

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[module],
            num_microbatches=len(batches),
            seq_length=max(len(r.input_ids) for b in batches for r in b),  # unused: shapes travel per batch
            micro_batch_size=max(len(b) for b in batches),
            forward_only=True,
        )
    return scores


def _shard_table(ds, start: int, stop: int, kept: list[int], scores: dict, cfg: ScoreConfig, scorer: str):
    """The input rows of the shard that were scored, with the scored columns (re)placed (``scorer``:
    the scoring checkpoint's identity, recorded per row by a reference scoring)."""
    import pyarrow as pa

    table = ds.with_format("arrow")[start:stop].take(pa.array([i - start for i in kept], type=pa.int64()))
    names = scored_columns(cfg.data, cfg.reference)
    table = table.drop_columns([n for n in names if n in table.column_names])
    table = table.append_column(names[0], pa.array([scores[i][0] for i in kept], type=pa.list_(pa.float32())))
    if cfg.reference:
        return table.append_column(names[1], pa.array([scorer] * len(kept), type=pa.string()))
    if cfg.top_k:
        table = table.append_column(names[1], pa.array([scores[i][1] for i in kept], type=pa.list_(pa.list_(pa.int32()))))
        table = table.append_column(names[2], pa.array([scores[i][2] for i in kept], type=pa.list_(pa.list_(pa.float32()))))
    return table


@dataclass(frozen=True)
class _Teacher:
    """The teacher checkpoint and what the checks before any collective found out about it."""

    path: Path
    config: object  # its TrainConfig
    meta: dict
    student: object  # the student's tokenizer (the traces are in its ids)
    vocab: int
    max_length: int
    vocab_note: str | None
    identity: str  # checkpoint.fingerprint: what a reference scoring records per row


def score(cfg: ScoreConfig, *, progress: bool = True) -> ScoreResult:
    """Score `cfg.data_path` with `cfg.teacher`; collective over all ranks of the process group."""
    from dcd_megatron.runtime.output_lock import lock_output_dir

    t0 = time.time()
    teacher = _checked_teacher(cfg)  # checks that need no other process
    facts, info, layout = _start_processes(cfg)
    # One run per --out: rank 0 locks it before anything is written there; all ranks learn the verdict.
    with lock_output_dir(cfg.out_dir, setting="--out", rank=info.rank, world_size=info.world_size):
        return _score_locked(cfg, teacher, facts, info, layout, progress=progress, t0=t0)


def _score_locked(cfg: ScoreConfig, teacher: _Teacher, facts, info, layout, *, progress: bool, t0: float) -> ScoreResult:
    """Everything after the processes and the lock on --out (see `score`)."""
    from megatron.core import parallel_state as ps

    out = Path(cfg.out_dir)
    is_main = info.rank == 0
    ds = _load_rows(cfg, is_main)
    manifest = _manifest(cfg, teacher.path, teacher.meta, len(ds), teacher.student.fingerprint)
    ranges = sh.shard_ranges(len(ds), cfg.rows_per_shard)
    final = out / sh.SCORED
    _agree_on_output(out, manifest, is_main)
    if final.is_file():
        summary = json.loads((out / sh.SUMMARY).read_text())
        if is_main:
            print(f"{final} is already complete ({summary['rows']} rows); nothing to do", flush=True)
        return ScoreResult(final, summary["rows"], summary["skipped"], len(ranges), 0, len(ranges))

    mine = sh.my_shards(len(ranges), ps.get_data_parallel_rank(), layout.dp)
    done_before = [i for i in range(len(ranges)) if sh.is_done(out, i)]
    todo = [i for i in mine if i not in set(done_before)]
    torch.distributed.barrier()  # every rank has decided what to do before anyone writes
    _score_shards(cfg, teacher, ds, ranges, todo, done_before, layout=layout, facts=facts, is_main=is_main,
                  progress=progress)
    torch.distributed.barrier()

    # ---- merge ---------------------------------------------------------------------------
    if is_main:
        summary = dict(manifest, seconds=round(time.time() - t0, 1), world_size=info.world_size, tp=cfg.tp, pp=cfg.pp)
        sh.merge_shards(out, len(ranges), summary)
    torch.distributed.barrier()
    summary = json.loads((out / sh.SUMMARY).read_text())
    if is_main:
        print(f"wrote {final}: {summary['rows']} rows scored, skipped {summary['skipped'] or 'none'}", flush=True)
    return ScoreResult(final, summary["rows"], summary["skipped"], len(ranges), len(todo), len(done_before))


def _checked_teacher(cfg: ScoreConfig) -> _Teacher:
    """The teacher's config, vocabulary and length limits against the request and the student's tokenizer."""
    from dcd_megatron.checkpoint import fingerprint, read_checkpoint_config
    from dcd_megatron.data.tokenizer import load_tokenizer_of
    from dcd_megatron.runtime.layout import check_model_split
    from dcd_megatron.score.vocabulary import check_teacher_vocabulary

    student = load_tokenizer_of("the student's", cfg.data.tokenizer, cfg.data.tokenizer_type,
                                "pass --student-tokenizer PATH, or fix data.tokenizer in the student's --config")
    teacher_path, tcfg, tmeta = read_checkpoint_config(Path(cfg.teacher))
    teacher_tok = load_tokenizer_of(
        "the teacher's", cfg.teacher_tokenizer or tcfg.data.tokenizer, tcfg.data.tokenizer_type,
        "pass --teacher-tokenizer PATH (the tokenizer the teacher was trained with)"
        + ("" if cfg.teacher_tokenizer else f"; the path is data.tokenizer in {teacher_path}'s training config"),
    )
    vocab_note = check_teacher_vocabulary(student, teacher_tok)
    vocab = tcfg.model.vocab_size or student.vocab_size
    if cfg.top_k > vocab:
        raise ScoreError(f"top_k={cfg.top_k} exceeds the teacher's vocabulary of {vocab}")
    max_pos = tcfg.model.max_position_embeddings
    max_length = cfg.max_length or max_pos
    if max_length > max_pos:
        raise ScoreError(f"max_length={max_length} exceeds the teacher's max_position_embeddings={max_pos}")
    check_model_split(
        cfg.tp, cfg.pp, num_layers=tcfg.model.num_layers, num_attention_heads=tcfg.model.num_attention_heads,
        num_query_groups=tcfg.model.query_groups, ffn_hidden_size=tcfg.model.ffn_size,
        tp_name="--tp", pp_name="--pp", whose="the teacher's ",
    )
    return _Teacher(teacher_path, tcfg, tmeta, student, vocab, max_length, vocab_note, fingerprint(teacher_path))


def _start_processes(cfg: ScoreConfig):
    """(runtime facts, process info, layout): the process group, threads and megatron's parallel state."""
    from dcd_megatron.convert.model_io import unchanged_master_env
    from dcd_megatron.runtime import distributed as rt
    from dcd_megatron.runtime.layout import Layout

    facts = rt.runtime_facts(cfg.device)
    with unchanged_master_env():
        if rt.process_info().world_size == 1 and not torch.distributed.is_initialized():
            os.environ["MASTER_PORT"] = str(rt.free_port())  # one process: never collide with another job's port
        info = rt.init_process_group(facts.device)
    model_parallel = cfg.tp * cfg.pp
    if info.world_size % model_parallel:
        raise ScoreError(
            f"tp*pp = {cfg.tp}*{cfg.pp} = {model_parallel} must divide the world size {info.world_size}; "
            f"launch a multiple of {model_parallel} processes"
        )
    if facts.on_cpu:
        rt.set_threads(0, info.world_size)
    layout = Layout(cfg.tp, cfg.pp, 1, info.world_size // model_parallel)
    rt.init_model_parallel(layout, seed=0)
    return facts, info, layout


def _load_rows(cfg: ScoreConfig, is_main: bool):
    """The input rows on every rank: rank 0 fills the datasets cache, the others then read it."""
    if is_main:
        ds = _load_input(cfg)
    torch.distributed.barrier()
    if not is_main:
        ds = _load_input(cfg)
    return ds


def _agree_on_output(out: Path, manifest: dict, is_main: bool) -> None:
    """Rank 0 checks (or writes) the manifest of `out`; every rank gets its verdict."""
    box = [None]
    if is_main:
        try:
            resumed = sh.check_manifest(out, manifest)
            if not resumed:
                if (out / sh.SCORED).exists() or (out / "shards").exists():
                    raise ScoreError(f"{out} holds scoring output without a manifest; use a new --out")
                sh.write_manifest(out, manifest)
            box = [("ok", resumed)]
        except ScoreError as exc:
            box = [("error", str(exc))]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        raise ScoreError(box[0][1])


def _score_shards(cfg: ScoreConfig, teacher: _Teacher, ds, ranges, todo, done_before, *, layout, facts, is_main,
                  progress: bool) -> None:
    """Load this rank's stage of the teacher and score the shards `todo`; the last stage writes them."""
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from dcd_megatron.convert.model_io import load_megatron_model

    out = Path(cfg.out_dir)
    tp_rank, tp_group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    writer = ps.is_pipeline_last_stage() and tp_rank == 0  # one writer per DP rank: it holds the scores
    module, _, _, _ = load_megatron_model(teacher.path, layout=layout, device=facts.device, use_te=facts.has_te)
    module.config.variable_seq_lengths = True  # pipeline stages exchange each batch's shape
    encoder = ScoringEncoder(cfg.data, teacher.student, teacher.max_length, reference=cfg.reference)
    bar = tqdm(
        total=sum(ranges[i][1] - ranges[i][0] for i in todo), unit="row", disable=not (is_main and progress),
        desc=f"scoring (rank 0 of dp={layout.dp})", dynamic_ncols=True,
    )
    if is_main:
        print(f"teacher: {teacher.path}", flush=True)
    if is_main and teacher.vocab_note:
        print(f"note: {teacher.vocab_note}", flush=True)
    if is_main and done_before:
        print(f"resuming: {len(done_before)} of {len(ranges)} shards already scored", flush=True)
    for index in todo:
        start, stop = ranges[index]
        batch = ds[start:stop]
        keys = list(batch)
        rows, skipped = [], Counter()
        for i in range(stop - start):
            result = encoder(start + i, {k: batch[k][i] for k in keys})
            if isinstance(result, RowToScore):
                rows.append(result)
            elif cfg.data.on_bad_row == "skip":
                skipped[result.reason] += 1
            else:
                raise _bad_row(cfg, start + i, result)
        batches = plan_batches(rows, cfg.batch_tokens)
        scores = _score_batches(
            module, batches, pad_id=teacher.student.pad_id, device=facts.device, on_batch=bar.update,
            cfg=cfg, vocab=teacher.vocab, tp_rank=tp_rank, tp_group=tp_group,
        ) if batches else {}
        bar.update(sum(skipped.values()))
        if writer:
            sh.write_shard(out, index, _shard_table(ds, start, stop, sorted(scores), scores, cfg, teacher.identity), dict(skipped))
    bar.close()
