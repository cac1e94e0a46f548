#!/bin/sh
# Entry point of the submission image: the organizer's harness runs `sh predict.sh` in /workspace
# (dash: POSIX sh only). Segments every case in the inputs folder into the outputs folder.
#
#   sh predict.sh [--inputs DIR] [--outputs DIR] [--weights DIR] [--device cpu|cuda] ...
#
# Defaults: /workspace/inputs, /workspace/outputs, /workspace/weights; the environment variables
# INFER_INPUTS, INFER_OUTPUTS, INFER_WEIGHTS, INFER_DEVICE override them, flags override both.
# PYTHON names the interpreter (default: python3, else python). Works from any directory.
set -eu

here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)

if [ -z "${PYTHON:-}" ]; then
    if command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi

PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
# never import an infer/ from the caller's working directory (Python >= 3.11)
PYTHONSAFEPATH=1
export PYTHONSAFEPATH
export PYTHONPATH
exec "$PYTHON" -m infer "$@"
