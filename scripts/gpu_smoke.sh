#!/usr/bin/env bash
# GPU smoke test: the tiny recipe on one GPU in BF16 (tiny_gpu_bf16) and, where Transformer Engine
# imports and the GPU has FP8 (compute capability >= 8.9), in FP8 (tiny_gpu_fp8); prints the
# loss and tokens/s of each from the run's metrics.jsonl, and what it skipped and why. Then
# loads the BF16 run's checkpoint as dcd-eval does and checks the KV-cached decoder against
# megatron's forward on that device (the Transformer Engine layer spec where TE imports).
#
#   scripts/gpu_smoke.sh [--wheelhouse DIR] [key=value ...]   # extra dcd-train overrides for every run
#                                             # (steps: DCD_SMOKE_STEPS, not train.steps)
#
# --wheelhouse DIR (or DCD_WHEELHOUSE=DIR): first install the project from that wheelhouse (make
# wheelhouse, docs/offline.md) into OUT/site with no index, on top of DCD_PYTHON's packages, and run
# from there (working directory OUT, so a checkout cannot shadow it; Hugging Face libraries offline;
# MLflow tracking off where the wheelhouse has no mlflow set).
#
# Environment (all optional):
#   DCD_SMOKE_STEPS    optimizer steps per run (default 40)
#   DCD_SMOKE_TIMEOUT  seconds each run may take (default 210; two runs stay under 8 minutes)
#   DCD_SMOKE_OUT      output directory (default: a new temp dir, kept and printed)
#   DCD_PYTHON         interpreter (default: <repo>/.venv/bin/python if present, else python)
#   DCD_SMOKE_CPU=1    check the script itself without a GPU: tiny_cpu for 2 steps on CPU
#   DCD_SMOKE_PARTS    which parts run (default "bf16 decode fp8"; scripts/gpu_check.sh picks them)
#
# Exit codes: 0 every run that was not skipped succeeded; 1 a run failed or timed out;
# 2 no GPU visible (nothing was run).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
wheelhouse=${DCD_WHEELHOUSE:-}
if [[ ${1:-} == --wheelhouse ]]; then
    [[ -n ${2:-} ]] || { echo "[gpu-smoke] --wheelhouse needs a folder (make wheelhouse builds dist/wheelhouse)" >&2; exit 2; }
    wheelhouse=$2
    shift 2
