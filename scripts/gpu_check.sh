#!/usr/bin/env bash
# The prepared GPU check (docs/performance.md "The GPU check"): every GPU path once, on one GPU, in
# under 8 minutes on an H100, each part in its own time limit so that one failure loses no other
# (the limits add up to 475 s):
#
#   install      the wheelhouse installed with no index into OUT/site (with --wheelhouse)
#   bf16-dcd     tiny_gpu_bf16, the DCD default, then the KV decoder against megatron's forward
#                on its checkpoint (scripts/gpu_smoke.sh parts "bf16 decode")
#   bf16-sft     tiny_gpu_bf16 with loss.method=sft
#   fp8          tiny_gpu_fp8 where Transformer Engine imports and the GPU has FP8 (else: why not)
#   train-step   benchmarks/train_step.py --device cuda --preset h100 (DCD / SFT step time, MFU)
#   loss-16k-32k benchmarks/loss_seq_sweep.py on CUDA at 16k and 32k tokens (the h100 preset's
#                head: time ratio to megatron's CE, peak memory)
#   decode       benchmarks/decode.py on CUDA, bf16 (KV decoder against megatron's recompute)
#
#   scripts/gpu_check.sh [--wheelhouse DIR] [--out DIR] [--dry-run] [--cpu]
#
# --wheelhouse DIR (or DCD_WHEELHOUSE): install from it first (nothing is fetched); without it the
# packages of DCD_PYTHON are used as they are. --out DIR (or DCD_CHECK_OUT, default a new temp dir):
# logs, runs and the summary, OUT/gpu_check.md. --dry-run: print each part's command and limit, run
# nothing. --cpu: check the script's plumbing without a GPU (training via DCD_SMOKE_CPU=1, the
# benchmarks at toy sizes on CPU, no FP8; about 2 minutes on 2 cores; the figures mean nothing).
# DCD_PYTHON: the interpreter (default <repo>/.venv/bin/python if present, else python).
#
# Output: one markdown table, | part | status | seconds | limit | result |, status one of ok,
# FAILED, TIMEOUT, skipped (result says why), dry-run; then the benchmarks' own tables. Printed and
# written to OUT/gpu_check.md. Exit code: 0 when no part failed or timed out, 1 otherwise, 2 on bad
# arguments or with no GPU visible (nothing run).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
wheelhouse=${DCD_WHEELHOUSE:-}
out=${DCD_CHECK_OUT:-}
dry_run=0
cpu=0
while (( $# )); do
    case $1 in
        --wheelhouse) [[ -n ${2:-} ]] || { echo "--wheelhouse needs a folder" >&2; exit 2; }; wheelhouse=$2; shift 2 ;;
        --out) [[ -n ${2:-} ]] || { echo "--out needs a folder" >&2; exit 2; }; out=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --cpu) cpu=1; shift ;;
        *) echo "unknown argument '$1': scripts/gpu_check.sh [--wheelhouse DIR] [--out DIR] [--dry-run] [--cpu]" >&2; exit 2 ;;
    esac
