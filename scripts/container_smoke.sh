#!/usr/bin/env bash
# Single-node smoke run (the container's default command): a few steps of the tiny recipe with
# torchrun, one rank per visible GPU (tiny_gpu_bf16), or one CPU rank (tiny_cpu) without GPUs.
# The global batch is sized for the data-parallel width; extra args are key=value overrides.
set -euo pipefail

gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
if (( gpus > 0 )); then default_recipe=tiny_gpu_bf16; else default_recipe=tiny_cpu; fi
nproc=${DCD_NPROC:-$(( gpus > 0 ? gpus : 1 ))}
recipe=${DCD_RECIPE:-$default_recipe}
output_dir=${DCD_OUTPUT_DIR:-/tmp/dcd-smoke}
micro_batch=2

echo "[dcd-smoke] $gpus GPU(s) visible: $nproc rank(s), recipe $recipe, output $output_dir"
exec torchrun --standalone --nproc-per-node="$nproc" -m dcd_megatron.cli.train \
    --recipe "$recipe" train.steps="${DCD_STEPS:-20}" \
    train.micro_batch_size="$micro_batch" train.global_batch_size="$(( 2 * micro_batch * nproc ))" \
    train.output_dir="$output_dir" "$@"
