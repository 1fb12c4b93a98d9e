"""`dcd-score`: a teacher checkpoint scores trace responses -> a Parquet dataset that dcd-train reads.

    dcd-score --teacher CKPT --data TRACES --out DIR (--config STUDENT.yaml | --student-tokenizer PATH)
              [--temperature 1.0] [--top-k K] [--tp N] [--pp N] [data.key=value ...]

Tokenization is the student's (its training config's data section, or the defaults with
`data.*` overrides), so each log-prob belongs to the token training will see. Runs as one
process or under torchrun (data parallel over shards of rows; --tp and --pp for big teachers). A
rerun with the same --out resumes: finished shards are kept. Output: DIR/scored.parquet.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from dcd_megatron.recipes import RECIPES

    p = argparse.ArgumentParser(prog="dcd-score", description=__doc__.split("\n")[0],
                                epilog="Overrides: data.key=value for the student's data settings, e.g. "
                                "data.chat_template=chatml data.add_eos=false data.on_bad_row=skip.")
    p.add_argument("--teacher", required=True, help="teacher checkpoint (dcd-convert output, or a dcd-train run/iter dir)")
    p.add_argument("--data", required=True, help="traces to score: JSONL/Parquet file, glob, directory or dataset")
    p.add_argument("--out", required=True, help="output directory (DIR/scored.parquet)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="the student's training YAML (its data section fixes tokenization)")
    src.add_argument("--recipe", choices=sorted(RECIPES), help="take the student's data settings from a recipe")
    p.add_argument("--student-tokenizer", help="the student's tokenizer (overrides the config's data.tokenizer)")
    p.add_argument("--teacher-tokenizer",
                   help="the teacher's tokenizer, to check it against the student's (default: the path its checkpoint records)")
    p.add_argument("--temperature", type=float, default=1.0, help="score log_softmax(logits / T) (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="also store the top-k ids and log-probs per token")
    p.add_argument("--reference", action="store_true",
                   help="score as the frozen initial student for loss.reference=initial: --teacher is the checkpoint "
                   "the run starts from (model.init_checkpoint); writes student_ref_logprobs, keeps the teacher columns")
    p.add_argument("--rows-per-shard", type=int, default=256)
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward pass")
    p.add_argument("--max-length", type=int, help="longest row in tokens (default: the teacher's max positions)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (world size must be a multiple of tp*pp)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size (divides the teacher's layers)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true", help="show megatron-core's own start-up warnings")
    p.add_argument("overrides", nargs="*", help="data.key=value overrides")
    return p.parse_args(argv)


def student_data(args: argparse.Namespace, *, prog: str = "dcd-score"):
    """The student's DataConfig: from --config/--recipe/defaults, then data.* overrides and --student-tokenizer."""
    from dcd_megatron.configs import apply_overrides, load_config
    from dcd_megatron.configs.overrides import ConfigError
    from dcd_megatron.recipes import RECIPES
    from dcd_megatron.configs.train import TrainConfig

    bad = [o for o in args.overrides if not o.startswith("data.")]
    if bad:
        raise ConfigError(f"{prog} takes only data.* overrides, got {bad}")
    if args.recipe:
        student = RECIPES[args.recipe]()
    else:
        student = load_config(TrainConfig, args.config) if args.config else TrainConfig()
    student = apply_overrides(student, args.overrides)
    data = student.data
    if args.student_tokenizer:
        data = apply_overrides(student, [f"data.tokenizer={args.student_tokenizer}"]).data
    return data


def resolve_config(args: argparse.Namespace):
    """The ScoreConfig: student data settings from --config/--recipe/defaults, then overrides."""
    from dcd_megatron.score import ScoreConfig

    return ScoreConfig(
        teacher=args.teacher, data_path=args.data, out_dir=args.out, data=student_data(args),
        teacher_tokenizer=args.teacher_tokenizer,
        temperature=args.temperature, top_k=args.top_k, rows_per_shard=args.rows_per_shard,
        batch_tokens=args.batch_tokens, max_length=args.max_length, tp=args.tp, pp=args.pp, device=args.device,
        reference=args.reference,
    )


def main(argv: list[str] | None = None) -> int:
    from dcd_megatron.tracking.redact import redacted_console

    with redacted_console():  # no secret (env values, URI passwords) reaches the console in clear
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    import os

    from dcd_megatron.cli.errors import report_user_error, user_error_types
    from dcd_megatron.runtime import distributed
    from dcd_megatron.score import score

    from dcd_megatron.runtime.quiet import quiet_megatron_warnings

    args = parse_args(argv)
    quiet_megatron_warnings(args.verbose, prog="dcd-score")
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = resolve_config(args)
        result = score(cfg, progress=not args.no_progress)
    except user_error_types() as exc:
        return report_user_error("dcd-score", exc, rank)
    finally:
        distributed.shutdown()
    if rank == 0:
        print(f"scored dataset: {result.output}")
        print(f"train on it: dcd-train ... data.train_path={result.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
