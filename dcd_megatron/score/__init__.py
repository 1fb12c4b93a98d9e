"""Teacher scoring (`dcd-score`): per-token teacher log-probs (and top-k) for trace datasets.

Import cost is small: megatron-core is imported only when `score` runs.
"""

from dcd_megatron.score.config import ScoreConfig, ScoreError
from dcd_megatron.score.logprobs import scored_logprobs
from dcd_megatron.score.runner import ScoreResult, score

__all__ = ["ScoreConfig", "ScoreError", "ScoreResult", "score", "scored_logprobs"]
