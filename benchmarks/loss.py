"""Benchmark: the DCD loss vs megatron-core's vocab_parallel_cross_entropy (time and peak memory).

Two gloo ranks (TP=2) each hold a ``[s*b, V/2]`` logits shard. For fp32 and bf16 logits it
times forward+backward of (a) megatron-core's ``vocab_parallel_cross_entropy`` summed over
tokens and (b) the DCD loss function (``sigmoid`` weights, report included) on the same
shard, interleaved, and reports medians and ratios. Peak memory is measured the same way for
both, in a separate profiled call: torch.profiler's memory events (every allocation and free
torch makes, in order) give the peak of bytes allocated above the starting point; the logits
shard (an input both need) is added to give the peak held during the call.

    python benchmarks/loss.py                      # print the table
    python benchmarks/loss.py --write docs/performance.md   # also rewrite its "Loss benchmark" section
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._harness import clocks, machine, mib, peak_bytes, run_ranks, summarize, write_section  # noqa: E402

SECTION = "## Loss benchmark"
TP = 2


def _rank(rank, args) -> dict:
    """This rank's medians, minima and peaks per logits dtype (runs in a spawned gloo rank)."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from dcd_megatron.loss import DCDConfig, make_loss_func

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
    group = parallel_state.get_tensor_model_parallel_group()
    width = args.vocab // TP
    g = torch.Generator().manual_seed(rank)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    batch = {
        "labels": labels,
        "loss_mask": torch.ones(args.batch, args.seq),
        "teacher_logprobs": -torch.rand(args.batch, args.seq, generator=g) * 3,
    }
    dcd = make_loss_func(DCDConfig(method="sigmoid"), tp_group=group, chunk_elements=args.chunk_elements or None)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        # megatron's layout is [s, b, V/tp], ours [b, s, V/tp]; the same bytes
        base = (torch.randn(args.batch, args.seq, width, generator=g) * 2).to(dtype)

        # torch.autograd.grad hands the logits gradient back the way the output layer's
        # backward receives it (no extra copy into a leaf's .grad)
        def run_megatron(x):
            loss = tensor_parallel.vocab_parallel_cross_entropy(x, labels.t()).sum()
            return torch.autograd.grad(loss, x)

        def run_dcd(x):
            loss_sum, _, _ = dcd(batch, x)
            return torch.autograd.grad(loss_sum, x)

        impls = {"megatron": run_megatron, "dcd": run_dcd}
        cpu_times = {name: [] for name in impls}
        wall_times = {name: [] for name in impls}
        for rep in range(args.reps + 1):
            for name, fn in impls.items():
                x = base.clone().requires_grad_()  # the fresh input is not timed
                if name == "megatron":
                    x = x.detach().transpose(0, 1).clone().requires_grad_()
                dist.barrier()
                with clocks() as took:
                    fn(x)
                if rep > 0:  # rep 0 warms up
                    cpu_times[name].append(took["cpu"])
                    wall_times[name].append(took["wall"])
                del x
        mem = {}
        for name, fn in impls.items():
            x = base.clone().requires_grad_()
            if name == "megatron":
                x = x.detach().transpose(0, 1).clone().requires_grad_()
            dist.barrier()
            mem[name] = peak_bytes(functools.partial(fn, x))
            del x
        results[str(dtype).removeprefix("torch.")] = {
            **summarize(cpu_times, wall_times),
            "extra": mem,
            "logits": base.numel() * base.element_size(),
        }
    parallel_state.destroy_model_parallel()
    return results


# glibc hands large frees back to the OS, so every big buffer is fresh pages that fault on
# first touch; "caching" keeps freed memory for reuse, as PyTorch's CUDA allocator does.
ALLOCATORS = {
    "glibc default": {},
    "caching": {"MALLOC_MMAP_THRESHOLD_": str(2**40), "MALLOC_TRIM_THRESHOLD_": str(2**40)},
}


