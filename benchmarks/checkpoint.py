"""Benchmark: what the checkpoint manifest costs, against megatron-core's own save and load.

One GPTModel in megatron's DDP with the project's Adam (one step taken, so the moments exist),
saved and loaded in one process (gloo), interleaved, several times:

- ``megatron save``: ``dist_checkpointing.save`` of the model and optimizer sharded state (the
  baseline: what any megatron trainer writes);
- ``dcd save``: ``checkpoint.save_checkpoint`` with ``keep_checkpoints=0`` (the same save, plus
  the RNG file, meta.json, the sha256 manifest and the atomic rename);
- ``manifest``: the hashing part of that save alone (``manifest.hash_share`` over its files);
- ``verify``: ``checkpoint.verify`` (every file hashed against the manifest, as a resume does);
- ``megatron load``: ``checkpoint.load_checkpoint``'s load (the baseline for ``verify``).

Wall seconds (a save is disk and CPU). The ratios say what a resume and a save pay for the
manifest on this machine; on a cluster each rank hashes 1/world of the files.

    python benchmarks/checkpoint.py
    python benchmarks/checkpoint.py --write docs/performance.md
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._harness import clocks, machine, run_ranks, run_watched, write_section  # noqa: E402

SECTION = "## Checkpoint manifest: save and verify against megatron's save and load (`benchmarks/checkpoint.py`)"


def _built(args):
    """(model chunks, optimizer, scheduler, parameter count) after one optimizer step."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from dcd_megatron.configs.train import OptimConfig
    from dcd_megatron.model.builder import build_gpt_model, transformer_config
    from dcd_megatron.model.config import ModelConfig
    from dcd_megatron.runtime.distributed import runtime_facts
    from dcd_megatron.runtime.layout import Layout
    from dcd_megatron.train.optim import build_optimizer, build_scheduler

    facts = runtime_facts(torch.device("cpu"))
    parallel_state.initialize_model_parallel()
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    mcfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8, num_query_groups=4,
                       vocab_size=args.vocab, max_position_embeddings=128)
    tconfig = transformer_config(mcfg, Layout(1, 1, 1, 1), sequence_parallel=False, facts=facts)
    model = build_gpt_model(mcfg, tconfig, padded_vocab_size=mcfg.padded_vocab_size(args.vocab, 1),
                            max_sequence_length=128, pre_process=True, post_process=True, use_te=False)
    ddp = DistributedDataParallel(tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = build_optimizer(OptimConfig(), [ddp], params_dtype="fp32", facts=facts)
    for p in model.parameters():
        p.main_grad.fill_(1e-3)
    optimizer.step()
    return [ddp], optimizer, build_scheduler(OptimConfig(), optimizer, 10), sum(p.numel() for p in model.parameters())


def _rank(rank, args) -> dict:
    from megatron.core import dist_checkpointing

    from dcd_megatron import checkpoint as ckpt
    from dcd_megatron.checkpoint.saving import _sharded_state

    chunks, optimizer, scheduler, n_params = _built(args)
    ckpt.use_in_process_write_results()
    from dcd_megatron.checkpoint.manifest import hash_share

    times = {"megatron save": [], "dcd save": [], "manifest": [], "verify": [], "megatron load": []}
    root = Path(tempfile.mkdtemp(prefix="dcd-bench-ckpt-"))
    try:
        for rep in range(args.reps + 1):
            plain = root / f"plain-{rep}"
            plain.mkdir()
            with clocks() as took:
                dist_checkpointing.save(_sharded_state(chunks, optimizer, is_loading=False), str(plain))
            times["megatron save"].append(took["wall"])
            with clocks() as took:
                saved = ckpt.save_checkpoint(root / "run", rep + 1, chunks, optimizer, scheduler, {}, keep=0)
            times["dcd save"].append(took["wall"])
            with clocks() as took:
                hash_share(saved)
            times["manifest"].append(took["wall"])
            with clocks() as took:
                problems = ckpt.verify(saved)
            times["verify"].append(took["wall"])
            assert problems == [], problems
            with clocks() as took:
                dist_checkpointing.load(_sharded_state(chunks, optimizer, is_loading=True), str(saved))
            times["megatron load"].append(took["wall"])
            shutil.rmtree(plain)
            if rep:
                shutil.rmtree(root / "run" / f"iter_{rep:07d}")  # outside the timed blocks
            print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
        size = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"median": {k: statistics.median(v[1:]) for k, v in times.items()}, "bytes": size, "params": n_params}


def table(r: dict) -> str:
    m = r["median"]
    rows = [("megatron save", "megatron save"), ("dcd save", "megatron save"), ("manifest", "megatron save"),
            ("megatron load", "megatron load"), ("verify", "megatron load")]
    lines = ["| step | wall s (median) | ratio to | ratio |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {m[name]:.3f} | {base} | {m[name] / m[base]:.3f}x |" for name, base in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--write", help="rewrite this section of a markdown file (docs/performance.md)")
    args = parser.parse_args(argv)
    r, load, wall = run_watched(lambda a: run_ranks(_rank, 1, a, threads=2, timeout=3600, patch=True), args)
    text = "\n".join([
        SECTION, "",
        f"`python benchmarks/checkpoint.py` ({args.layers} layers, hidden {args.hidden}, vocabulary {args.vocab}: "
        f"{r['params'] / 1e6:.1f} M parameters, a {r['bytes'] / 2**20:.0f} MiB checkpoint with Adam's moments; "
        f"one process; median of {args.reps} interleaved repetitions after a warm-up; load average "
        f"{load[0]:.1f} -> {load[1]:.1f}, {wall:.0f} s). Machine: {machine()}.", "",
        table(r), "",
        "`dcd save` adds the RNG file, meta.json, the sha256 manifest and the rename to megatron's save; "
        "`manifest` is its hashing alone (the files are still in the page cache); "
        "`verify` hashes every file once, which a resume does before megatron's load. "
        "With several ranks each hashes 1/world of the files.",
    ])
    print(text)
    if args.write:
        write_section(Path(args.write), SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
