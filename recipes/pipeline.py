"""Score -> train -> eval -> export as one NeMo-Run experiment, through NeMo-Run's command line.

    python recipes/pipeline.py --factory RECIPE teacher=CKPT traces=TRACES [benchmarks=[NAME=SOURCE,...]]
        [work_dir=DIR] [section.key=value ...] [run.executor=NAME ...] [--dryrun] [-y]

The same command is `nemo dcd pipeline ...`. See docs/launch.md, section "NeMo-Run".
"""

import nemo_run as run

from dcd_megatron.launch.pipeline import pipeline

if __name__ == "__main__":
    run.cli.main(pipeline)
