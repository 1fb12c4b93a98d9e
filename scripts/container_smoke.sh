#!/usr/bin/env bash
# Single-node smoke run (the container's default command): a few steps of the tiny recipe on
# every visible GPU via torchrun, or one CPU rank when there is none. Extra args are overrides.
set -euo pipefail

nproc=${DCD_NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
output_dir=${DCD_OUTPUT_DIR:-/tmp/dcd-smoke}
recipe=${DCD_RECIPE:-tiny_cpu}

echo "[dcd-smoke] $nproc rank(s), recipe $recipe, output $output_dir"
exec torchrun --standalone --nproc-per-node="$nproc" -m dcd_megatron.cli.train \
    --recipe "$recipe" runtime.device=auto train.steps="${DCD_STEPS:-20}" \
    train.output_dir="$output_dir" "$@"
