"""The drift lab: distil a small student from a larger teacher's digit-sum traces with every DCD arm.

    .venv/bin/python benchmarks/drift_lab.py --write docs/results.md      # the published lab (~25 min, 2 cores)
    .venv/bin/python benchmarks/drift_lab.py --tiny --out /tmp/lab         # a one-minute miniature

See docs/drift-lab.md; the code is dcd_megatron/lab/.
"""

import sys

from dcd_megatron.lab.run import main

if __name__ == "__main__":
    sys.exit(main())
