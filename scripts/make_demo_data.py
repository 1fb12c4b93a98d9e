"""Make the bundled demo traces: train a small teacher on digit-sum traces, sample with log-probs.

    .venv/bin/python scripts/make_demo_data.py [--out dcd_megatron/assets/demo] [--teacher-steps 600]

Writes tokenizer.json (+ tokenizer_config.json), train.jsonl and valid.jsonl: correct teacher
samples at temperature 1 with `teacher_logprobs` (one per response token, plus the end-of-text
token), and a README recording the command and the counts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from dcd_megatron.lab import task


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="dcd_megatron/assets/demo")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--teacher-rows", type=int, default=8000)
    p.add_argument("--n-train", type=int, default=1200)
    p.add_argument("--n-valid", type=int, default=100)
    p.add_argument("--k-min", type=int, default=2)
    p.add_argument("--k-max", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-checkpoint", default=None,
                   help="sample from this dcd-train checkpoint instead of training a teacher")
    return p.parse_args(argv)


def teacher_config(train_path: Path, tokenizer: Path, out: Path, steps: int, seed: int):
    """A 3-layer, d=96 teacher trained with plain SFT on correct traces of all three styles."""
    from dcd_megatron.loss import DCDConfig
    from dcd_megatron.recipes import demo_data, tiny_distill_1cpu_fp32_config, tiny_model
    from dcd_megatron.tracking import TrackingConfig

    cfg = tiny_distill_1cpu_fp32_config(str(out))
    cfg.model = tiny_model(num_layers=3, hidden_size=96, ffn_hidden_size=256)
    data = demo_data()
    data.train_path, data.valid_path, data.tokenizer = str(train_path), None, str(tokenizer)
    data.valid_fraction = 0.02
    cfg.data = data
    cfg.loss = DCDConfig(method="sft")
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps = 3e-3, 1e-4, 30
    cfg.train.steps, cfg.train.global_batch_size, cfg.train.micro_batch_size = steps, 32, 8
    cfg.train.save_interval, cfg.train.eval_interval, cfg.train.log_interval = 0, steps, 50
    cfg.train.seed = seed
    cfg.tracking = TrackingConfig(enabled=False)
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    from dcd_megatron.data import load_tokenizer
    from dcd_megatron.lab.sampling import sample_with_logprobs
    from dcd_megatron.model.inference import load_trained_model
    from dcd_megatron.train.loop import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = task.build_tokenizer(out)
    work = Path(tempfile.mkdtemp(prefix="dcd-demo-"))
    rows = task.teacher_rows(
        args.teacher_rows, k_min=2, k_max=8,
        style_weights={"verbose": 0.5, "skip2": 0.25, "skip3": 0.25}, seed=args.seed,
    )
    teacher_train = work / "teacher_train.jsonl"
    teacher_train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.teacher_checkpoint:
        checkpoint, teacher_loss = args.teacher_checkpoint, None
        final = Path(checkpoint).parent.parent / "final_metrics.json"
        if final.is_file():
            teacher_loss = json.loads(final.read_text()).get("loss")
    else:
        t0 = time.time()
        result = train(teacher_config(teacher_train, tok_path, work / "teacher", args.teacher_steps, args.seed))
        checkpoint, teacher_loss = result.checkpoint, result.metrics.get("loss")
        print(f"teacher trained in {time.time() - t0:.0f}s: {teacher_loss:.4f} loss", flush=True)

    model, tokenizer = load_trained_model(checkpoint, device="cpu")
    tok = load_tokenizer(str(tok_path))
    rng = random.Random(args.seed + 1)
    want = args.n_train + args.n_valid
    kept: list[dict] = []
    drawn = 0
    while len(kept) < want:
        batch = [task.random_digits(rng, rng.randint(args.k_min, args.k_max)) for _ in range(256)]
        prompts = [[tok.bos_id, *tok.encode(task.make_prompt(d))] for d in batch]
        samples = sample_with_logprobs(
            model.logits, prompts, eos_id=tok.eos_id, max_new_tokens=96, temperature=1.0,
            seed=args.seed + drawn,
        )
        drawn += len(batch)
        for digits, (ids, lps) in zip(batch, samples):
            if not ids or ids[-1] != tok.eos_id:
                continue
            response = tok.decode(ids[:-1])
            if tok.encode(response) != ids[:-1] or not task.is_correct(digits, response):
                continue
            if task.first_error(digits, response) is not None:  # right answer, wrong steps
                continue
            kept.append({
                "prompt": task.make_prompt(digits),
                "response": response,
                "teacher_logprobs": [round(x, 5) for x in lps],
                "answer": str(sum(int(c) for c in digits)),
                "style": task.style_of(response),
            })
            if len(kept) == want:
                break
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept[: args.n_train]))
    (out / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept[args.n_train :]))
    styles = {s: sum(r["style"] == s for r in kept) for s in sorted({r["style"] for r in kept})}
    note = (
        "# Demo traces\n\n"
        "Made by `.venv/bin/python scripts/make_demo_data.py " + " ".join(sys.argv[1:]) + "`.\n\n"
        f"Teacher: 3 layers, d=96, SFT for {args.teacher_steps} steps on {args.teacher_rows} correct digit-sum "
        "traces (k=2..8; half verbose, a quarter each skip2/skip3); final training loss "
        f"{teacher_loss if teacher_loss is None else round(teacher_loss, 4)}.\n"
        f"Samples at temperature 1 for k={args.k_min}..{args.k_max}: {drawn} drawn, {len(kept)} kept whose every step "
        "and answer are right "
        f"({args.n_train} train, {args.n_valid} valid); styles {styles}.\n"
        "`teacher_logprobs` has one entry per response token plus one for the end-of-text token.\n"
    )
    (out / "README.md").write_text(note)
    print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
