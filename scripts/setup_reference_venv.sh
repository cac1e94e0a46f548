#!/usr/bin/env bash
# Test-only reference environments for the parity tests (tests/test_parity_reference.py); never
# part of the submission image (.dockerignore is an allow-list). Idempotent: a venv whose import
# check passes is left alone.
#   .venv-ref     nninteractive==1.1.5 with the current nnunetv2 (the reference the policy follows)
#   .venv-ref101  nninteractive==1.0.1 with nnunetv2==2.6.0 (the release the weights come from)
# torch is held to the CPU wheel torch==2.13.0 through a pip constraints file: without it the
# dependency chain would pull a multi-GB CUDA build.
#   usage: bash scripts/setup_reference_venv.sh [ref|ref101]...   (default: both)
set -euo pipefail
for arg in "$@"; do
    case $arg in
        -h|--help) sed -n '2,9s/^# \{0,1\}//p' "$0"; exit 0 ;;
    esac
done
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP_FLAGS=(-q --disable-pip-version-check)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"

setup() {  # setup DIR SPEC...
    local dir=$1; shift
    if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "import nnInteractive.inference.inference_session" 2>/dev/null; then
        echo "$dir: ready"
        return
    fi
    local t0; t0=$(date +%s)
    [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
    "$dir/bin/python" -m pip install "${PIP_FLAGS[@]}" torch==2.13.0
    "$dir/bin/python" -m pip install "${PIP_FLAGS[@]}" -c "$constraints" "$@"
    "$dir/bin/python" -c "import nnInteractive.inference.inference_session, torch; print('$dir ready: torch', torch.__version__)"
    echo "$dir: set up in $(( $(date +%s) - t0 )) s, $(du -sm "$dir" | cut -f1) MiB"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(ref ref101)
for t in "${targets[@]}"; do
    case $t in
        ref) setup .venv-ref nninteractive==1.1.5 ;;
        ref101) setup .venv-ref101 nninteractive==1.0.1 nnunetv2==2.6.0 ;;
        *) echo "unknown target $t" >&2; exit 2 ;;
    esac
done
