#!/usr/bin/env bash
# Distillation training on 8 nodes x 8 GPUs with pyxis/enroot: `sbatch slurm/dcd_8node.sh [--recipe NAME] [key=value ...]`.
# The same file runs a CPU-only one-node test when sbatch options and DCD_* variables override
# the header (see docs/launch.md for both command lines and every variable).
#
# Launch model: one Slurm task per GPU (srun), not torchrun per node. Slurm then owns every
# rank (placement, signals, scancel, exit codes), pyxis sets up one container per node for its
# tasks, and nothing else needs a rendezvous: dcd-train reads SLURM_PROCID/SLURM_NTASKS/
# SLURM_LOCALID and the MASTER_ADDR/MASTER_PORT exported below. The CPU test uses the same path with fewer tasks.
# Five minutes before the time limit Slurm sends SIGUSR1 to every rank (--signal): dcd-train
# saves a checkpoint and exits cleanly; the next job with the same name resumes from it.
#
#SBATCH --job-name=dcd-8node
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@300
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
set -euo pipefail

: "${SLURM_JOB_ID:?run this script with sbatch (or inside an salloc allocation)}"
submit_dir=${SLURM_SUBMIT_DIR:-$PWD}

# --- where things are (override any of these in the environment) -----------------------------
DCD_IMAGE=${DCD_IMAGE:-$submit_dir/dcd-megatron.sqsh}           # enroot squashfs or registry#image
DCD_OUTPUT_DIR=${DCD_OUTPUT_DIR:-$submit_dir/runs/$SLURM_JOB_NAME} # same job name => same dir => resume
DCD_MOUNTS=${DCD_MOUNTS:-$submit_dir:$submit_dir}                # pyxis --container-mounts list
DCD_NO_CONTAINER=${DCD_NO_CONTAINER:-0}                          # 1: run on the host, no pyxis
if [[ $DCD_NO_CONTAINER == 1 ]]; then
    DCD_PYTHON=${DCD_PYTHON:-$submit_dir/.venv/bin/python}       # the host's venv
else
    DCD_PYTHON=${DCD_PYTHON:-python}                              # the container's python
fi
DCD_SRUN_ARGS=${DCD_SRUN_ARGS:-}                                  # extra srun flags, word-split

# --- rendezvous: first node of the allocation, a port derived from the job id ---------------
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
# Ranks come from each task's SLURM_PROCID/SLURM_LOCALID; stale torchrun variables would win.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE

# --- NCCL / CUDA settings (defaults; the environment wins) ----------------------------------
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}    # Megatron TP/SP overlap ordering
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead rank ends the job
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1

mkdir -p "$DCD_OUTPUT_DIR"
echo "[dcd] job $SLURM_JOB_ID ($SLURM_JOB_NAME): $SLURM_NNODES node(s), $SLURM_NTASKS task(s)," \
     "master $MASTER_ADDR:$MASTER_PORT, output $DCD_OUTPUT_DIR, container=$([[ $DCD_NO_CONTAINER == 1 ]] && echo none || echo "$DCD_IMAGE")"

srun_args=(--kill-on-bad-exit=1 --export=ALL)
if [[ $DCD_NO_CONTAINER != 1 ]]; then
    if ! srun --help 2>/dev/null | grep -q -- --container-image; then
        echo "[dcd] error: this Slurm has no pyxis (srun lacks --container-image); install pyxis," \
             "or run on the host with DCD_NO_CONTAINER=1 (and DCD_PYTHON=/path/to/venv/bin/python)" >&2
        exit 2
    fi
    # The output dir must be visible inside the container at the same path.
    [[ $DCD_OUTPUT_DIR == "$submit_dir"/* ]] || DCD_MOUNTS+=",$DCD_OUTPUT_DIR:$DCD_OUTPUT_DIR"
    srun_args+=(--container-image="$DCD_IMAGE" --container-mounts="$DCD_MOUNTS"
                --container-workdir="$submit_dir" --no-container-mount-home)
fi
read -r -a extra_srun_args <<< "$DCD_SRUN_ARGS"

srun "${srun_args[@]}" "${extra_srun_args[@]}" \
    "$DCD_PYTHON" -m dcd_megatron.cli.train "$@" \
    train.output_dir="$DCD_OUTPUT_DIR" train.resume=auto
