"""`dcd-convert`: Hugging Face <-> Megatron-Core checkpoints (Llama, Qwen2/Qwen2.5).

    dcd-convert hf-to-mcore --hf HF_DIR --out CKPT_DIR [--dtype fp32|bf16|fp16] [--tokenizer PATH]
    dcd-convert mcore-to-hf --checkpoint RUN_OR_ITER_DIR --out HF_DIR [--dtype ...]

There is no --tp/--pp: a converted checkpoint is a megatron-core distributed checkpoint, which
reshards on load, so the one conversion loads at every TP x PP layout.
"""

from __future__ import annotations

import argparse
import sys

_LAYOUT_NOTE = (
    "not needed: the converted checkpoint is a distributed checkpoint that reshards on load, "
    "so it loads at every TP x PP layout (set tp/pp when training)"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dcd-convert", description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true", help="show megatron-core's own start-up warnings")
    sub = parser.add_subparsers(dest="direction", required=True)
    imp = sub.add_parser("hf-to-mcore", help="a HF Llama/Qwen2 directory -> our checkpoint (for model.init_checkpoint)")
    imp.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    imp.add_argument("--out", required=True, help="checkpoint directory to write")
    imp.add_argument("--tokenizer", help="tokenizer.json / .model / directory (default: the one in --hf)")
    imp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="parameter dtype (default: config.json's)")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    imp.add_argument("--tp", type=int, help=_LAYOUT_NOTE)
    imp.add_argument("--pp", type=int, help=_LAYOUT_NOTE)
    imp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    exp = sub.add_parser("mcore-to-hf", help="our checkpoint (converted or trained) -> a HF safetensors directory")
    exp.add_argument("--checkpoint", required=True, help="a dcd-train run dir, its checkpoints/ or an iter_NNNNNNN dir")
    exp.add_argument("--out", required=True, help="Hugging Face directory to write")
    exp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="weight dtype (default: model.params_dtype)")
    exp.add_argument("--hf-template", help="a HF dir whose config.json fills non-architecture fields (default: the original, if recorded)")
    exp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from dcd_megatron.tracking.redact import redacted_console

    with redacted_console():  # no secret (env values, URI passwords) reaches the console in clear
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    from dcd_megatron.runtime.quiet import quiet_megatron_warnings

    args = parse_args(argv)
    quiet_megatron_warnings(args.verbose, prog="dcd-convert")
    from dcd_megatron.cli.errors import report_user_error, user_error_types
    from dcd_megatron.convert import convert_hf_to_mcore, convert_mcore_to_hf
    from dcd_megatron.runtime import distributed

    try:
        if args.direction == "hf-to-mcore":
            if args.tp is not None or args.pp is not None:
                print(f"dcd-convert: note: --tp/--pp are {_LAYOUT_NOTE}", file=sys.stderr)
            res = convert_hf_to_mcore(
                args.hf, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, overwrite=args.overwrite,
            )
            print(f"wrote {res.checkpoint} ({res.num_parameters:,} parameters, padded vocabulary {res.padded_vocab_size})")
            print(f"train from it: dcd-train --config {res.checkpoint}/train.yaml data.train_path=... train.output_dir=...")
        else:
            res = convert_mcore_to_hf(args.checkpoint, args.out, dtype=args.dtype, hf_template=args.hf_template, overwrite=args.overwrite)
            print(f"wrote {res.out_dir} from {res.checkpoint}: {', '.join(res.files)}")
            print(f"config.json template: {res.template or 'none (built from the model config)'}")
    except user_error_types() as exc:
        return report_user_error("dcd-convert", exc)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
