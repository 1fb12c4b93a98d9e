"""Benchmark: end-to-end training step time of DCD against SFT, same model and data.

Every variant gets its own copy of one GPTModel (same seed, so the same weights), megatron's
DDP, the project's optimizer (``train/optim.py``) and the same micro-batches; a step is
what ``dcd-train`` does: ``forward_backward_func`` over the micro-batches,
``rescale_grads_for_global_weight_mean``, ``optimizer.step()``. Variants, interleaved:

- ``SFT (megatron)``: GPTModel with ``labels`` (megatron's own ``vocab_parallel_cross_entropy``
  inside the model), masked sum per token: the plain-SFT baseline as Megatron-LM runs it;
- ``DCD chunked``: the DCD loss (``sigmoid`` weights, report and global rescale included)
  with ``loss.chunk_size`` (the default path);
- ``DCD full``: the same with ``loss.chunk_size=0`` (full logits).

CPU mode (default): ``--tp`` gloo ranks (1 by default), CPU seconds of rank 0 per step.
GPU mode (``--device cuda --preset h100``): one GPU, wall time per step, tokens/s and MFU
(model flops ``6 N + 6 L s h`` per token (causal attention) + ``6 h V`` for the output
layer, against ``--peak-tflops``).

    python benchmarks/train_step.py
    python benchmarks/train_step.py --write docs/performance.md
    python benchmarks/train_step.py --device cuda --preset h100     # one H100, < 8 min
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._harness import (  # noqa: E402
    H100_BF16_DENSE_TFLOPS, clocks, machine, one_gpu_group, resolve_sizes, run_ranks, run_watched, summarize,
    write_section,
)

SECTION = "## Training step: DCD against SFT"
VARIANTS = ("SFT (megatron)", "DCD chunked", "DCD full")


def _model_config(args):
    from dcd_megatron.model.config import ModelConfig

    return ModelConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.groups, vocab_size=args.vocab, max_position_embeddings=args.seq,
        params_dtype=args.dtype, untie_embeddings_and_output_weights=True,
    )


def _batches(args, device):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.micro):
        b, s = args.micro_batch, args.seq
        mask = torch.ones(b, s)
        mask[:, : s // 8] = 0  # a prompt: no loss on it
        out.append({
            "tokens": torch.randint(0, args.vocab, (b, s), generator=g).to(device),
            "labels": torch.randint(0, args.vocab, (b, s), generator=g).to(device),
            "loss_mask": mask.to(device),
            "teacher_logprobs": (-torch.rand(b, s, generator=g) * 3).to(device),
            "position_ids": torch.arange(s).expand(b, s).to(device),
        })
    return out


def _sft_loss(batch, output_tensor):
    """Megatron-LM's pretrain_gpt loss: masked sum of the per-token CE and the token count."""
    mask = batch["loss_mask"].float()
    loss = (output_tensor.float() * mask).sum()
    n = mask.sum().to(torch.int)
    return loss, n, {"lm loss": torch.stack([loss.detach().double(), n.double()])}


def _build(args, variant, tconfig, padded_vocab, device, facts):
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from dcd_megatron.model.builder import build_gpt_model, return_hidden_states
    from dcd_megatron.configs.train import OptimConfig
    from dcd_megatron.train.optim import build_optimizer

    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    model = build_gpt_model(
        _model_config(args), tconfig, padded_vocab_size=padded_vocab, max_sequence_length=args.seq,
        pre_process=True, post_process=True, use_te=args.use_te,
    ).to(device)
    if variant == "DCD chunked":
        return_hidden_states(model)
    ddp = DistributedDataParallel(tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = build_optimizer(OptimConfig(), [ddp], params_dtype=args.dtype, facts=facts)
    n_params = sum(p.numel() for p in model.parameters())
    return ddp, optimizer, n_params


def _forward_step(args, variant, tp_group, step_no):
    from dcd_megatron.loss import DCDConfig, make_loss_func
    from dcd_megatron.train.step import make_forward_step

    device = torch.device(args.device)
    if variant == "SFT (megatron)":
        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            out = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                        labels=batch["labels"])
            return out, functools.partial(_sft_loss, batch)

        return forward_step
    chunk = args.chunk if variant == "DCD chunked" else 0
    loss_fn = make_loss_func(DCDConfig(method="sigmoid", chunk_size=chunk), tp_group=tp_group, step=step_no)
    return make_forward_step(loss_fn, packed=False, use_te=args.use_te, device=device,
                             hidden_states=variant == "DCD chunked")


