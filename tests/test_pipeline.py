"""The pipeline experiment (`recipes/pipeline.py`): score -> reference -> train -> eval -> export as one
NeMo-Run experiment, run for real on the local executor with tiny models (twice: the rerun skips or
resumes every stage), and as Slurm and Docker dry runs (five sbatch scripts, eval and export on one
task; five container specs, torchrun only for score, reference and train)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "recipes" / "pipeline.py"
GSM8K = REPO / "tests" / "data" / "eval" / "gsm8k.jsonl"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The worked example's tiny HF student and teacher, converted, and its raw traces."""
    from dcd_megatron.cli.convert import main as convert
    from dcd_megatron.convert.tiny import main as make_tiny

    ex = tmp_path_factory.mktemp("tiny")
    assert make_tiny([str(ex)]) == 0
    assert convert(["hf-to-mcore", "--hf", str(ex / "student-hf"), "--out", str(ex / "student-mcore")]) == 0
    assert convert(["hf-to-mcore", "--hf", str(ex / "teacher-hf"), "--out", str(ex / "teacher-mcore")]) == 0
    return ex


def pipeline_args(ex: Path, work: Path) -> list[str]:
    return [
        "--factory", f"from_yaml(path={ex / 'student-mcore' / 'train.yaml'})",
        f"teacher={ex / 'teacher-mcore'}", f"traces={ex / 'traces.jsonl'}", f"benchmarks=gsm8k={GSM8K}",
        f"work_dir={work}", "score_top_k=4", "eval_limit=2", "eval_max_new_tokens=16",
        "train.steps=6", "train.global_batch_size=8", "train.micro_batch_size=4", "data.seq_length=64",
        "train.eval_interval=0", "tracking.plot_interval=0", "runtime.device=cpu",
    ]


