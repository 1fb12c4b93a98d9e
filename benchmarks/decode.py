"""Benchmark: dcd-eval's greedy decoding, KV-cached decoder against megatron's recompute forward.

One model (a randomly initialised Llama-style Hugging Face model converted with dcd-convert,
so the real loading path), loaded with `load_trained_model` as `dcd-eval --checkpoint` does;
the same prompts decoded greedily for exactly `--new-tokens` tokens (no eos) by
`eval.generation.generate` over (a) `KVCachedGPT` (the default) and (b) `LoadedModel.logits`
(`--recompute`: megatron's GPTModel over the whole prefix at every token). Both must produce
the same tokens; the table gives median CPU/wall seconds and the ratio, measured in one run.

    python benchmarks/decode.py
    python benchmarks/decode.py --write docs/performance.md
    python benchmarks/decode.py --device cuda --dtype bf16 --layers 16 --hidden 2048 --new-tokens 1024
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

HEADING = "## Decoding: KV cache vs recompute (`benchmarks/decode.py`)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=4, help="key/value heads")
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="generated tokens per prompt")
    p.add_argument("--batch", type=int, default=4, help="prompts decoded together")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--write", type=Path, default=None, help="rewrite this benchmark's section of that file")
    return p.parse_args(argv)


def build(args, root: Path):
    """A converted random model of the requested size, loaded as dcd-eval loads a checkpoint."""
    from dcd_megatron.convert import convert_hf_to_mcore
    from dcd_megatron.convert.tiny import make_tiny_hf_model
    from dcd_megatron.lab import task
    from dcd_megatron.model.inference import load_trained_model

    task.build_tokenizer(root / "tok")
    hf = make_tiny_hf_model(root / "hf", arch="llama", tokenizer_dir=root / "tok", tied=False, num_layers=args.layers,
                            hidden_size=args.hidden, num_heads=args.heads, num_kv_heads=args.groups,
                            ffn_size=args.ffn, seed=0)
    ckpt = convert_hf_to_mcore(hf, root / "mcore").checkpoint
    loaded, tok = load_trained_model(ckpt, device=args.device)
    if args.dtype == "bf16":
        loaded.module.to(torch.bfloat16)
    return loaded, tok


def run(args) -> dict:
    from dcd_megatron.eval.generation import generate
    from dcd_megatron.model.kv_decoder import KVCachedGPT

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        loaded, tok = build(args, Path(tmp))
        kv = KVCachedGPT.from_loaded(loaded)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, loaded.vocab_size, (args.prompt,), generator=g).tolist() for _ in range(args.batch)]
        common = dict(max_new_tokens=args.new_tokens, eos_id=None, batch_size=args.batch, progress=False,
                      device=loaded.device)
        variants = {"KV cache (default)": kv, "recompute (--recompute)": loaded.logits}
        cpu = {k: [] for k in variants}
        wall = {k: [] for k in variants}
        outputs = {}
        for _ in range(args.reps):
            for name, model in variants.items():  # interleaved: drift in machine load hits both
                with clocks(cuda=args.device == "cuda") as c:
                    outputs[name] = generate(model, prompts, **common)
                cpu[name].append(c["cpu"])
                wall[name].append(c["wall"])
        same = outputs["KV cache (default)"] == outputs["recompute (--recompute)"]
    return dict(summarize(cpu, wall), same=same, params=sum(p.numel() for p in loaded.module.parameters()))


def section(args, result: dict, load: tuple, elapsed: float) -> str:
    base = "recompute (--recompute)"
    lines = [
        HEADING, "",
        f"`python benchmarks/decode.py --layers {args.layers} --hidden {args.hidden} --heads {args.heads} "
        f"--groups {args.groups} --ffn {args.ffn} --prompt {args.prompt} --new-tokens {args.new_tokens} "
        f"--batch {args.batch} --reps {args.reps} --device {args.device} --dtype {args.dtype}`",
        "",
        f"Machine: {machine()}; load average {load[0]:.1f} before, {load[1]:.1f} after; {elapsed:.0f} s wall. "
        f"Model: {result['params'] / 1e6:.1f} M parameters; {args.batch} prompts of {args.prompt} tokens, "
        f"{args.new_tokens} greedy tokens each. Same tokens from both: {'yes' if result['same'] else 'NO'}.",
        "",
        "| decoder | median CPU s | fastest CPU s | median wall s | wall vs recompute |",
        "|---|---|---|---|---|",
    ]
    for name in result["wall"]:
        lines.append(
            f"| {name} | {result['cpu'][name]:.2f} | {result['cpu_min'][name]:.2f} | {result['wall'][name]:.2f} | "
            f"{result['wall'][name] / result['wall'][base]:.3f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    result, load, elapsed = run_watched(run, args)
    text = section(args, result, load, elapsed)
    print(text)
    if not result["same"]:
        print("error: the KV-cached decoder and megatron's recompute produced different tokens", file=sys.stderr)
        return 1
    if args.write:
        write_section(args.write, HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