def run(args, allocator: str) -> dict:
    """One 2-rank measurement with the given allocator environment; rank 0's results."""
    saved = {k: os.environ.get(k) for k in ALLOCATORS["caching"]}
    for k in saved:
        os.environ.pop(k, None)
    os.environ.update(ALLOCATORS[allocator])  # read by glibc when the spawned ranks start
    try:
        return run_ranks(_rank, TP, args, threads=args.threads, timeout=3600, patch=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


SWEEP_CHUNKS = (1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24)


def chunk_sweep(args) -> dict:
    """CPU seconds of vocab_parallel_logprobs forward+backward (one shard, no TP) per block size."""
    from dcd_megatron.loss import vocab_parallel_logprobs

    torch.set_num_threads(args.threads)
    rows, width = args.seq * args.batch, args.vocab // TP
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, width, (rows,), generator=g)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        base = torch.randn(rows, width, generator=g).to(dtype)
        times = {c: [] for c in SWEEP_CHUNKS}
        for rep in range(args.reps + 1):
            for c in SWEEP_CHUNKS:
                x = base.clone().requires_grad_()
                start = time.process_time()
                value = vocab_parallel_logprobs(x, targets, chunk_elements=c)
                torch.autograd.grad(value.sum(), x)
                if rep:
                    times[c].append(time.process_time() - start)
                del x, value
        out[str(dtype).removeprefix("torch.")] = {c: statistics.median(v) for c, v in times.items()}
    return out


def sweep_table(sweep: dict) -> str:
    lines = ["| logits | " + " | ".join(f"2^{c.bit_length() - 1}" for c in SWEEP_CHUNKS) + " |",
             "| --- |" + " --- |" * len(SWEEP_CHUNKS)]
    for dtype, row in sweep.items():
        lines.append(f"| {dtype} | " + " | ".join(f"{row[c]:.3f}" for c in SWEEP_CHUNKS) + " |")
    return "\n".join(lines)