done
if [[ -z ${DCD_PYTHON:-} ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then DCD_PYTHON=$repo/.venv/bin/python; else DCD_PYTHON=python; fi
fi
[[ $DCD_PYTHON == */* ]] && DCD_PYTHON=$(cd "$(dirname "$DCD_PYTHON")" && pwd)/$(basename "$DCD_PYTHON")
export DCD_PYTHON
if [[ -n $wheelhouse ]]; then
    [[ -f $wheelhouse/core.txt ]] || { echo "--wheelhouse: no $wheelhouse/core.txt (make wheelhouse builds dist/wheelhouse)" >&2; exit 2; }
    wheelhouse=$(cd "$wheelhouse" && pwd)
fi
out=${out:-$(mktemp -d "${TMPDIR:-/tmp}/dcd-gpu-check.XXXXXX")}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

say() { echo "[gpu-check] $*"; }

rows=()
details=()
failed=0

# One part: run_part NAME LIMIT_S COMMAND...; its output goes to OUT/NAME.log, its row to the table.
run_part() {
    local name=$1 limit=$2
    shift 2
    if (( dry_run )); then
        local cmd
        cmd=$(printf '%q ' "$@")
        say "$name (limit ${limit}s): $cmd"
        rows+=("| $name | dry-run | - | $limit | \`${cmd% }\` |")
        return 0
    fi
    say "$name: running (limit ${limit}s, log $out/$name.log)"
    local rc=0 start=$SECONDS
    (cd "$out" && timeout --kill-after=10 "$limit" "$@") >"$out/$name.log" 2>&1 || rc=$?
    local took=$(( SECONDS - start )) status=ok result
    result=$(part_result "$name")
    if (( rc == 124 || rc == 137 )); then
        status=TIMEOUT failed=1
    elif (( rc != 0 )); then
        status=FAILED failed=1
        grep -q '^\[gpu-smoke\]   ' "$out/$name.log" || result=$(grep -v '^\s*$' "$out/$name.log" | tail -n 1 | cut -c1-200)
        result="exit code $rc: $result"
    elif [[ $result == *": skipped"* && $result != *"loss "* && $result != *"KV decoder"* ]]; then
        status=skipped
    fi
    say "$name: $status in ${took}s: $result"
    rows+=("| $name | $status | $took | $limit | ${result//|/\\|} |")
    if grep -q '^|' "$out/$name.log"; then
        details+=("" "### $name" "" "$(grep '^|' "$out/$name.log")")
    fi
}

# The result column: gpu_smoke's summary lines, or a benchmark's last line that is not its table.
part_result() {
    local log=$out/$1.log
    if grep -q '^\[gpu-smoke\]   ' "$log"; then
        grep '^\[gpu-smoke\]   ' "$log" | sed 's/^\[gpu-smoke\]   //' | paste -sd ';' | sed 's/;/; /g'
    else
        grep -v '^|' "$log" | grep -v '^\s*$' | tail -n 1 | cut -c1-300
    fi
}

if (( cpu )); then
    gpu="CPU (--cpu: the plumbing only, toy sizes, no figure means anything)"
    say "$gpu; python $DCD_PYTHON; output $out"
elif (( ! dry_run )); then
    gpu=$("$DCD_PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null || true)
    if [[ -z $gpu ]]; then
        say "no GPU visible (torch.cuda.is_available() is False for $DCD_PYTHON): nothing was run."
        say "Run it on a GPU node (e.g. srun --gpus=1 scripts/gpu_check.sh), or --dry-run to see the commands."
        exit 2
    fi
    say "GPU 0: $gpu; python $DCD_PYTHON; output $out"
fi

if [[ -n $wheelhouse ]]; then
    run_part install 30 bash -c "source '$repo/scripts/offline_install.sh' && dcd_offline_install '$DCD_PYTHON' '$wheelhouse' '$out/site' '$out/install-pip.log'"
    export PYTHONPATH=$out/site${PYTHONPATH:+:$PYTHONPATH}
    export PATH=$out/site/bin:$PATH
fi
tracking=()
if (( ! dry_run )) && ! "$DCD_PYTHON" -c 'import mlflow' >/dev/null 2>&1; then
    tracking=(tracking.enabled=false)  # no mlflow set in the wheelhouse: training without tracking
fi

smoke=("$repo/scripts/gpu_smoke.sh")
# the sizes of each benchmark: the GPU's, or (--cpu) toy ones that only exercise the plumbing
step_args=(--device cuda --preset h100)
# the h100 preset's head (Qwen2.5-7B-like: V=152064, h=3584, bf16, chunk 4096) at 16k and 32k only
loss_args=(--device cuda --tp 1 --vocab 152064 --hidden 3584 --dtype bf16 --chunk 4096 --seqs 16384 32768 --reps 3)
decode_args=(--device cuda --dtype bf16 --layers 8 --hidden 1024 --heads 16 --groups 4 --ffn 2816 --new-tokens 256)
steps=30
if (( cpu )); then
    export DCD_SMOKE_CPU=1
    steps=2
    step_args=(--device cpu --layers 1 --hidden 64 --heads 2 --groups 1 --vocab 512 --seq 128 --micro 1 --steps 1)
    loss_args=(--device cpu --tp 1 --vocab 512 --hidden 64 --seqs 256 --reps 1)
    decode_args=(--device cpu --layers 1 --hidden 64 --heads 2 --groups 1 --ffn 128 --prompt 8 --new-tokens 4 --batch 1 --reps 1)
fi
run_part bf16-dcd 90 env DCD_SMOKE_PARTS="bf16 decode" DCD_SMOKE_STEPS="$steps" DCD_SMOKE_TIMEOUT=75 \
    DCD_SMOKE_OUT="$out/bf16-dcd" "${smoke[@]}" "${tracking[@]}"
run_part bf16-sft 50 env DCD_SMOKE_PARTS=bf16 DCD_SMOKE_STEPS="$steps" DCD_SMOKE_TIMEOUT=40 \
    DCD_SMOKE_OUT="$out/bf16-sft" "${smoke[@]}" loss.method=sft "${tracking[@]}"
if (( cpu )); then
    rows+=("| fp8 | skipped | - | 50 | --cpu: FP8 needs a GPU with Transformer Engine |")
else
    run_part fp8 50 env DCD_SMOKE_PARTS=fp8 DCD_SMOKE_STEPS="$steps" DCD_SMOKE_TIMEOUT=40 \
        DCD_SMOKE_OUT="$out/fp8" "${smoke[@]}" "${tracking[@]}"
fi
run_part train-step 150 "$DCD_PYTHON" "$repo/benchmarks/train_step.py" "${step_args[@]}"
run_part loss-16k-32k 60 "$DCD_PYTHON" "$repo/benchmarks/loss_seq_sweep.py" "${loss_args[@]}"
run_part decode 45 "$DCD_PYTHON" "$repo/benchmarks/decode.py" "${decode_args[@]}"

{
    echo "# GPU check: $(date -u +%Y-%m-%dT%H:%MZ)${gpu:+, $gpu}"
    echo
    echo "| part | status | seconds | limit | result |"
    echo "| --- | --- | --- | --- | --- |"
    printf '%s\n' "${rows[@]}"
    if (( ${#details[@]} )); then printf '%s\n' "${details[@]}"; fi
} | tee "$out/gpu_check.md"
say "summary written to $out/gpu_check.md"
exit "$failed"
