#!/usr/bin/env bash
# The install steps both images share (containers/Dockerfile on NGC PyTorch, containers/Dockerfile.cpu):
# the project with the extras CI installs (Makefile: pip install -e ".[dev]" after torch), not
# editable (an image is immutable), on the torch the image already has; then an import check and
# the permissions a non-root user needs. Run from the Dockerfiles with DCD_HOME = the copied repo.
set -euo pipefail
cd "${DCD_HOME:?DCD_HOME is not set}"
python -m pip install --no-cache-dir "./[dev]"
python -c "import megatron.core, nemo_run, dcd_megatron; print('megatron-core', megatron.core.__version__)"
mkdir -p /workspace/runs /opt/dcd
chmod 1777 /workspace/runs
chmod -R a+rX "$DCD_HOME" /opt/dcd