def measure(args, tp: int, rank: int) -> dict:
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from dcd_megatron.loss import rescale_grads_for_global_weight_mean
    from dcd_megatron.model.builder import transformer_config
    from dcd_megatron.runtime.distributed import runtime_facts
    from dcd_megatron.runtime.layout import Layout

    device = torch.device(args.device)
    facts = runtime_facts(device, use_te=args.use_te)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    mcfg = _model_config(args)
    tconfig = transformer_config(mcfg, Layout(tp, 1, 1, 1), sequence_parallel=False, facts=facts)
    tconfig.finalize_model_grads_func = finalize_model_grads
    padded_vocab = mcfg.padded_vocab_size(args.vocab, tp)
    built = {v: _build(args, v, tconfig, padded_vocab, device, facts) for v in args.variants}
    batches = _batches(args, device)
    fb = get_forward_backward_func()
    times = {v: [] for v in args.variants}
    walls = {v: [] for v in args.variants}
    losses = {v: [] for v in args.variants}
    for rep in range(args.steps + 1):
        for v in args.variants:
            ddp, optimizer, _ = built[v]
            torch.distributed.barrier()
            with clocks(cuda=device.type == "cuda") as took:
                ddp.zero_grad_buffer()
                optimizer.zero_grad()
                reports = fb(forward_step_func=_forward_step(args, v, tp_group, rep), data_iterator=iter(batches),
                             model=[ddp], num_microbatches=args.micro, seq_length=args.seq,
                             micro_batch_size=args.micro_batch)
                if v != "SFT (megatron)":
                    rescale_grads_for_global_weight_mean([ddp], reports, dp_cp_group=None)
                optimizer.step()
            key = "lm loss" if v == "SFT (megatron)" else "ce"
            total = sum(r[key] for r in reports)
            losses[v].append(float(total[0] / total[1]))
            if rep:  # step 0 warms up
                times[v].append(took["cpu"])
                walls[v].append(took["wall"])
        if rank == 0:
            print(f"step {rep}: " + ", ".join(f"{v} {walls[v][-1] if rep else 0:.2f}s" for v in args.variants), flush=True)
    parallel_state.destroy_model_parallel()
    n_params = built[args.variants[0]][2]
    return {
        **summarize(times, walls),
        "loss": losses,
        "params": n_params * tp,  # full model (embedding + head included)
        "padded_vocab": padded_vocab,
    }


def _rank(rank, args) -> dict:
    """This rank's step times at TP=args.tp (runs in a spawned gloo rank)."""
    return measure(args, args.tp, rank)


def run_cpu(args) -> dict:
    """CPU mode: args.tp gloo ranks; rank 0's step times."""
    return run_ranks(_rank, args.tp, args, threads=args.threads, timeout=7200, patch=True)


def run_gpu(args) -> dict:
    """One GPU, TP=1."""
    with one_gpu_group():
        return measure(args, 1, 0)


def model_flops_per_token(args, params: int, padded_vocab: int) -> float:
    """6 x (non-embedding, non-head parameters) + causal attention + the output layer, fwd+bwd."""
    head_and_embedding = 2 * padded_vocab * args.hidden
    return 6 * (params - head_and_embedding) + 6 * args.layers * args.seq * args.hidden + 6 * args.hidden * padded_vocab


