"""megatron-core's start-up warnings about missing Transformer Engine / Apex: one line of ours by
default, megatron's own with --verbose (DCD_VERBOSE=1)."""

import os
import subprocess
import sys

import pytest

IMPORTS = ("import megatron.core.models.gpt.gpt_layer_specs, megatron.core.optimizer, "
           "megatron.core.optimizer.clip_grads")


def start(verbose: bool) -> str:
    code = ("from dcd_megatron.runtime.quiet import quiet_megatron_warnings\n"
            f"quiet_megatron_warnings(verbose={verbose}, prog='dcd-test')\n{IMPORTS}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DCD_VERBOSE", "PYTHONWARNINGS", "RANK")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


@pytest.mark.skipif(any(__import__("importlib").util.find_spec(m) for m in ("transformer_engine", "apex")),
                    reason="Transformer Engine or Apex is installed: megatron has nothing to warn about")
def test_one_line_by_default_and_megatrons_warnings_with_verbose():
    quiet = start(verbose=False)
    assert "Apex is not installed" not in quiet and "Falling back" not in quiet, quiet
    assert quiet.splitlines() == ["dcd-test: Transformer Engine and Apex not installed: megatron-core uses its "
                                  "plain-torch fallbacks (expected on CPU; --verbose shows its warnings)"], quiet
    loud = start(verbose=True)
    assert "Apex is not installed. Falling back to Torch Norm" in loud, loud
    assert "Transformer Engine and Apex are not installed. Falling back" in loud, loud
    assert "plain-torch fallbacks" not in loud
