"""`python -m dcd_recipes.run RECIPE [key=value ...] [--executor local|slurm|docker] [--dryrun]`."""

import sys

from dcd_megatron.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