def table(args, r: dict) -> str:
    clock = "cpu" if args.device == "cpu" else "wall"
    base = "SFT (megatron)" if "SFT (megatron)" in args.variants else args.variants[0]
    tokens = args.micro * args.micro_batch * args.seq
    flops = model_flops_per_token(args, r["params"], r["padded_vocab"]) * tokens
    head = ["variant", "CPU s / step" if clock == "cpu" else "s / step", f"ratio to {base}",
            "ratio of the fastest steps", "tokens/s", "first / last step CE"]
    if args.device == "cuda":
        head.append("MFU")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for v in args.variants:
        t = r[clock][v]
        row = [v, f"{t:.3f}", f"{t / r[clock][base]:.3f}x",
               f"{r['cpu_min'][v] / r['cpu_min'][base]:.3f}x" if clock == "cpu" else "",
               f"{tokens / t:.0f}", f"{r['loss'][v][0]:.4f} / {r['loss'][v][-1]:.4f}"]
        if args.device == "cuda":
            row.append(f"{flops / t / (args.peak_tflops * 1e12):.1%}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def verdict(args, r: dict) -> str:
    clock = "cpu" if args.device == "cpu" else "wall"
    if "SFT (megatron)" not in args.variants:
        return ""
    lines = ["Against the target (DCD step time <= 1.03x SFT):"]
    for v in args.variants:
        if v == "SFT (megatron)":
            continue
        x = r[clock][v] / r[clock]["SFT (megatron)"]
        lines.append(f"- {v}: {x:.3f}x ({'met' if x <= 1.03 else 'not met'})")
    return "\n".join(lines)


def section(args, r: dict, load: tuple, elapsed: float) -> str:
    cmd = (f"python benchmarks/train_step.py --layers {args.layers} --hidden {args.hidden} --heads {args.heads} "
           f"--groups {args.groups} --vocab {args.vocab} --seq {args.seq} --micro {args.micro} "
           f"--micro-batch {args.micro_batch} --steps {args.steps} --tp {args.tp} --threads {args.threads} "
           f"--chunk {args.chunk} --dtype {args.dtype}")
    return f"""{SECTION}

One optimizer step of a {args.layers}-layer GPTModel (h={args.hidden}, {args.heads} heads, {args.groups} query
groups, V={args.vocab} padded to {r['padded_vocab']}, {r['params'] / 1e6:.1f}M parameters, untied head,
local layer spec, {args.dtype}) at TP={args.tp} over gloo: {args.micro} micro-batch(es) of
{args.micro_batch} x {args.seq} tokens (the first eighth of each row is a prompt with loss mask 0),
megatron's `forward_backward_func`, DDP, the global weight rescale (DCD), Adam. Median of
{args.steps} interleaved steps after one warm-up step, CPU seconds of rank 0
(`time.process_time`). Every variant starts from the same weights and sees the same
micro-batches; the last column shows that they train alike (DCD's column is its unweighted CE).

Machine: {machine()}, {args.threads} thread(s) per rank; shared, load average {load[0]:.1f} before and
{load[1]:.1f} after ({elapsed / 60:.1f} min).
Command: `{cmd}` (`make bench` runs it with the defaults and rewrites this section).

{table(args, r)}

{verdict(args, r)}
"""


PRESETS = {
    # one H100, a Qwen2.5-0.5B-shaped student (24 x 896, 14 heads / 2 groups, V=151936), bf16;
    # 4096-token rows so that the local spec's unfused attention also fits where TE is missing
    "h100": dict(device="cuda", tp=1, layers=24, hidden=896, heads=14, groups=2, vocab=151936, seq=4096,
                 micro=8, micro_batch=1, dtype="bf16", steps=5, chunk=4096),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=list(PRESETS), help="GPU settings (overrides the sizes)")
    parser.add_argument("--tp", type=int, default=1, help="CPU: gloo ranks (GPU mode is TP=1)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=None, help="loss.chunk_size of 'DCD chunked' (default: DCDConfig's)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads per rank")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="GPU: for MFU")
    parser.add_argument("--write", type=Path, help="rewrite this section of a markdown file")
    args = parser.parse_args(argv)
    resolve_sizes(args, PRESETS)
    args.use_te = False
    if args.device == "cuda":
        from dcd_megatron.runtime.distributed import has_transformer_engine

        args.tp, args.use_te = 1, has_transformer_engine()
    r, load, elapsed = run_watched(run_cpu if args.device == "cpu" else run_gpu, args)
    print(table(args, r))
    print(verdict(args, r))
    if args.write:
        write_section(args.write, SECTION, section(args, r, load, elapsed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