def table(results: dict) -> str:
    lines = [
        "| logits, allocator | CPU time (s) megatron CE / DCD | CPU time ratio (of the minima) "
        "| wall time (s) megatron CE / DCD | wall ratio | peak (MiB) megatron CE / DCD | peak ratio "
        "| extra over the logits (MiB) megatron CE / DCD |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (allocator, dtype), r in results.items():
        t, lo, w, extra, logits = r["cpu"], r["cpu_min"], r["wall"], r["extra"], r["logits"]
        peak_m, peak_d = logits + extra["megatron"], logits + extra["dcd"]
        lines.append(
            f"| {dtype}, {allocator} | {t['megatron']:.3f} / {t['dcd']:.3f} "
            f"| {t['dcd'] / t['megatron']:.2f}x ({lo['dcd'] / lo['megatron']:.2f}x) "
            f"| {w['megatron']:.3f} / {w['dcd']:.3f} | {w['dcd'] / w['megatron']:.2f}x "
            f"| {mib(peak_m)} / {mib(peak_d)} | {peak_d / peak_m:.2f}x "
            f"| {mib(extra['megatron'])} / {mib(extra['dcd'])} |"
        )
    return "\n".join(lines)


def verdict(results: dict) -> str:
    """Which rows meet the targets (DCD <= 1.10x megatron CE in CPU time and in peak memory)."""
    lines = ["Against the targets (DCD <= 1.10x megatron's CE):"]
    for (allocator, dtype), r in results.items():
        t, extra, logits = r["cpu"], r["extra"], r["logits"]
        time_ratio = t["dcd"] / t["megatron"]
        peak_ratio = (logits + extra["dcd"]) / (logits + extra["megatron"])
        ok = lambda x: "met" if x <= 1.10 else "not met"  # noqa: E731
        lines.append(f"- {dtype}, {allocator}: time {time_ratio:.2f}x ({ok(time_ratio)}), "
                     f"peak memory {peak_ratio:.2f}x ({ok(peak_ratio)})")
    return "\n".join(lines)


def section(args, results: dict, sweep: dict | None, load: tuple) -> str:
    cmd = (f"python benchmarks/loss.py --seq {args.seq} --batch {args.batch} --vocab {args.vocab} "
           f"--reps {args.reps} --threads {args.threads} --allocator '{args.allocator}'"
           + ("" if sweep else " --no-sweep"))
    sweep_text = "" if not sweep else f"""
Block size of `vocab_parallel_logprobs` (elements per fp32 scratch block, `chunk_elements`):
CPU seconds of forward+backward on one {args.seq * args.batch}x{args.vocab // TP} shard, no TP,
glibc default allocator, median of {args.reps} (same command). The fp32 path
keeps its exponentials in the future gradient buffer, so only its forward uses blocks;
the bf16 path recomputes in blocks, and small ones stay in cache. `CPU_CHUNK_ELEMENTS` is
the CPU default.

{sweep_table(sweep)}
"""
    return f"""{SECTION}

Forward+backward of the DCD loss function (`sigmoid` weights, report included) against
megatron-core's `vocab_parallel_cross_entropy` (summed), TP={TP} over gloo, each rank holding
a {args.seq}x{args.batch}x{args.vocab // TP} logits shard (s x b x V/tp, V={args.vocab}); median of
{args.reps} interleaved repetitions after one warm-up (the ratio of the fastest repetitions in
brackets: other jobs only ever add time), rank 0. Peak = logits shard + the peak
of torch's allocations during the call (torch.profiler memory events, same accounting for
both); the last column is that extra alone.

Machine: {machine()}, {args.threads} thread(s) per rank; the machine is shared, load
average {load[0]:.1f} before and {load[1]:.1f} after the run (`os.getloadavg`), so CPU time
(`time.process_time` of the rank: user + system, including page faults) is the measure to
read; wall time includes waiting for the CPU and for the other rank.
Command: `{cmd}`; `make bench-loss` reruns it with the default options and rewrites this section.

{table(results)}

{verdict(results)}

"glibc default" hands large frees back to the OS, so every large buffer is fresh pages
that fault on first touch (system time, counted in CPU time); "caching"
(`MALLOC_MMAP_THRESHOLD_`/`MALLOC_TRIM_THRESHOLD_` raised) keeps freed memory for reuse, as
PyTorch's CUDA caching allocator does on a GPU.
{sweep_text}
Why the ratios are what they are: megatron's CE works in place. With fp32 logits it
overwrites its input (exp, then the softmax, then the gradient, all in the logits buffer),
so it allocates almost nothing; the DCD log-probs must leave the logits intact (the loss
function may read them again, e.g. for a top-k KL term), so the gradient needs its own
logits-sized buffer: about 2x the logits at peak is the floor for any non-destructive
implementation. With bf16 logits megatron keeps an fp32 copy (2x the bf16 bytes) for
backward and returns an fp32 gradient that autograd casts to bf16; the DCD function saves
only the per-row log-sum-exp, recomputes the softmax in blocks of rows (fp32 temporaries
of `CPU_CHUNK_ELEMENTS` / `GPU_CHUNK_ELEMENTS` elements) and writes the bf16 gradient
directly. For fp32 logits the DCD function keeps `exp(x - max)` in the buffer that becomes
the gradient, so it computes the exponentials once, like megatron; what it adds over
megatron is that buffer's allocation (page faults on CPU with the default allocator).
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--allocator", choices=[*ALLOCATORS, "both"], default="both")
    parser.add_argument("--chunk-elements", type=int, default=0, help="the DCD loss's vocab_parallel_logprobs block size (0 = the default for the device)")
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                        help="also time vocab_parallel_logprobs per block size")
    parser.add_argument("--write", type=Path, help="rewrite the loss section of this markdown file")
    args = parser.parse_args(argv)
    if args.vocab % TP:
        parser.error(f"--vocab must be divisible by TP={TP}")
    load_before = os.getloadavg()[0]
    results = {}
    for allocator in ALLOCATORS if args.allocator == "both" else [args.allocator]:
        for dtype, r in run(args, allocator).items():
            results[(allocator, dtype)] = r
    print(table(results))
    sweep = None
    if args.sweep:
        sweep = chunk_sweep(args)
        print(sweep_table(sweep))
    load = (load_before, os.getloadavg()[0])
    if args.write:
        write_section(args.write, SECTION, section(args, results, sweep, load))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
