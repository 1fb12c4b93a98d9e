# shellcheck shell=bash
# Sourced by scripts/gpu_smoke.sh and scripts/gpu_check.sh: the offline install of docs/offline.md.
#
#   dcd_offline_install PYTHON WHEELHOUSE TARGET LOG
#
# installs, with no index (nothing is fetched), the wheelhouse's core set into TARGET and, of every
# other set listed there (image, mlflow, nemo-run), the pins PYTHON lacks; then points PYTHONPATH
# and PATH at TARGET and checks that dcd_megatron and megatron.core import from there. The machine's
# pip configuration is ignored (PIP_CONFIG_FILE=/dev/null) so no index or constraint of it applies.
# Returns non-zero (after printing the last lines of LOG) when pip or the import check fails.

dcd_offline_install() {
    local py=$1 wheelhouse=$2 target=$3 log=$4
    local here
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    if [[ ! -f $wheelhouse/core.txt ]]; then
        echo "no $wheelhouse/core.txt: build the wheelhouse first (make wheelhouse, docs/offline.md)" >&2
        return 2
    fi
    mkdir -p "$target"
    local reqs=(-r "$wheelhouse/core.txt") set lacking
    for set in image mlflow nemo-run; do
        [[ -f $wheelhouse/$set.txt ]] || continue
        lacking=$target.$set-lacking.txt
        "$py" "$here/wheelhouse.py" missing --dest "$wheelhouse" "$set" >"$lacking" || return 1
        [[ -s $lacking ]] && reqs+=(-r "$lacking")
    done
    if ! env -u PIP_CONSTRAINT -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 \
        PIP_DISABLE_PIP_VERSION_CHECK=1 "$py" -m pip install --no-index --no-deps --find-links "$wheelhouse" --target "$target" \
        "${reqs[@]}" >"$log" 2>&1; then
        tail -n 15 "$log" >&2
        return 1
    fi
    export PYTHONPATH=$target${PYTHONPATH:+:$PYTHONPATH}
    export PATH=$target/bin:$PATH
    # from the target's folder, so that a checkout in the working directory cannot shadow the install
    (cd "$target" && "$py" -c '
import os, sys
import dcd_megatron, megatron.core
target = os.path.realpath(sys.argv[1])
where = os.path.realpath(dcd_megatron.__file__)
if not where.startswith(target + os.sep):
    sys.exit(f"dcd_megatron imports from {where}, not from {target}")
print(f"installed offline into {target}: dcd_megatron, megatron-core {megatron.core.__version__}")
' "$target" 2>>"$log") || { tail -n 15 "$log" >&2; return 1; }
}
