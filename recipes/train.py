"""Train a student with the DCD loss through NeMo-Run's command line.

    python recipes/train.py --factory RECIPE [section.key=value ...] [run.executor=NAME run.executor.FIELD=VALUE] [--dryrun] [-y]

RECIPE is one of dcd_megatron.recipes.RECIPES (tiny_cpu, qwen25_1p5b_h100_bf16, ...); overrides are
dcd-train's keys (train.steps=20, loss.method=tis); executors: local, slurm_h100, docker. The same
command is `nemo dcd train ...`. See docs/launch.md, section "NeMo-Run".
"""

import nemo_run as run

from dcd_megatron.launch.nemo import train

if __name__ == "__main__":
    run.cli.main(train)
