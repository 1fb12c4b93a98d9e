"""The generation job: a teacher checkpoint samples n traces per prompt -> kept (correct) traces with the
log-probs of the distribution that sampled them, in the schema `dcd-train` reads.

Read top to bottom: read the prompts and encode them with the student's data pipeline, check the
teacher's vocabulary against the student's, lock --out, agree on the manifest, load the teacher
(KV-cached decoder), sample and judge each unfinished shard (all n samples of a range of prompts,
written atomically), then merge: OUT/traces.parquet (kept), OUT/samples.parquet (all), and
OUT/generate_summary.json. A rerun with the same settings skips finished shards.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dcd_megatron.generate.config import GenerateConfig, GenerateError
from dcd_megatron.generate import judge as jd
from dcd_megatron.score import shards as sh

MANIFEST = "generate_manifest.json"
SUMMARY = "generate_summary.json"
TRACES = "traces.parquet"
SAMPLES = "samples.parquet"
# log-prob stored for a top-K entry outside the kept set (probability 0): finite, so the row stays a
# valid training row (the loss reads exp(LOG_ZERO) = 0 in fp32)
LOG_ZERO = -1e4


@dataclass
class GenerateResult:
    """What a finished run reports."""

    traces: Path
    samples: Path
    summary: dict
    shards_total: int
    shards_generated: int  # in this invocation
    shards_already_done: int  # found finished at start


@dataclass(frozen=True)
class _Plan:
    """The prompts, encoded, and what the checks before loading the teacher found out."""

    problems: list  # eval.benchmarks.Problem
    texts: list[str]  # each problem under the template: the `prompt` column training reads
    prompt_ids: list[list[int]]
    answer_format: str
    benchmark: str
    source: Path
    template: str
    student: object  # the student's Tokenizer
    stop_ids: frozenset[int]  # the student's eos, and the teacher's when it names another
    teacher_path: Path
    teacher_meta: dict
    vocab_note: str | None


def _split_prompts(spec: str) -> tuple[str, Path]:
    """`FILE` (gsm8k rows) or `BENCHMARK=FILE`."""
    name, sep, path = spec.partition("=")
    return (name, Path(path)) if sep and name and "/" not in name else ("gsm8k", Path(spec))


def _plan(cfg: GenerateConfig) -> _Plan:
    """Prompts, template, tokenizers and the teacher's vocabulary, checked before anything is loaded."""
    from dcd_megatron.checkpoint import read_checkpoint_config
    from dcd_megatron.data.encoding import RowEncoder
    from dcd_megatron.data.tokenizer import load_tokenizer_of
    from dcd_megatron.eval.benchmarks import get_benchmark, load_problems, render_prompt, resolve_template
    from dcd_megatron.score.vocabulary import check_teacher_vocabulary

    name, source = _split_prompts(cfg.prompts)
    spec = get_benchmark(name)
    problems = load_problems(name, source, limit=cfg.limit)
    template = resolve_template(cfg.template or spec.default_template)
    student = load_tokenizer_of("the student's", cfg.data.tokenizer, cfg.data.tokenizer_type,
                                "pass --student-tokenizer PATH, or fix data.tokenizer in the student's --config")
    if student.eos_id is None:
        raise GenerateError(f"the student tokenizer {student.path} names no eos token; a kept trace must end with it")
    teacher_path, tcfg, tmeta = read_checkpoint_config(Path(cfg.teacher))
    teacher_tok = load_tokenizer_of(
        "the teacher's", cfg.teacher_tokenizer or tcfg.data.tokenizer, tcfg.data.tokenizer_type,
        "pass --teacher-tokenizer PATH (the tokenizer the teacher was trained with)",
    )
    vocab_note = check_teacher_vocabulary(student, teacher_tok)
    encoder = RowEncoder(cfg.data, student)
    texts = [render_prompt(p.prompt, template) for p in problems]
    prompt_ids = [encoder.prompt_ids([{"role": "user", "content": t}]) for t in texts]
    longest = max(len(p) for p in prompt_ids) + cfg.max_new_tokens
    max_pos = tcfg.model.max_position_embeddings
    if longest > max_pos:
        raise GenerateError(
            f"the longest prompt ({longest - cfg.max_new_tokens} tokens) plus --max-new-tokens {cfg.max_new_tokens} "
            f"exceeds the teacher's max_position_embeddings={max_pos}; lower --max-new-tokens"
        )
    stop = {student.eos_id} | ({teacher_tok.eos_id} if teacher_tok.eos_id is not None else set())
    return _Plan(problems, texts, prompt_ids, spec.answer_format, name, source, template, student, frozenset(stop),
                 teacher_path, tmeta, vocab_note)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("dcd-megatron", "torch", "megatron-core"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _manifest(cfg: GenerateConfig, plan: _Plan) -> dict:
    """Everything the samples depend on: a rerun must match it to resume."""
    from dcd_megatron.checkpoint import fingerprint

    ids_sha = hashlib.sha256(json.dumps(plan.prompt_ids).encode()).hexdigest()
    refs_sha = hashlib.sha256(json.dumps([p.reference for p in plan.problems]).encode()).hexdigest()
    sampling = {k: getattr(cfg, k) for k in ("n", "temperature", "top_p", "top_k", "max_new_tokens", "logprob_top_k",
                                               "seed", "max_per_prompt", "prompts_per_shard")}
    return dict(
        sampling,
        teacher=str(plan.teacher_path.resolve()), teacher_step=plan.teacher_meta.get("step"),
        teacher_identity=fingerprint(plan.teacher_path), student_tokenizer=plan.student.fingerprint,
        prompts=str(plan.source.resolve()), benchmark=plan.benchmark, problems=len(plan.problems),
        prompt_ids_sha256=ids_sha, references_sha256=refs_sha, template=plan.template,
        chat_template_sha256=hashlib.sha256(cfg.data.template_text().encode()).hexdigest(), add_bos=cfg.data.add_bos,
        stop_ids=sorted(plan.stop_ids), backend=cfg.backend, versions=_versions(),
        sampling_rule="softmax(logits/T), top-k, then top-p over the renormalised top-k; log-probs of the kept set",
    )


def generate_traces(cfg: GenerateConfig, *, progress: bool = True) -> GenerateResult:
    """Run `dcd-generate`: one process, or every rank under torchrun (data parallel over shards)."""
    from dcd_megatron.runtime.output_lock import lock_output_dir

    t0 = time.time()
    plan = _plan(cfg)  # the same checks on every rank: all stop alike
    rank, world = _start_processes(cfg)
    with lock_output_dir(cfg.out_dir, setting="--out", rank=rank, world_size=world):
        return _generate_locked(cfg, plan, rank, world, progress=progress, t0=t0)


def _start_processes(cfg: GenerateConfig) -> tuple[int, int]:
    """(rank, world size). Under torchrun: the process group and megatron's state, DP over all ranks
    (each rank holds the whole teacher); one process leaves that to the teacher's loader."""
    import torch

    from dcd_megatron.runtime import distributed as rt
    from dcd_megatron.runtime.layout import Layout

    info = rt.process_info()
    if info.world_size == 1 and not torch.distributed.is_initialized():
        return 0, 1
    facts = rt.runtime_facts(cfg.device)
    info = rt.init_process_group(facts.device)
    if facts.on_cpu:
        rt.set_threads(0, info.world_size)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        rt.init_model_parallel(Layout(1, 1, 1, info.world_size), seed=0)
    return info.rank, info.world_size


def _barrier(world: int) -> None:
    if world > 1:
        import torch

        torch.distributed.barrier()


def _agree_on_output(out: Path, manifest: dict, rank: int, world: int) -> None:
    """Rank 0 checks (or writes) the manifest of `out`; every rank gets its verdict."""
    verdict = None
    if rank == 0:
        try:
            resumed = sh.check_manifest(out, manifest, name=MANIFEST, what="a generation run", error=GenerateError)
            if not resumed:
                if (out / TRACES).exists() or (out / "shards").exists():
                    raise GenerateError(f"{out} holds generation output without a manifest; use a new --out")
                sh.write_manifest(out, manifest, name=MANIFEST)
        except GenerateError as exc:
            verdict = str(exc)
    if world > 1:
        from dcd_megatron.runtime.distributed import share_object

        verdict = share_object(verdict, src=0)
    if verdict:
        raise GenerateError(verdict)


def _generate_locked(cfg: GenerateConfig, plan: _Plan, rank: int, world: int, *, progress: bool,
                     t0: float) -> GenerateResult:
    """Everything after the lock on --out (see `generate_traces`)."""
    out = Path(cfg.out_dir)
    say = print if rank == 0 else (lambda *a, **k: None)
    manifest = _manifest(cfg, plan)
    ranges = sh.shard_ranges(len(plan.problems), cfg.prompts_per_shard)
    _agree_on_output(out, manifest, rank, world)
    if (out / TRACES).is_file():
        summary = json.loads((out / SUMMARY).read_text())
        say(f"{out / TRACES} is already complete ({summary['kept']} kept traces); nothing to do", flush=True)
        return GenerateResult(out / TRACES, out / SAMPLES, summary, len(ranges), 0, len(ranges))
    done_before = [i for i in range(len(ranges)) if sh.is_done(out, i)]
    todo = [i for i in sh.my_shards(len(ranges), rank, world) if i not in set(done_before)]
    _barrier(world)  # every rank has decided what to do before anyone writes
    if done_before:
        say(f"resuming: {len(done_before)} of {len(ranges)} shards already generated", flush=True)
    if plan.vocab_note:
        say(f"note: {plan.vocab_note}", flush=True)
    if len(done_before) < len(ranges):  # loading the teacher is collective: every rank loads it, work or not
        _generate_shards(cfg, plan, ranges, todo, progress=progress and rank == 0)
    _barrier(world)
    if rank == 0:
        _merge(out, len(ranges), dict(manifest, seconds=round(time.time() - t0, 1), world_size=world),
               _training_names(cfg))
    _barrier(world)
    summary = json.loads((out / SUMMARY).read_text())
    say(f"wrote {out / TRACES}: {summary['kept']} of {summary['samples']} samples kept "
        f"(teacher pass@1 {summary['pass@1']:.3f}, pass@{cfg.n} {summary[f'pass@{cfg.n}']:.3f}); "
        f"rejected {summary['rejected'] or 'none'}", flush=True)
    return GenerateResult(out / TRACES, out / SAMPLES, summary, len(ranges), len(todo), len(done_before))


def _load_decoder(cfg: GenerateConfig, plan: _Plan):
    """(decoder, device, pad id): the teacher in one process, KV-cached when it matches megatron's forward."""
    from dcd_megatron.eval.student import decoder_for
    from dcd_megatron.model.inference import load_trained_model

    loaded, _ = load_trained_model(plan.teacher_path, device=cfg.device)
    pad = plan.student.pad_id if plan.student.pad_id is not None else 0
    return decoder_for(loaded, plan.student.bos_id), loaded.device, pad


def _generate_shards(cfg: GenerateConfig, plan: _Plan, ranges, todo: list[int], *, progress: bool) -> None:
    """Sample, judge and write each shard of `todo` (in order)."""
    from tqdm import tqdm

    decoder, device, pad = _load_decoder(cfg, plan)
    bar = tqdm(total=sum(ranges[i][1] - ranges[i][0] for i in todo) * cfg.n, unit="sample", disable=not progress,
               desc="generating", dynamic_ncols=True)
    with jd.Grader(cfg.grade_workers) as grader:
        for index in todo:
            _one_shard(cfg, plan, ranges[index], index, decoder, device=device, pad=pad, grader=grader)
            bar.update((ranges[index][1] - ranges[index][0]) * cfg.n)
    bar.close()


def _one_shard(cfg: GenerateConfig, plan: _Plan, span, index: int, decoder, *, device, pad, grader) -> None:
    """Sample, judge and write shard `index` (prompts `span` = [start, stop))."""
    from dcd_megatron.sampling.generation import sample

    start, stop = span
    traces = sample(
        decoder, plan.prompt_ids[start:stop], max_new_tokens=cfg.max_new_tokens, eos_id=sorted(plan.stop_ids),
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, n=cfg.n, batch_size=cfg.batch_size,
        seed=cfg.seed, logprob_top_k=cfg.logprob_top_k, prompt_keys=range(start, stop), progress=False,
        device=device, pad_id=pad,
    )
    write_shard(Path(cfg.out_dir), index, shard_rows(cfg, plan, start, traces, grader), cfg)


def shard_rows(cfg: GenerateConfig, plan: _Plan, start: int, traces, grader) -> list[dict]:
    """One row per sample of prompts `start ..`: its text, answer, fate and the sampling log-probs."""
    flat = [(start + i, j, t) for i, row in enumerate(traces) for j, t in enumerate(row)]
    verdicts = jd.judge([t.tokens for _, _, t in flat], [plan.problems[i].reference for i, _, _ in flat],
                        tokenizer=plan.student, eos_id=plan.student.eos_id, stop_ids=set(plan.stop_ids),
                        answer_format=plan.answer_format, grader=grader)
    rows, kept_per_prompt = [], Counter()
    for (i, j, trace), v in zip(flat, verdicts, strict=True):
        reason = v.reason
        if reason == jd.KEPT and cfg.max_per_prompt is not None:
            kept_per_prompt[i] += 1
            if kept_per_prompt[i] > cfg.max_per_prompt:
                reason = "over_max_per_prompt"
        problem = plan.problems[i]
        row = {"prompt_index": i, "sample": j, "id": problem.id, "prompt": plan.texts[i], "response": v.response,
               "reference": problem.reference, "predicted": v.predicted, "reason": reason,
               "correct": reason in (jd.KEPT, "over_max_per_prompt"), "tokens": trace.tokens,
               "teacher_logprobs": trace.logprobs}
        if cfg.logprob_top_k:
            row["teacher_topk_ids"] = trace.top_ids
            row["teacher_topk_logprobs"] = [[max(x, LOG_ZERO) for x in lps] for lps in trace.top_logprobs]
        if not cfg.data.add_eos and reason == jd.KEPT:  # training appends no eos: no log-prob for it
            for name in ("teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs"):
                if name in row:
                    row[name] = row[name][:-1]
        rows.append(row)
    return rows


def write_shard(out: Path, index: int, rows: list[dict], cfg: GenerateConfig) -> None:
    """One shard's samples as Parquet (atomically, via score.shards), its reject counts beside it."""
    import pyarrow as pa

    schema = [("prompt_index", pa.int64()), ("sample", pa.int64()), ("id", pa.string()), ("prompt", pa.string()),
              ("response", pa.string()), ("reference", pa.string()), ("predicted", pa.string()),
              ("reason", pa.string()), ("correct", pa.bool_()), ("tokens", pa.list_(pa.int32())),
              ("teacher_logprobs", pa.list_(pa.float32()))]
    if cfg.logprob_top_k:
        schema += [("teacher_topk_ids", pa.list_(pa.list_(pa.int32()))),
                   ("teacher_topk_logprobs", pa.list_(pa.list_(pa.float32())))]
    table = pa.Table.from_pylist(rows, schema=pa.schema(schema))
    sh.write_shard(out, index, table, dict(Counter(r["reason"] for r in rows)))


def _training_names(cfg: GenerateConfig) -> dict[str, str]:
    """Our column names -> the student's data.field_* names, which dcd-train reads."""
    from dcd_megatron.score.rows import teacher_columns

    lp, ids, tlp = teacher_columns(cfg.data)
    return {"prompt": cfg.data.field_prompt, "response": cfg.data.field_response, "teacher_logprobs": lp,
            "teacher_topk_ids": ids, "teacher_topk_logprobs": tlp}


def _merge(out: Path, n_shards: int, manifest: dict, names: dict[str, str]) -> dict:
    """OUT/samples.parquet (every sample), OUT/traces.parquet (the kept ones, dcd-train's columns), summary."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import pyarrow as pa

    table = pa.concat_tables([pq.read_table(sh.shard_path(out, i)) for i in range(n_shards)])
    tmp = out / (SAMPLES + ".tmp")
    pq.write_table(table, tmp)
    kept = table.filter(pc.equal(table["reason"], jd.KEPT))
    kept = kept.drop_columns(["tokens", "reason", "correct"])
    kept = kept.rename_columns([names.get(c, c) for c in kept.column_names])
    tmp_kept = out / (TRACES + ".tmp")
    pq.write_table(kept, tmp_kept)
    summary = summarize(table.select(["prompt_index", "reason", "correct"]).to_pylist(), manifest)
    tmp.replace(out / SAMPLES)
    sh.write_text_atomic(out / SUMMARY, json.dumps(summary, indent=1))
    tmp_kept.replace(out / TRACES)  # last: its presence means the run is complete
    import shutil

    shutil.rmtree(out / "shards", ignore_errors=True)
    return summary


def summarize(rows: list[dict], manifest: dict) -> dict:
    """Counts per reason, n and n_correct per prompt, and the teacher's pass@1 / pass@n."""
    n = manifest["n"]
    correct = Counter(r["prompt_index"] for r in rows if r["correct"])
    prompts = sorted({r["prompt_index"] for r in rows})
    reasons = Counter(r["reason"] for r in rows)
    kept = reasons.pop(jd.KEPT, 0)
    return dict(
        manifest, samples=len(rows), kept=kept, rejected=dict(sorted(reasons.items())),
        **{"pass@1": sum(correct.values()) / max(1, len(rows)),
           f"pass@{n}": sum(1 for p in prompts if correct[p]) / max(1, len(prompts))},
        per_prompt=[{"prompt_index": p, "n": n, "n_correct": correct[p]} for p in prompts],
    )
