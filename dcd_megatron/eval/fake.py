"""A tiny scripted language model and character tokenizer, for tests and CLI smoke runs.

``ScriptedLM`` is a real causal ``ModelFn``: the logits at position t depend only on tokens
``0..t``. After a prompt it knows, it spells out that prompt's scripted response and then eos;
anywhere else it predicts eos. With a finite ``margin`` a sample can leave the script.
"""

from __future__ import annotations

import argparse
import string
from collections.abc import Mapping, Sequence

import torch

from dcd_megatron.eval.interface import EvalModel


class CharTokenizer:
    """Printable ASCII, one id a character; id 0 is padding, id 1 is BOS, id 2 is eos."""

    PAD, BOS, EOS = 0, 1, 2

    def __init__(self) -> None:
        self.chars = string.printable
        self.vocab_size = 3 + len(self.chars)
        self._ids = {c: k + 3 for k, c in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        unknown = sorted({c for c in text if c not in self._ids})
        if unknown:
            raise ValueError(f"CharTokenizer cannot encode {unknown!r}; use printable ASCII")  # internal
        return [self.BOS] + [self._ids[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i - 3] for i in ids if i >= 3)


class ScriptedLM:
    """``tokens [b, t] -> logits [b, t, V]``: continues known prompts with scripted responses."""

    def __init__(self, tokenizer: CharTokenizer, script: Mapping[str, str], margin: float = 30.0):
        self.tok = tokenizer
        self.margin = margin
        self.script = {tuple(tokenizer.encode(p)): tokenizer.encode(r)[1:] + [tokenizer.EOS]
                       for p, r in script.items()}

    def _row_logits(self, row: list[int], out: torch.Tensor) -> None:
        """Fill ``out [t, V]``: scripted next tokens while the row follows a script, else eos."""
        out[:, self.tok.EOS] = self.margin
        for prompt, response in self.script.items():
            k = len(prompt)
            if tuple(row[:k]) != prompt:
                continue
            for p in range(k - 1, len(row)):
                done = p - k + 1  # response tokens already in the row
                if done > 0 and row[p] != response[done - 1]:
                    break  # the row left the script: eos from here on
                if done < len(response):
                    out[p, self.tok.EOS] = 0.0
                    out[p, response[done]] = self.margin
            return

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        logits = torch.zeros(b, t, self.tok.vocab_size)
        for i, row in enumerate(tokens.tolist()):
            self._row_logits(row, logits[i])
        return logits


def scripted_model(script: Mapping[str, str], margin: float = 30.0) -> EvalModel:
    """An ``EvalModel`` that answers each prompt in ``script`` (rendered prompt -> response)."""
    tok = CharTokenizer()
    return EvalModel(ScriptedLM(tok, script, margin), tok.encode, tok.decode, tok.EOS,
                     pad_id=tok.PAD, name="scripted-fake")


class ConstantDecoder:
    """An ``IncrementalDecoder`` that answers every prompt with the same text, then eos."""

    def __init__(self, tokenizer: CharTokenizer, answer: str, margin: float = 30.0):
        self.tok = tokenizer
        self.answer = torch.tensor(tokenizer.encode(answer)[1:] + [tokenizer.EOS])
        self.margin = margin

    def _logits(self, pos: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(pos), self.tok.vocab_size)
        logits[torch.arange(len(pos)), self.answer[pos.clamp(max=len(self.answer) - 1)]] = self.margin
        return logits

    def prefill(self, prompts: list[torch.Tensor]):
        pos = torch.zeros(len(prompts), dtype=torch.long)
        return self._logits(pos), pos

    def step(self, state: torch.Tensor, tokens: torch.Tensor):
        return self._logits(state + 1), state + 1

    def select(self, state: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return state[rows]


def constant_answer_loader(args: argparse.Namespace | None = None) -> EvalModel:
    """A ``--model-loader`` for smoke runs: a model that says ``\\boxed{0}`` to every prompt."""
    tok = CharTokenizer()
    return EvalModel(ConstantDecoder(tok, "The answer is \\boxed{0}."), tok.encode, tok.decode,
                     tok.EOS, pad_id=tok.PAD, name="constant-fake")
