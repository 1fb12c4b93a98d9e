"""The lab's strong teacher: a scripted sampler of digit-sum traces whose token probabilities are known.

It writes a trace in style s with probability `styles[s]` and each determined token right with
probability 1 - eps (eps: `result_eps[style]` on the digits of a sum, `copy_eps` elsewhere).
Its greedy decoding is always right, so it stands for the strong teachers users distil from:
sure of the knowledge (p >= 1 - eps), spread only where the trace may fork (the style). The
per-token log-probs are exact under the distribution the traces are drawn from, as DCD needs.
"""

import math
import random
from dataclasses import dataclass, field

from dcd_megatron.lab import task

EOS = "\0"  # stands for the end-of-sequence token in the per-character bookkeeping


@dataclass(frozen=True)
class ScriptedTeacher:
    """Style mixture and error rates of the scripted teacher (see the module docstring)."""

    styles: dict[str, float] = field(default_factory=lambda: {"verbose": 0.2, "skip2": 0.4, "skip3": 0.4})
    result_eps: dict[str, float] = field(default_factory=lambda: {"verbose": 0.01, "skip2": 0.03, "skip3": 0.05})
    copy_eps: float = 0.005

    def traces(self, digits: str) -> dict[str, str]:
        """The correct trace (ending in EOS) of every style with positive weight."""
        return {s: task.make_trace(digits, s) + EOS for s, w in self.styles.items() if w > 0}

    def _mass(self, traces: dict[str, str], prefix: str) -> float:
        return sum(self.styles[s] for s, t in traces.items() if t.startswith(prefix))

    def fork_probs(self, digits: str, response: str) -> list[float]:
        """P(token | prefix) of the style mixture alone, per character of `response` + EOS."""
        traces = self.traces(digits)
        text = response + EOS
        out = []
        for t in range(len(text)):
            below = self._mass(traces, text[:t])
            out.append(self._mass(traces, text[: t + 1]) / below if below > 0 else 0.0)
        return out

    def token_eps(self, response: str, style: str) -> list[float]:
        """The error rate of each character of `response` + EOS: sums are harder than copies."""
        eps, in_result = [], False
        for ch in response + EOS:
            if ch in "=>":
                in_result = True
                eps.append(self.copy_eps)
                continue
            if not ch.isdigit():
                in_result = False
            eps.append(self.result_eps[style] if in_result else self.copy_eps)
        return eps

    def logprobs(self, digits: str, response: str) -> list[float]:
        """log P(token | prefix) under the teacher, per response token and the EOS."""
        style = task.style_of(response)
        fork = self.fork_probs(digits, response)
        return [math.log(p * (1 - e)) if p > 0 else -math.inf
                for p, e in zip(fork, self.token_eps(response, style), strict=True)]

    def topk(self, digits: str, response: str, k: int) -> tuple[list[list[int]], list[list[float]]]:
        """The `k` most likely next tokens and their log-probs at every position of `response` + EOS.

        At a position with continuations c (shares q_c of the style mixture) and error rate eps,
        P(c) = (1 - eps) q_c and the error mass eps is spread evenly over the other symbols.
        """
        traces, text = self.traces(digits), response + EOS
        eps = self.token_eps(response, task.style_of(response))
        symbols = task.vocabulary()
        ids, lps = [], []
        for t in range(len(text)):
            below = self._mass(traces, text[:t])
            nxt = {tr[t] for tr in traces.values() if tr.startswith(text[:t]) and len(tr) > t}
            probs = {ch: (1 - eps[t]) * self._mass(traces, text[:t] + ch) / below for ch in nxt}
            spread = eps[t] / (len(symbols) - len(probs))
            ranked = sorted(probs.items(), key=lambda kv: -kv[1])
            ranked += [(ch, spread) for ch in symbols if ch not in probs][: max(0, k - len(ranked))]
            ids.append([task.token_id(ch) for ch, _ in ranked[:k]])
            lps.append([round(math.log(p), 6) for _, p in ranked[:k]])
        return ids, lps

    def sample(self, digits: str, rng: random.Random) -> tuple[str, bool]:
        """One trace drawn from the teacher: (response, whether every token came out right)."""
        names, weights = zip(*self.styles.items())
        style = rng.choices(names, weights)[0]
        response = task.make_trace(digits, style)
        ok = all(rng.random() >= e for e in self.token_eps(response, task.style_of(response)))
        return response, ok

    def greedy(self, digits: str) -> str:
        """The teacher's greedy trace: the heavier continuation at every fork, every token right."""
        traces = self.traces(digits)
        text = ""
        while not text.endswith(EOS):
            options = {t[len(text)] for t in traces.values() if t.startswith(text) and len(t) > len(text)}
            text += max(sorted(options), key=lambda ch: self._mass(traces, text + ch))
        return text[:-1]


def scripted_traces(teacher: ScriptedTeacher, digits: list[str], seed: int, topk: int = 0) -> tuple[list[dict], dict]:
    """Sampled traces kept when right (as the lab keeps the neural teacher's), and counts; with
    `topk > 0` each row also carries the teacher's top-k per token."""
    rng = random.Random(f"scripted-{seed}")
    rows, dropped = [], 0
    for d in digits:
        response, ok = teacher.sample(d, rng)
        if not ok:
            dropped += 1  # a wrong token somewhere: the answer filter would drop most of these
            continue
        row = {"prompt": task.make_prompt(d), "response": response,
               "teacher_logprobs": [round(x, 6) for x in teacher.logprobs(d, response)],
               "answer": str(sum(int(c) for c in d)), "style": task.style_of(response)}
        if topk > 0:
            row["teacher_topk_ids"], row["teacher_topk_logprobs"] = teacher.topk(d, response, topk)
        rows.append(row)
    return rows, {"drawn": len(digits), "dropped": {"wrong": dropped}, "kept_with_wrong_step": 0}


def greedy_accuracy(teacher: ScriptedTeacher, problems: dict[int, list[str]]) -> dict[str, dict]:
    """The same record as `evaluate.greedy_accuracy`, for the scripted teacher's greedy traces."""
    return {str(k): task.accuracy_record(digits, [teacher.greedy(d) for d in digits])
            for k, digits in sorted(problems.items())}
