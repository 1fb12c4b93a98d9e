"""`dcd-eval`'s default model: a dcd-train checkpoint loaded in one process (any training layout)."""

from __future__ import annotations

import logging

import torch

from dcd_megatron.eval.interface import EvalModel

log = logging.getLogger(__name__)

# Largest |logit| difference (relative to the largest |logit|) the KV-cached decoder may show
# against megatron's forward: fp32 sums in another order, or bf16/fp16 rounding on a GPU.
KV_REL_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def decoder_for(loaded, bos_id: int | None, recompute: bool = False):
    """The KV-cached decoder over `loaded`'s weights when it matches megatron's forward, else `loaded.logits`.

    A mismatch (e.g. a megatron-core release that changes the forward) is logged and decoding
    falls back to megatron's own (slow, O(T^2)) recompute path rather than giving wrong text.
    """
    if recompute:
        return loaded.logits
    from dcd_megatron.model.kv_decoder import KVCachedGPT, max_logit_difference

    kv = KVCachedGPT.from_loaded(loaded)
    diff, scale = max_logit_difference(kv, loaded, bos_id)
    dtype = next(loaded.module.parameters()).dtype
    tolerance = KV_REL_TOLERANCE.get(dtype, 1e-2) * max(1.0, scale)
    if diff <= tolerance:
        log.info("decoding with the KV cache (max |logit diff| vs megatron %.1e <= %.1e)", diff, tolerance)
        return kv
    log.warning(
        "the KV-cached decoder differs from megatron's forward by %.2e (> %.1e): decoding with megatron's "
        "recompute path instead (correct, slow); please report this with your megatron-core version", diff, tolerance,
    )
    return loaded.logits


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
    log.info("read the checkpoint %s", model.path)
    encoder = RowEncoder(model.config.data, tokenizer)

    def encode(prompt: str) -> list[int]:
        return encoder.prompt_ids([{"role": "user", "content": prompt}])

    return EvalModel(
        model=decoder_for(model, tokenizer.bos_id, recompute=getattr(args, "recompute", False)),
        encode=encode,
        decode=lambda ids: tokenizer.decode(list(ids)),
        eos_id=tokenizer.eos_id,
        device=model.device,
        pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0,
        name=str(args.checkpoint),
    )
