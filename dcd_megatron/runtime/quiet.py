"""megatron-core's start-up warnings about missing GPU libraries, said once in our own words.

Without Transformer Engine and Apex (every CPU machine, and a GPU box without them), megatron-core
warns from about ten modules as they are imported (`Apex is not installed. Falling back to Torch
Norm`, `Transformer Engine and Apex are not installed. Falling back to ...`) and once more for its
own default `cuda_graph_scope` (`full scope is deprecated`). All of them are expected there and
none needs action, so the commands hide them and print one line instead; `--verbose` (or
DCD_VERBOSE=1 in the environment, which child processes inherit) shows megatron's own.
"""

import importlib.util
import os
import re
import sys
import warnings

EXPECTED = (
    "Apex is not installed",
    "Transformer Engine and Apex are not installed",
    "full scope is deprecated",
)


def quiet_megatron_warnings(verbose: bool = False, prog: str = "dcd") -> bool:
    """Hide EXPECTED (call before megatron-core is imported) and say why in one line on rank 0.

    Returns whether they are hidden."""
    if verbose:
        os.environ["DCD_VERBOSE"] = "1"  # torchrun/NeMo-Run children of this process too
    if os.environ.get("DCD_VERBOSE", "") not in ("", "0"):
        return False
    for message in EXPECTED:
        warnings.filterwarnings("ignore", message=re.escape(message), category=UserWarning)
    missing = [name for name, module in (("Transformer Engine", "transformer_engine"), ("Apex", "apex"))
               if importlib.util.find_spec(module) is None]
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if missing and rank == "0":
        print(f"{prog}: {' and '.join(missing)} not installed: megatron-core uses its plain-torch "
              "fallbacks (expected on CPU; --verbose shows its warnings)", file=sys.stderr, flush=True)
    return True