fi
if [[ -z ${DCD_PYTHON:-} ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then DCD_PYTHON=$repo/.venv/bin/python; else DCD_PYTHON=python; fi
fi
# absolute (the runs may change directory); the name is kept, not resolved, so a venv stays a venv
[[ $DCD_PYTHON == */* ]] && DCD_PYTHON=$(cd "$(dirname "$DCD_PYTHON")" && pwd)/$(basename "$DCD_PYTHON")
steps=${DCD_SMOKE_STEPS:-40}
run_timeout=${DCD_SMOKE_TIMEOUT:-210}
out=${DCD_SMOKE_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/dcd-gpu-smoke.XXXXXX")}
cpu_mode=${DCD_SMOKE_CPU:-0}
parts=" ${DCD_SMOKE_PARTS:-bf16 decode fp8} "
mkdir -p "$out"
out=$(cd "$out" && pwd)
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$out/mlflow.db}
export PYTHONUNBUFFERED=1

say() { echo "[gpu-smoke] $*"; }

summary=()
failed=0

if [[ -n $wheelhouse ]]; then
    [[ -d $wheelhouse ]] || { say "--wheelhouse: $wheelhouse is not a folder (make wheelhouse builds dist/wheelhouse)" >&2; exit 2; }
    wheelhouse=$(cd "$wheelhouse" && pwd)
    # shellcheck source=scripts/offline_install.sh disable=SC1091  # the checkout's, read at run time
    source "$repo/scripts/offline_install.sh"
    say "installing from $wheelhouse into $out/site (no index; log $out/site.log)"
    dcd_offline_install "$DCD_PYTHON" "$wheelhouse" "$out/site" "$out/site.log" || {
        say "offline install FAILED (log $out/site.log)"; exit 1; }
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    if ! "$DCD_PYTHON" -c 'import mlflow' >/dev/null 2>&1; then
        say "mlflow is not installed (no mlflow set in the wheelhouse): tracking.enabled=false"
        set -- tracking.enabled=false "$@"
    fi
    cd "$out"
fi

# One training run; appends "label: loss A -> B, N tokens/s" (or why it failed) to the summary.
run_recipe() {
    local label=$1 recipe=$2
    shift 2
    local dir=$out/$label
    say "$label: $recipe, $steps steps, output $dir (log $dir.log, limit ${run_timeout}s)"
    local rc=0
    timeout --kill-after=15 "$run_timeout" "$DCD_PYTHON" -m dcd_megatron.cli.train --recipe "$recipe" \
        train.steps="$steps" train.output_dir="$dir" train.eval_interval=0 train.save_interval=0 \
        tracking.plot_interval=0 "$@" >"$dir.log" 2>&1 || rc=$?
    if (( rc != 0 )); then
        local why="exit code $rc"
        (( rc == 124 || rc == 137 )) && why="timed out after ${run_timeout}s"
        say "$label: FAILED ($why); last lines of $dir.log:"
        tail -n 15 "$dir.log" >&2
        summary+=("$label: FAILED ($why), log $dir.log")
        failed=1
        return 0
    fi
    local line
    if ! line=$("$DCD_PYTHON" - "$dir/metrics.jsonl" <<'PY'
import json, statistics, sys

records = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
train = [r for r in records if "loss" in r and "tokens_per_s" in r]
if not train:
    sys.exit(f"no training records with loss and tokens_per_s in {sys.argv[1]}")
# tokens/s: median over steps after the first quarter (compilation, allocator and cache warm-up)
steady = train[len(train) // 4:] or train
tps = statistics.median(r["tokens_per_s"] for r in steady)
print(f"loss {train[0]['loss']:.4f} (step {train[0]['step']}) -> {train[-1]['loss']:.4f} (step {train[-1]['step']}), "
      f"{tps:,.0f} tokens/s (median of steps {steady[0]['step']}-{steady[-1]['step']})")
PY
    ); then
        summary+=("$label: FAILED (could not read $dir/metrics.jsonl)")
        failed=1
        return 0
    fi
    say "$label: $line"
    summary+=("$label: $line")
}

check_decoder() {
    local label=$1 dir=$2 device=$3
    if [[ ! -f $dir/final_metrics.json ]]; then
        summary+=("$label: skipped (no finished run in $dir)")
        return 0
    fi
    local line rc=0
    line=$(timeout --kill-after=15 "$run_timeout" "$DCD_PYTHON" - "$dir" "$device" 2>"$dir.decode.log" <<'PY'
import sys

from dcd_megatron.eval.student import decoder_for
from dcd_megatron.model.inference import load_trained_model
from dcd_megatron.model.kv_decoder import KVCachedGPT, max_logit_difference

loaded, tok = load_trained_model(sys.argv[1], device=sys.argv[2])
te = any("layer_norm_weight" in k for k in loaded.module.state_dict())
diff, scale = max_logit_difference(KVCachedGPT.from_loaded(loaded), loaded, tok.bos_id)
used = isinstance(decoder_for(loaded, tok.bos_id), KVCachedGPT)
dtype = next(loaded.module.parameters()).dtype
print(f"KV decoder vs megatron ({'TE' if te else 'local'} spec, {dtype}, {loaded.device}): max |logit diff| "
      f"{diff:.2e} of max |logit| {scale:.1f}; {'KV cache used' if used else 'NOT used: dcd-eval would recompute'}")
sys.exit(0 if used else 1)
PY
    ) || rc=$?
    if (( rc != 0 )); then
        say "$label: FAILED (exit code $rc) ${line}; last lines of $dir.decode.log:"
        tail -n 15 "$dir.decode.log" >&2
        summary+=("$label: FAILED (exit code $rc) $line")
        failed=1
        return 0
    fi
    say "$label: $line"
    summary+=("$label: $line")
}

if [[ $cpu_mode == 1 ]]; then
    steps=${DCD_SMOKE_STEPS:-2}
    say "DCD_SMOKE_CPU=1: checking the script on CPU (tiny_cpu, $steps steps); no GPU is used"
    run_recipe cpu tiny_cpu runtime.device=cpu data.seq_length=64 train.global_batch_size=8 \
        train.micro_batch_size=2 train.log_interval=1 optim.warmup_steps=1 "$@"
    [[ $parts == *" decode "* ]] && check_decoder decode "$out/cpu" cpu
    summary+=("bf16: skipped (DCD_SMOKE_CPU=1)" "fp8: skipped (DCD_SMOKE_CPU=1)")
else
    gpu_info=$("$DCD_PYTHON" -c '
import torch
if torch.cuda.is_available() and torch.cuda.device_count() > 0:
    major, minor = torch.cuda.get_device_capability(0)
    print(major, minor, torch.cuda.get_device_name(0))
' 2>/dev/null || true)
    if [[ -z $gpu_info ]]; then
        say "no GPU visible (torch.cuda.is_available() is False for $DCD_PYTHON): nothing was run."
        say "Run it on a GPU node (e.g. srun --gpus=1 scripts/gpu_smoke.sh), or DCD_SMOKE_CPU=1 to check the script on CPU."
        exit 2
    fi
    read -r cc_major cc_minor gpu_name <<< "$gpu_info"
    say "GPU 0: $gpu_name (compute capability $cc_major.$cc_minor); python $DCD_PYTHON"
    export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}

    [[ $parts == *" bf16 "* ]] && run_recipe bf16 tiny_gpu_bf16 "$@"
    [[ $parts == *" decode "* ]] && check_decoder decode "$out/bf16" cuda

    if [[ $parts != *" fp8 "* ]]; then
        :
    elif ! te_error=$("$DCD_PYTHON" -c 'import transformer_engine.pytorch' 2>&1); then
        reason="transformer_engine does not import ($(echo "$te_error" | tail -n 1))"
        say "fp8: skipped: $reason"
        summary+=("fp8: skipped: $reason")
    elif (( cc_major * 10 + cc_minor < 89 )); then
        reason="FP8 needs compute capability >= 8.9 (Ada, Hopper, Blackwell); this GPU has $cc_major.$cc_minor"
        say "fp8: skipped: $reason"
        summary+=("fp8: skipped: $reason")
    else
        run_recipe fp8 tiny_gpu_fp8 "$@"
    fi
fi

say "summary ($steps steps per run, output $out):"
for line in "${summary[@]}"; do
    say "  $line"
done
exit "$failed"