def run_pipeline(tmp_path: Path, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, NEMORUN_HOME=str(tmp_path / "nemo_run_home"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return subprocess.run([sys.executable, str(PIPELINE), *argv], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def test_slurm_dry_run_prints_four_dependent_jobs(tiny, tmp_path):
    proc = run_pipeline(tmp_path, *pipeline_args(tiny, Path("/results/pipe")), "run.executor=slurm_h100",
                        "run.executor.nodes=2", "run.executor.account=acct", "--dryrun", timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    scripts = {}
    for chunk in proc.stdout.split("# --- ")[1:]:
        name, _, text = chunk.partition(" ---\n")
        scripts[name] = text
    # the student starts from its converted checkpoint and the default loss reads the initial student
    # (loss.reference=auto): a reference scoring stage comes before training
    assert list(scripts) == ["score", "reference", "train", "eval", "export"], list(scripts)
    for name in ("score", "reference", "train"):
        assert "#SBATCH --nodes=2" in scripts[name] and "#SBATCH --ntasks-per-node=8" in scripts[name], name
    for name in ("eval", "export"):
        assert "#SBATCH --nodes=1" in scripts[name] and "#SBATCH --ntasks-per-node=1" in scripts[name], name
        assert "#SBATCH --exclusive" not in scripts[name], name
    assert all("#SBATCH --account=acct" in text for text in scripts.values())


def _prompt_args(ex: Path, work: Path) -> list[str]:
    """The pipeline from prompts: dcd-generate makes the traces (no traces= given)."""
    args = [a for a in pipeline_args(ex, work) if not a.startswith(("traces=", "score_top_k="))]
    return [*args, f"prompts=gsm8k={GSM8K}", "generate_n=2", "generate_max_new_tokens=16", "generate_logprob_top_k=4"]


def test_slurm_dry_run_from_prompts_starts_with_generate(tiny, tmp_path):
    proc = run_pipeline(tmp_path, *_prompt_args(tiny, Path("/results/pipe")), "run.executor=slurm_h100",
                        "run.executor.nodes=2", "run.executor.account=acct", "--dryrun", timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    scripts = dict(chunk.partition(" ---\n")[::2] for chunk in proc.stdout.split("# --- ")[1:])
    assert list(scripts) == ["generate", "reference", "train", "eval", "export"], list(scripts)
    assert "#SBATCH --nodes=2" in scripts["generate"] and "#SBATCH --ntasks-per-node=8" in scripts["generate"]


def test_the_pipeline_needs_prompts_or_traces_not_both(tiny, tmp_path):
    proc = run_pipeline(tmp_path, *_prompt_args(tiny, tmp_path / "w"), f"traces={tiny / 'traces.jsonl'}", "--dryrun",
                        timeout=300)
    assert proc.returncode != 0 and "give the pipeline prompts=FILE" in proc.stdout, proc.stdout[-3000:]


def test_docker_dry_run_puts_every_job_in_the_image(tiny, tmp_path):
    import yaml

    proc = run_pipeline(tmp_path, *pipeline_args(tiny, Path("/workspace/runs/pipe")), "run.executor=docker",
                        "run.executor.container_image=registry.example.com/dcd-megatron:test",
                        "run.executor.ntasks_per_node=2", "--dryrun", timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    specs = {}
    for chunk in proc.stdout.split("# --- ")[1:]:
        name, _, text = chunk.partition(" ---\n")
        specs[name] = yaml.safe_load(text[text.index("_target_"):])
    assert list(specs) == ["score", "reference", "train", "eval", "export"], list(specs)
    for name, spec in specs.items():
        assert spec["executor"]["container_image"] == "registry.example.com/dcd-megatron:test", name
        command = " ".join(spec["containers"][0]["command"])
        assert "nemo_run.core.runners.fdl_runner" in command, (name, command)
        assert command.startswith("torchrun ") == (name in ("score", "reference", "train")), (name, command)


@pytest.mark.slow
@pytest.mark.later
@pytest.mark.megatron
@pytest.mark.timeout(1200)
def test_pipeline_runs_end_to_end_on_the_local_executor_and_resumes(tiny, tmp_path):
    import pyarrow.parquet as pq

    work = tmp_path / "work"
    args = [*pipeline_args(tiny, work), "run.executor=local", "run.executor.ntasks_per_node=2", "-y"]
    first = run_pipeline(tmp_path, *args)
    assert first.returncode == 0, first.stdout[-6000:]
    assert "pipeline: SUCCEEDED" in first.stdout, first.stdout[-3000:]
    scored = pq.read_table(work / "scored" / "scored.parquet")
    assert scored.num_rows == 64 and {"teacher_logprobs", "teacher_topk_ids"} <= set(scored.column_names)
    reference = pq.read_table(work / "reference" / "scored.parquet")  # what train read: the initial student's too
    assert reference.num_rows == 64 and {"teacher_logprobs", "student_ref_logprobs"} <= set(reference.column_names)
    assert "the weights read the initial student's student_ref_logprobs" in first.stdout, first.stdout[-3000:]
    final = json.loads((work / "run" / "final_metrics.json").read_text())
    assert final["step"] == 6
    summary = json.loads((work / "eval" / "summary.json").read_text())
    assert [(r["benchmark"], r["n_problems"]) for r in summary] == [("gsm8k", 2)], summary
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (work / "hf").iterdir()}
    stamp = json.loads((work / "hf" / "pipeline-stamp.json").read_text())
    assert stamp["checkpoint"].endswith("iter_0000006")

    second = run_pipeline(tmp_path, *args)  # the same experiment again: every stage skips or resumes
    log = second.stdout
    assert second.returncode == 0, log[-6000:]
    for stage in ("scored", "reference"):
        assert f"{work / stage / 'scored.parquet'} is already complete (64 rows); nothing to do" in log, log[-4000:]
    assert "is already at step 6 of train.steps=6: nothing to train" in log, log[-4000:]
    assert "eval: " in log and "already has the results of" in log and "export: " in log and "skipped" in log, log[-4000:]
    assert json.loads((work / "run" / "final_metrics.json").read_text())["step"] == 6
