#!/bin/sh
# Entry point of the submission image: the organizer's harness runs `sh predict.sh` in /workspace
# (dash: POSIX sh only). Segments every case in the inputs folder into the outputs folder.
#
#   sh predict.sh [--inputs DIR] [--outputs DIR] [--weights DIR] [--device cpu|cuda] ...
#   sh predict.sh --help          (every option)
#
# Defaults: /workspace/inputs, /workspace/outputs, /workspace/weights; the environment variables
# INFER_INPUTS, INFER_OUTPUTS, INFER_WEIGHTS, INFER_DEVICE override them, flags override both.
# PYTHON names the interpreter. Unset: python3 (else python); on a host where that one cannot
# import torch, the project's .venv/bin/python next to this script when there is one (made by
# `bash scripts/setup_venv.sh`). Works from any directory.
set -eu

here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
setup="bash $here/scripts/setup_venv.sh"

# true when interpreter $1 finds torch (without importing it: a few ms, not seconds)
has_torch() {
    "$1" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)' >/dev/null 2>&1
}

if [ -z "${PYTHON:-}" ]; then
    if command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
    # Only on a host with the project's venv (the image has none, so its stages pay nothing).
    if [ -x "$here/.venv/bin/python" ] && ! has_torch "$PYTHON"; then
        PYTHON=$here/.venv/bin/python
    fi
fi

PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
# never import an infer/ from the caller's working directory (Python >= 3.11)
PYTHONSAFEPATH=1
export PYTHONSAFEPATH
export PYTHONPATH

rc=0
"$PYTHON" -m infer "$@" || rc=$?
# Checked only after a failure, so that a working stage pays nothing for it.
if [ "$rc" -ne 0 ] && ! has_torch "$PYTHON"; then
    echo "predict.sh: '$PYTHON' cannot import torch. Set up the project's environment with: $setup (or set PYTHON to an interpreter that has torch and numpy)" >&2
fi
exit "$rc"
