"""The worked example of docs/checkpoints.md, run command by command: convert in, score, train, convert out."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist import free_port

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

DOC = Path(__file__).resolve().parents[1] / "docs" / "checkpoints.md"


def documented_commands(ex: Path) -> list[list[str]]:
    """The commands between the worked-example markers, with $EX replaced."""
    block = re.search(r"<!-- worked-example:start -->\n```bash\n(.*?)```", DOC.read_text(), re.S).group(1)
    commands = []
    for line in block.splitlines():
        if not line.strip() or line.startswith("EX="):
            continue
        commands.append(shlex.split(line.replace("$EX", str(ex))))
    return commands


def run_documented(argv: list[str], env: dict) -> str:
    """Run one documented command: convert/score in this process, training as its own process."""
    from dcd_megatron.cli.convert import main as convert
    from dcd_megatron.cli.score import main as score
    from dcd_megatron.convert.tiny import main as tiny

    if argv[:3] == ["python", "-m", "dcd_megatron.convert.tiny"]:
        assert tiny(argv[3:]) == 0
    elif argv[0] == "dcd-convert":
        assert convert(argv[1:]) == 0, argv
    elif argv[0] == "dcd-score":
        assert score(argv[1:]) == 0, argv
    elif argv[0] == "dcd-train":
        env = dict(env, MASTER_PORT=str(free_port()))  # not the port this process's group holds
        proc = subprocess.run([sys.executable, "-m", "dcd_megatron.cli.train", *argv[1:]], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-4000:]
        return proc.stdout
    else:
        raise AssertionError(f"the worked example runs a command this test does not know: {argv}")
    return ""


def test_worked_example_goes_from_hf_student_to_distilled_hf_student(tmp_path):
    import pyarrow.parquet as pq
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dcd_megatron.model.inference import load_trained_model

    ex = tmp_path / "ex"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    commands = documented_commands(ex)
    assert [c[0] for c in commands] == ["python", "dcd-convert", "dcd-convert", "dcd-score", "dcd-train", "dcd-convert"]
    logs = [run_documented(argv, env) for argv in commands]

    scored = pq.read_table(ex / "scored" / "scored.parquet")
    assert scored.num_rows == 64 and {"teacher_logprobs", "teacher_topk_ids"} <= set(scored.column_names)
    train_log = logs[4]
    assert "initialised the student from" in train_log and "student-mcore" in train_log
    assert "step 6/6" in train_log

    out = ex / "student-distilled-hf"
    before, after = load_file(str(ex / "student-hf" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(before) == sorted(after)
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed no weight"
    trained, _ = load_trained_model(ex / "run", device="cpu")
    tokens = torch.randint(0, trained.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits.float(), trained.logits(tokens), atol=1e-5, rtol=0)
