"""`dcd-eval`'s default model: a dcd-train checkpoint loaded in one process (any training layout)."""

from __future__ import annotations

from dcd_megatron.eval.interface import EvalModel


def load_student(args) -> EvalModel:
    """EvalModel for `--checkpoint` (a run's output_dir, its checkpoints/ or one iter_ folder).

    Prompts are encoded exactly as training encoded them: the run's chat template and BOS.
    Logits are the real vocabulary only (megatron's padding rows are sliced off).
    """
    from dcd_megatron.data.encoding import RowEncoder
    from dcd_megatron.model.inference import load_trained_model

    if not args.checkpoint:
        raise SystemExit("dcd-eval: pass --checkpoint RUN_DIR (or --model-loader MODULE:FUNCTION)")
    model, tokenizer = load_trained_model(args.checkpoint, device=args.device or "auto")
    encoder = RowEncoder(model.config.data, tokenizer)

    def encode(prompt: str) -> list[int]:
        return encoder.prompt_ids([{"role": "user", "content": prompt}])

    return EvalModel(
        model=model.logits,
        encode=encode,
        decode=lambda ids: tokenizer.decode(list(ids)),
        eos_id=tokenizer.eos_id,
        device=model.device,
        pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0,
        name=str(args.checkpoint),
    )
