"""Benchmark: dcd-generate's sampler (KV cache, log-probs of the sampling distribution) against Hugging Face
`transformers` `generate` with scores, on the same converted model, prompts and batch, in one run.

One random Llama-style Hugging Face model, converted with dcd-convert and loaded as dcd-generate
loads a teacher. Both sample `--new-tokens` tokens per prompt (no eos) at the same temperature and
top-p: (a) `sampling.generation.sample` over `KVCachedGPT` with the sampled token's log-prob and
the top-K of the kept distribution, (b) `model.generate(do_sample=True, output_scores=True)` and
the log-softmax of its processed scores (what a user would do for the same numbers). The table
gives median wall seconds, tokens/s and the ratio (goal: >= 1.0x).

    python benchmarks/generate.py
    python benchmarks/generate.py --write docs/performance.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._harness import clocks, machine, run_watched, summarize, write_section  # noqa: E402
from benchmarks.decode import build  # noqa: E402

HEADING = "## Generation with log-probs: dcd-generate's sampler vs transformers `generate` (`benchmarks/generate.py`)"
OURS, HF = "dcd-generate sampler (KV cache)", "transformers generate (scores)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=4, help="key/value heads")
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="sampled tokens per prompt")
    p.add_argument("--batch", type=int, default=8, help="prompts decoded together")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--logprob-top-k", type=int, default=4)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--write", type=Path, default=None, help="rewrite this benchmark's section of that file")
    return p.parse_args(argv)


def _ours(kv, prompts, args):
    from dcd_megatron.sampling.generation import sample

    return sample(kv, prompts, max_new_tokens=args.new_tokens, eos_id=None, temperature=args.temperature,
                  top_p=args.top_p, n=1, batch_size=args.batch, logprob_top_k=args.logprob_top_k, progress=False)


def _hf(model, prompts, args):
    ids = torch.tensor(prompts)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=args.temperature,
                         top_p=args.top_p, top_k=0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    logprobs = torch.log_softmax(torch.stack(out.scores, dim=1).float(), dim=-1)  # processed: renormalised kept set
    new = out.sequences[:, ids.shape[1]:]
    return logprobs.gather(-1, new.unsqueeze(-1)).squeeze(-1), logprobs.topk(args.logprob_top_k, dim=-1)


def run(args) -> dict:
    from transformers import AutoModelForCausalLM

    from dcd_megatron.model.kv_decoder import KVCachedGPT

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        loaded, _ = build(argparse.Namespace(**vars(args), device="cpu", dtype="fp32"), Path(tmp))
        kv = KVCachedGPT.from_loaded(loaded)
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", attn_implementation="sdpa").eval()
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, loaded.vocab_size, (args.prompt,), generator=g).tolist() for _ in range(args.batch)]
        cpu, wall = {OURS: [], HF: []}, {OURS: [], HF: []}
        for _ in range(args.reps):  # interleaved: drift in machine load hits both
            for name, fn in ((OURS, lambda: _ours(kv, prompts, args)), (HF, lambda: _hf(hf, prompts, args))):
                with torch.inference_mode(), clocks(cuda=False) as c:
                    fn()
                cpu[name].append(c["cpu"])
                wall[name].append(c["wall"])
    return dict(summarize(cpu, wall), params=sum(p.numel() for p in loaded.module.parameters()))


def section(args, result: dict, load: tuple, elapsed: float) -> str:
    tokens = args.batch * args.new_tokens
    lines = [
        HEADING, "",
        f"`python benchmarks/generate.py --layers {args.layers} --hidden {args.hidden} --heads {args.heads} "
        f"--groups {args.groups} --ffn {args.ffn} --prompt {args.prompt} --new-tokens {args.new_tokens} "
        f"--batch {args.batch} --temperature {args.temperature} --top-p {args.top_p} "
        f"--logprob-top-k {args.logprob_top_k} --reps {args.reps}`",
        "",
        f"Machine: {machine()}; load average {load[0]:.1f} before, {load[1]:.1f} after; {elapsed:.0f} s wall. "
        f"Model: {result['params'] / 1e6:.1f} M parameters, fp32 on CPU; {args.batch} prompts of {args.prompt} "
        f"tokens, {args.new_tokens} sampled tokens each, with each token's log-prob and the top-{args.logprob_top_k}.",
        "",
        "| sampler | median CPU s | median wall s | tokens/s (wall) | speed vs transformers |",
        "|---|---|---|---|---|",
    ]
    for name in (OURS, HF):
        lines.append(f"| {name} | {result['cpu'][name]:.2f} | {result['wall'][name]:.2f} | "
                     f"{tokens / result['wall'][name]:.0f} | {result['wall'][HF] / result['wall'][name]:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    result, load, elapsed = run_watched(run, args)
    text = section(args, result, load, elapsed)
    print(text)
    if args.write:
        write_section(args.write, HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
