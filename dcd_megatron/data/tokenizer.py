"""Student tokenizers: SentencePiece (`sentencepiece`) or Hugging Face `tokenizer.json` (`tokenizers`).

Both expose the same small interface. ``fingerprint`` hashes the vocabulary and special ids
(to refuse a teacher whose tokenizer differs); ``model_hash`` hashes the tokenizer file itself
(it also covers normalisation rules, so it keys the token cache).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from dcd_megatron.errors import UserError

TokenizerKind = Literal["auto", "sentencepiece", "hf"]

_EOS_GUESSES = ("</s>", "<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>", "<eos>")
_BOS_GUESSES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_PAD_GUESSES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class TokenizerError(UserError, ValueError):
    """The tokenizer path or type is unusable; the message says what to pass instead."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _vocab_fingerprint(pieces: list[str], eos: int | None, bos: int | None, pad: int) -> str:
    h = hashlib.sha256()
    for piece in pieces:
        h.update(piece.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    h.update(json.dumps({"eos": eos, "bos": bos, "pad": pad}).encode())
    return h.hexdigest()


class Tokenizer:
    """Common interface: ``encode``, ``decode``, ``vocab_size``, ``eos_id``, ``bos_id``, ``pad_id``."""

    kind: str
    path: Path
    vocab_size: int
    eos_id: int | None
    bos_id: int | None
    pad_id: int
    fingerprint: str
    model_hash: str
    unk_id: int | None = None  # the id text the vocabulary cannot spell becomes (None: it has none)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_counting_unknown(self, text: str) -> tuple[list[int], int]:
        """``encode(text)`` and how many of its characters became the unknown token (trained on as such)."""
        return self.encode(text), 0

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        """The surface form of one special token (used to expose bos/eos to chat templates)."""
        raise NotImplementedError

    # Tokenizers travel to `datasets.map` workers by path, not by their C++ state.
    def __getstate__(self) -> dict:
        return {"path": str(self.path), "init": self._init_args()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Path(state["path"]), **state["init"])

    def _init_args(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={str(self.path)!r}, vocab_size={self.vocab_size}, "
            f"eos_id={self.eos_id}, bos_id={self.bos_id}, pad_id={self.pad_id})"
        )


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``; special ids come from the model's trainer spec."""

    kind = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.path = Path(path).resolve()
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(
                f"data.tokenizer={str(self.path)!r} is not a loadable SentencePiece model ({exc}); "
                "pass a .model file, or set data.tokenizer_type=hf for a tokenizer.json"
            ) from None
        sp = self._sp
        self.vocab_size = int(sp.get_piece_size())
        self.eos_id = int(sp.eos_id()) if sp.eos_id() >= 0 else None
        self.bos_id = int(sp.bos_id()) if sp.bos_id() >= 0 else None
        self.unk_id = int(sp.unk_id()) if sp.unk_id() >= 0 else None
        if sp.pad_id() >= 0:
            self.pad_id = int(sp.pad_id())
        else:
            self.pad_id = self.eos_id if self.eos_id is not None else 0
        pieces = [sp.id_to_piece(i) for i in range(self.vocab_size)]
        self.fingerprint = _vocab_fingerprint(pieces, self.eos_id, self.bos_id, self.pad_id)
        self.model_hash = _sha256_file(self.path)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def encode_counting_unknown(self, text: str) -> tuple[list[int], int]:
        ids = self.encode(text)
        if self.unk_id is None or self.unk_id not in ids:
            return ids, 0
        pieces = self._sp.encode(text, return_type="proto").pieces  # surfaces: the text each id covers
        return [p.id for p in pieces], sum(len(p.surface) for p in pieces if p.id == self.unk_id)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_text(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json``; special tokens from a sibling ``tokenizer_config.json``.

    Without that file, eos/bos/pad are guessed from common token names (``</s>``,
    ``<|endoftext|>``, ...); ``encode`` never adds special tokens by itself.
    """

    kind = "hf"

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _HFTok

        self.path = Path(path).resolve()
        try:
            self._tok = _HFTok.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(
                f"data.tokenizer={str(self.path)!r} is not a loadable tokenizer.json ({exc}); "
                "pass a Hugging Face tokenizer.json, or set data.tokenizer_type=sentencepiece"
            ) from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        specials = self._special_tokens_from_config()
        self.eos_id = self._resolve(specials.get("eos_token"), _EOS_GUESSES, vocab)
        self.bos_id = self._resolve(specials.get("bos_token"), _BOS_GUESSES, vocab)
        pad = self._resolve(specials.get("pad_token"), _PAD_GUESSES, vocab)
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self._unk_token, self.unk_id = self._unknown_token(vocab)
        by_id = sorted(vocab.items(), key=lambda kv: kv[1])
        self.fingerprint = _vocab_fingerprint([p for p, _ in by_id], self.eos_id, self.bos_id, self.pad_id)
        self.model_hash = _sha256_file(self.path)
        cfg_path = self.path.parent / "tokenizer_config.json"
        if cfg_path.is_file():
            self.model_hash = hashlib.sha256(
                (self.model_hash + _sha256_file(cfg_path)).encode()
            ).hexdigest()

    def _special_tokens_from_config(self) -> dict[str, str | None]:
        cfg_path = self.path.parent / "tokenizer_config.json"
        if not cfg_path.is_file():
            return {}
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise TokenizerError(f"{cfg_path} is not valid JSON ({exc}); fix or remove it") from None
        out: dict[str, str | None] = {}
        for key in ("eos_token", "bos_token", "pad_token"):
            value = cfg.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            out[key] = value if isinstance(value, str) else None
        return out

    @staticmethod
    def _resolve(configured: str | None, guesses: tuple[str, ...], vocab: dict[str, int]) -> int | None:
        if configured is not None:
            if configured not in vocab:
                raise TokenizerError(
                    f"tokenizer_config.json names special token {configured!r}, which is not in "
                    "the tokenizer.json vocabulary; fix the config"
                )
            return int(vocab[configured])
        for name in guesses:
            if name in vocab:
                return int(vocab[name])
        return None

    def _unknown_token(self, vocab: dict[str, int]) -> tuple[str | None, int | None]:
        """The model's unknown token (WordLevel/WordPiece/BPE ``unk_token``, Unigram ``unk_id``), if any."""
        token = getattr(self._tok.model, "unk_token", None)
        if token is None and type(self._tok.model).__name__ == "Unigram":
            unk = json.loads(self.path.read_text(encoding="utf-8")).get("model", {}).get("unk_id")
            token = self._tok.id_to_token(int(unk)) if unk is not None else None
        if not token or token not in vocab:
            return None, None
        return token, int(vocab[token])

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_counting_unknown(self, text: str) -> tuple[list[int], int]:
        enc = self._tok.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        if self.unk_id is None or self.unk_id not in ids:
            return ids, 0
        # the text itself may spell the unknown token (e.g. a literal "<pad>"): that is not unknown
        unknown = sum(
            end - start for i, (start, end) in zip(ids, enc.offsets)
            if i == self.unk_id and text[start:end] != self._unk_token
        )
        return ids, unknown

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or ""


def _resolve_path(path: str | Path, kind: TokenizerKind) -> tuple[Path, str]:
    p = Path(path).expanduser()
    if not p.exists():
        raise TokenizerError(
            f"data.tokenizer={str(path)!r} does not exist; pass a SentencePiece .model, a "
            "tokenizer.json, or a directory holding one"
        )
    if p.is_dir():
        hf = p / "tokenizer.json"
        sp = sorted(p.glob("*.model"))
        if kind in ("auto", "hf") and hf.is_file():
            return hf, "hf"
        if kind in ("auto", "sentencepiece") and sp:
            return sp[0], "sentencepiece"
        want = {"hf": "tokenizer.json", "sentencepiece": "a *.model file"}.get(
            kind, "tokenizer.json or a *.model file"
        )
        raise TokenizerError(f"data.tokenizer={str(path)!r} is a directory without {want}")
    if kind == "auto":
        kind = "hf" if p.suffix == ".json" else "sentencepiece"
    return p, kind


def load_tokenizer(path: str | Path, kind: TokenizerKind = "auto") -> Tokenizer:
    """Load the student tokenizer from a ``.model``, a ``tokenizer.json`` or a directory holding one."""
    if kind not in ("auto", "sentencepiece", "hf"):
        raise TokenizerError(f"data.tokenizer_type={kind!r}: use auto, sentencepiece or hf")
    file, resolved = _resolve_path(path, kind)
    return HFTokenizer(file) if resolved == "hf" else SentencePieceTokenizer(file)


def require_same_vocabulary(student: Tokenizer, teacher: Tokenizer) -> None:
    """Refuse a teacher whose vocabulary differs: its log-probs would index other tokens."""
    if student.fingerprint != teacher.fingerprint:
        raise TokenizerError(
            f"the teacher tokenizer ({teacher.path}, vocab {teacher.vocab_size}) differs from the "
            f"student's ({student.path}, vocab {student.vocab_size}); teacher log-probs must be "
            "computed under the STUDENT tokenizer: score the traces with the same tokenizer"
        )


def load_tokenizer_of(whose: str, path: str | Path, kind: TokenizerKind, fix: str) -> Tokenizer:
    """`load_tokenizer` for a job that loads more than one (e.g. "the teacher's"): its errors say whose, and ``fix``."""
    try:
        return load_tokenizer(path, kind)
    except TokenizerError as exc:
        raise TokenizerError(f"{whose} tokenizer: {exc}; {fix}") from None
