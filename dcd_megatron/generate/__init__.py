"""The generation job (`dcd-generate`): teacher traces sampled from a prompt set, with the log-probs of
the distribution that sampled them, filtered to correct answers, in the schema `dcd-train` reads.

Modules: ``config`` (GenerateConfig), ``judge`` (the correctness filter), ``runner`` (the job).
"""

from dcd_megatron.generate.config import GenerateConfig, GenerateError
from dcd_megatron.generate.runner import GenerateResult, generate_traces

__all__ = ["GenerateConfig", "GenerateError", "GenerateResult", "generate_traces"]
