#!/usr/bin/env bash
# Creates .venv (Python 3.11+) with CPU torch 2.13.0 first, then the test/tooling requirements and
# the reference network (dynamic-network-architectures, --no-deps, tests only). Idempotent.
#   usage: bash scripts/setup_venv.sh [--runtime-only]
set -euo pipefail
case "${1:-}" in
    -h|--help) sed -n '2,4s/^# \{0,1\}//p' "$0"; exit 0 ;;
    ""|--runtime-only) ;;
    *) echo "setup_venv.sh: unknown argument: $1 (usage: bash scripts/setup_venv.sh [--runtime-only])" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check numpy==2.4.6
if [ "${1:-}" != "--runtime-only" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps dynamic-network-architectures==0.4.4 surface-distance==0.1
fi
.venv/bin/python -c "import torch, numpy; print('venv ready: torch', torch.__version__, 'numpy', numpy.__version__)"
