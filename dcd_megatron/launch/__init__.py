"""Launching with NeMo-Run: the `dcd train` and `dcd pipeline` entrypoints, recipe and executor
factories (`nemo.py`), and the score -> train -> eval -> export experiment (`pipeline.py`).

The user-facing scripts are `recipes/train.py` and `recipes/pipeline.py` at the repository root
(and `nemo dcd train|pipeline`, through the `nemo_run.cli` entry point); the code lives here so that
it is installed with `dcd_megatron` everywhere a job runs (a container or a cluster node imports
`dcd_megatron.launch.nemo.train` to start training).

Importing the package registers both entrypoints (NeMo-Run's CLI loads `dcd_megatron.launch.nemo`,
and so this package first): `pipeline.py` builds on `nemo.py`, never the other way round.
"""

from dcd_megatron.launch import pipeline  # noqa: F401  (registers `dcd pipeline` after `dcd train`)
