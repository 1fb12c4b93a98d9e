"""Benchmark: the output layer + loss, from final hidden states, over sequence lengths.

Forward+backward from the hidden states ``[s, b, h]`` (gradients w.r.t. the hidden states and
the output-layer weight shard ``[V/tp, h]``), for:

- ``megatron CE``: megatron's own path, ``copy_to_tensor_model_parallel_region`` ->
  ``F.linear`` (the output layer's matmul) -> ``vocab_parallel_cross_entropy`` -> sum;
- ``DCD full``: the same logits -> the DCD loss function (``sigmoid`` weights, report);
- ``DCD chunked``: the DCD loss function from the hidden states and the weight,
  ``loss.chunk_size`` tokens at a time (the fused scheme of per-token weights);
- ``DCD chunked prefix``: the same with ``prefix`` weights (the recompute scheme: one extra
  matmul per chunk);
- optional (``--impls``), ``DCD full topk`` / ``DCD chunked topk``: ``DCD full`` / ``DCD
  chunked`` with ``loss.term=topk_kl`` (``--topk`` teacher ids per token, random);
- optional (``--impls``), the drift lab's gated arms on the chunked path: ``DCD chunked gated``
  (per token: fused), ``DCD chunked gated_traj`` (the trajectory discount from the live student:
  the recompute scheme), ``DCD chunked gated_ref`` / ``DCD chunked gated_ref_traj`` (weights from
  the batch's ``student_ref_logprobs``: fused, the trajectory included).

CPU mode (default): TP=2 ranks over gloo, one thread each, CPU seconds (``time.process_time``)
and peak memory from torch.profiler's memory events (every allocation and free torch makes:
the peak of bytes held above the inputs during the call). GPU mode (``--device cuda``, one
GPU, TP=1): CUDA-event time, ``torch.cuda.max_memory_allocated`` above the inputs, tokens/s
and MFU (the three matmuls of the output layer, ``6 N h V`` flops, against ``--peak-tflops``).

    python benchmarks/loss_seq_sweep.py                          # CPU, TP=2, s = 1k, 4k, 16k
    python benchmarks/loss_seq_sweep.py --write docs/performance.md
    python benchmarks/loss_seq_sweep.py --device cuda --preset h100   # one H100, < 8 min
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._harness import (  # noqa: E402
    H100_BF16_DENSE_TFLOPS, clocks, machine, mib, one_gpu_group, peak_bytes, resolve_sizes, run_ranks, run_watched,
    summarize, write_section,
)

SECTION = "## Loss from hidden states: sequence-length sweep"
IMPLS = ("megatron CE", "DCD full", "DCD chunked", "DCD chunked prefix")
TOPK_IMPLS = ("DCD full topk", "DCD chunked topk")  # only when asked for (--impls)
GATED = {"gated": {}, "gated_traj": {"trajectory": True}, "gated_ref": {"reference": "initial"},
         "gated_ref_traj": {"reference": "initial", "trajectory": True}}
GATED_IMPLS = tuple(f"DCD chunked {name}" for name in GATED)  # only when asked for (--impls)


def make_impls(args, tp_group, tp_rank: int, tp: int, device):
    """Callables ``fn(hidden, weight, batch, labels_sb)`` running one forward+backward each."""
    import torch.nn.functional as F
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    from dcd_megatron.loss import DCDConfig, make_loss_func

    from dcd_megatron.model.builder import _ContiguousGrad

    def to_tp(h):  # as the output layer does it (builder.return_hidden_states for the chunked loss)
        return _ContiguousGrad.apply(copy_to_tensor_model_parallel_region(h, group=tp_group)) if tp > 1 else h

    full = make_loss_func(DCDConfig(method="sigmoid", chunk_size=0), tp_group=tp_group)
    chunked = make_loss_func(DCDConfig(method="sigmoid", chunk_size=args.chunk), tp_group=tp_group)
    prefix = make_loss_func(DCDConfig(method="prefix", chunk_size=args.chunk), tp_group=tp_group)
    full_topk = make_loss_func(DCDConfig(method="sigmoid", term="topk_kl", chunk_size=0), tp_group=tp_group)
    chunked_topk = make_loss_func(DCDConfig(method="sigmoid", term="topk_kl", chunk_size=args.chunk), tp_group=tp_group)

    def megatron_ce(h, w, batch, labels_sb):
        logits = F.linear(to_tp(h), w)  # [s, b, V/tp]
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels_sb).sum()
        return torch.autograd.grad(loss, (h, w))

    def dcd_full(fn):
        def run(h, w, batch, labels_sb):
            logits = F.linear(to_tp(h), w).transpose(0, 1)  # [b, s, V/tp], as GPTModel returns it
            loss, _, _ = fn(batch, logits)
            return torch.autograd.grad(loss, (h, w))

        return run

    def dcd_chunked(fn):
        def run(h, w, batch, labels_sb):
            loss, _, _ = fn(batch, to_tp(h).transpose(0, 1), output_weight=w)
            return torch.autograd.grad(loss, (h, w))

        return run

    impls = {"megatron CE": megatron_ce, "DCD full": dcd_full(full),
             "DCD chunked": dcd_chunked(chunked), "DCD chunked prefix": dcd_chunked(prefix),
             "DCD full topk": dcd_full(full_topk), "DCD chunked topk": dcd_chunked(chunked_topk)}
    for name, extra in GATED.items():
        impls[f"DCD chunked {name}"] = dcd_chunked(make_loss_func(
            DCDConfig(method="gated", chunk_size=args.chunk, **extra), tp_group=tp_group))
    return {k: impls[k] for k in args.impls}


def measure(args, tp_group, tp_rank: int, tp: int, device, barrier) -> dict:
    """Times and peaks per sequence length and implementation (this rank's view)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    width = args.vocab // tp
    impls = make_impls(args, tp_group, tp_rank, tp, device)
    out = {}
    for seq in args.seqs:
        g = torch.Generator().manual_seed(seq)
        b = args.batch
        labels = torch.randint(0, args.vocab, (b, seq), generator=g).to(device)
        batch = {
            "labels": labels,
            "loss_mask": torch.ones(b, seq, device=device),
            "teacher_logprobs": (-torch.rand(b, seq, generator=g) * 3).to(device),
            "segment_ids": torch.zeros(b, seq, dtype=torch.long, device=device),
            "student_ref_logprobs": (-torch.rand(b, seq, generator=g) * 3).to(device),
        }
        if set(TOPK_IMPLS) & set(impls):  # k distinct ids a token, spread over the shards; teacher mass 0.9
            first = torch.randint(0, args.vocab, (b, seq, 1), generator=g)
            ids = (first + torch.arange(args.topk) * (args.vocab // args.topk)) % args.vocab
            batch["teacher_topk_ids"] = ids.to(device)
            batch["teacher_topk_logprobs"] = torch.full((b, seq, args.topk), math.log(0.9 / args.topk), device=device)
        labels_sb = labels.t().contiguous()
        hidden = torch.randn(seq, b, args.hidden, generator=g).to(device=device, dtype=dtype)
        weight = (torch.randn(args.vocab, args.hidden, generator=g) * args.hidden**-0.5)
        weight = weight[tp_rank * width : (tp_rank + 1) * width].to(device=device, dtype=dtype)
        h = hidden.requires_grad_()
        w = weight.requires_grad_()
        times = {name: [] for name in impls}
        walls = {name: [] for name in impls}
        for rep in range(args.reps + 1):
            for name, fn in impls.items():
                barrier()
                with clocks(cuda=device.type == "cuda") as took:
                    fn(h, w, batch, labels_sb)
                if rep:  # rep 0 warms up
                    times[name].append(took["cpu"])
                    walls[name].append(took["wall"])
        peaks = {}
        for name, fn in impls.items():
            barrier()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn(h, w, batch, labels_sb)
                torch.cuda.synchronize()
                peaks[name] = torch.cuda.max_memory_allocated() - base
            else:
                peaks[name] = peak_bytes(lambda: fn(h, w, batch, labels_sb))
        out[seq] = {
            **summarize(times, walls),
            "peak": peaks,
            "logits": seq * b * width * torch.finfo(dtype).bits // 8,
        }
        print(f"rank {tp_rank} s={seq}: " + ", ".join(
            f"{n} {out[seq]['cpu'][n]:.3f}s/{out[seq]['wall'][n]:.3f}s {peaks[n] / 2**20:.0f}MiB" for n in impls
        ), flush=True)
        del h, w, hidden, weight
    return out


def _rank(rank, args) -> dict:
    """This rank's measurements at TP=args.tp (runs in a spawned gloo rank)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    try:
        group = parallel_state.get_tensor_model_parallel_group()
        return measure(args, group, rank, args.tp, torch.device("cpu"), dist.barrier)
    finally:
        parallel_state.destroy_model_parallel()


def run_cpu(args) -> dict:
    """CPU mode: args.tp gloo ranks; rank 0's measurements."""
    return run_ranks(_rank, args.tp, args, threads=args.threads, timeout=7200, patch=True)


def run_gpu(args) -> dict:
    """One GPU, TP=1 (a one-rank process group so megatron's parallel state exists)."""
    from megatron.core import parallel_state

    with one_gpu_group():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        try:
            return measure(args, parallel_state.get_tensor_model_parallel_group(), 0, 1, torch.device("cuda"),
                           lambda: None)
        finally:
            parallel_state.destroy_model_parallel()


def table(args, results: dict) -> str:
    clock = "cpu" if args.device == "cpu" else "wall"
    unit = "CPU s" if clock == "cpu" else "GPU s"
    names = list(args.impls)
    head = ["s"] + [f"{unit} {n}" for n in names] + [f"peak MiB {n}" for n in names]
    others = [n for n in names if n != "megatron CE"]
    head += [f"time {n} / CE" for n in others] + [f"peak {n} / CE" for n in others]
    if args.device == "cuda":
        head += [f"tokens/s {n}" for n in names] + [f"MFU {n}" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for seq, r in results.items():
        t, p = r[clock], r["peak"]
        row = [str(seq)] + [f"{t[n]:.3f}" for n in names] + [mib(p[n]) for n in names]
        if "megatron CE" in names:
            row += [f"{t[n] / t['megatron CE']:.2f}x" for n in others]
            row += [f"{p[n] / max(p['megatron CE'], 1):.2f}x" for n in others]
        if args.device == "cuda":
            tokens = seq * args.batch
            flops = 6 * tokens * args.hidden * args.vocab
            row += [f"{tokens / t[n]:.0f}" for n in names]
            row += [f"{flops / t[n] / (args.peak_tflops * 1e12):.1%}" for n in names]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def verdict(args, results: dict) -> str:
    clock = "cpu" if args.device == "cpu" else "wall"
    longest = max(results)
    r = results[longest]
    t, p = r[clock], r["peak"]
    lines = [f"Against the targets at s={longest}:"]
    if "DCD full" in t:
        x = t["DCD full"] / t["megatron CE"]
        lines.append(f"- DCD (full logits) time {x:.2f}x megatron's CE (target <= 1.10x: {'met' if x <= 1.10 else 'not met'})")
    if "DCD chunked" in t:
        x = t["DCD chunked"] / t["megatron CE"]
        m = p["DCD chunked"] / p["megatron CE"]
        lines.append(f"- DCD chunked time {x:.2f}x megatron's CE (target <= 1.15x: {'met' if x <= 1.15 else 'not met'}; "
                     f"<= 1.10x: {'met' if x <= 1.10 else 'not met'})")
        lines.append(f"- DCD chunked peak memory {m:.3f}x megatron's CE path (target <= 0.25x: "
                     f"{'met' if m <= 0.25 else 'not met'})")
    for name, label in (("DCD chunked prefix", "DCD chunked, `prefix` weights (recompute)"),
                        ("DCD full topk", "DCD full, `term=topk_kl`"),
                        ("DCD chunked topk", "DCD chunked, `term=topk_kl`")):
        if name in t:
            x, m = t[name] / t["megatron CE"], p[name] / p["megatron CE"]
            lines.append(f"- {label}: time {x:.2f}x, peak {m:.3f}x megatron's CE path")
    return "\n".join(lines)


def section(args, results: dict, load: tuple, elapsed: float) -> str:
    cmd = (f"python benchmarks/loss_seq_sweep.py --seqs {' '.join(map(str, args.seqs))} --vocab {args.vocab} "
           f"--hidden {args.hidden} --batch {args.batch} --chunk {args.chunk} --reps {args.reps} "
           f"--threads {args.threads} --dtype {args.dtype}")
    return f"""{SECTION}

Forward+backward from the final hidden states `[s, b, h]` to the gradients of the hidden states
and of the output-layer weight shard (the output layer's matmul included, since the chunked
loss does it itself), TP={args.tp} over gloo, b={args.batch}, h={args.hidden}, V={args.vocab}
(V/tp={args.vocab // args.tp}), {args.dtype}, `loss.chunk_size={args.chunk}`; median of {args.reps}
interleaved repetitions after one warm-up, rank 0. Implementations: **megatron CE** =
`copy_to_tensor_model_parallel_region` -> `F.linear` -> megatron-core's
`vocab_parallel_cross_entropy` -> sum (megatron's own SFT path); **DCD full** = the same
logits into the DCD loss function (`sigmoid`, report included); **DCD chunked** = the DCD loss
function from the hidden states (fused scheme); **DCD chunked prefix** = `prefix` weights
(recompute scheme). Time is CPU seconds of the rank (`time.process_time`, user + system);
peak is the most bytes torch held above the inputs during the call (torch.profiler memory
events; the same accounting for every row).

Machine: {machine()}, {args.threads} thread(s) per rank, glibc's default allocator; the machine
is shared: load average {load[0]:.1f} before and {load[1]:.1f} after ({elapsed / 60:.1f} min).
Command: `{cmd}` (`make bench` runs it with the defaults and rewrites this section).

{table(args, results)}

{verdict(args, results)}
"""


PRESETS = {
    # one H100: TP=1, a Qwen2.5-7B-like head (V=152064, h=3584), bf16, s up to 32k
    "h100": dict(device="cuda", tp=1, vocab=152064, hidden=3584, dtype="bf16", seqs=[4096, 8192, 16384, 32768],
                 chunk=4096, reps=5),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=list(PRESETS), help="GPU settings (overrides the sizes)")
    parser.add_argument("--tp", type=int, default=2, help="CPU: gloo ranks (GPU mode is TP=1)")
    # 1k, 4k, 16k and 2 repetitions: about 25 min of wall time on the shared 2-core machine
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=None, help="loss.chunk_size (default: DCDConfig's)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads per rank")
    parser.add_argument("--impls", nargs="+", choices=IMPLS + TOPK_IMPLS + GATED_IMPLS, default=list(IMPLS))
    parser.add_argument("--topk", type=int, default=8, help="teacher top-k ids per token (for the topk impls)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="GPU: for MFU")
    parser.add_argument("--write", type=Path, help="rewrite this section of a markdown file (CPU mode)")
    args = parser.parse_args(argv)
    resolve_sizes(args, PRESETS)
    if args.device == "cuda":
        args.tp = 1
    if args.vocab % args.tp:
        parser.error(f"--vocab must be divisible by --tp={args.tp}")
    results, load, elapsed = run_watched(run_cpu if args.device == "cpu" else run_gpu, args)
    print(table(args, results))
    print(verdict(args, results))
    if args.write:
        write_section(args.write, SECTION, section(args, results, load, elapsed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
