"""Tiny tokenizers trained in seconds from a few texts: for tests, demos and smoke runs on CPU."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>")


def train_sentencepiece(
    texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 64, name: str = "tiny"
) -> Path:
    """A BPE SentencePiece model (unk=0, bos=1, eos=2, pad=3, chatml markers as symbols)."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_prefix=str(out / name),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        user_defined_symbols=list(CHAT_SPECIALS),
        minloglevel=2,
    )
    return out / f"{name}.model"


def build_hf_tokenizer(
    texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 300, with_config: bool = True
) -> Path:
    """A byte-level BPE ``tokenizer.json`` (+ ``tokenizer_config.json`` naming eos/bos/pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<s>", "</s>", *CHAT_SPECIALS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    if with_config:
        (out / "tokenizer_config.json").write_text(
            json.dumps({"eos_token": "</s>", "bos_token": {"content": "<s>"}, "pad_token": "<pad>"})
        )
    return out / "tokenizer.json"
