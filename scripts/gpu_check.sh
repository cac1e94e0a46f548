#!/usr/bin/env bash
# GPU check of the submission image's CUDA path (scripts/gpu_check.py; docs/GPU_CHECK.md).
#
#   usage: bash scripts/gpu_check.sh [WHERE] [--out DIR] [--] [scripts/gpu_check.py flags]
#
# WHERE, the Python environment the check runs in:
#   (default)          the current interpreter: $PYTHON, else python3
#   --python PY        that interpreter (e.g. one with the image's torch already installed)
#   --venv             a throw-away virtual environment with exactly the image's packages
#                      (pip install --no-deps -r requirements-image-cu12.txt), removed afterwards
#     --cuda 12|13     which image requirements: 12 (default, requirements-image-cu12.txt) or 13
#                      (requirements-image.txt)
#     --find-links DIR install from wheels in DIR only (no index; for hosts without PyPI)
#     --venv-dir DIR   create (or reuse) the environment in DIR and keep it
#   --docker IMAGE     inside the built image (docker run --gpus device=0 -m 32G), with this
#                      repository mounted read-only at /repo; the image's Python, torch and CUDA
#                      libraries run the repository's code
# --out DIR: report folder (default ./gpu_check_out): gpu_check.json, gpu_check.txt.
# Every other argument goes to scripts/gpu_check.py, e.g. --quick, --weights DIR.
# Exit status: scripts/gpu_check.py's (0 pass, 1 a target or check missed, 2 no CUDA device),
# or 3 when the environment cannot be set up.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WHERE=current
PY=${PYTHON:-python3}
CUDA=12
LINKS=
VENV_DIR=
IMAGE=
OUT=gpu_check_out
ARGS=()

say() { echo "gpu_check.sh: $*"; }
fail() { echo "gpu_check.sh: error: $*" >&2; exit 3; }

while [ $# -gt 0 ]; do
    case "$1" in
        --python) [ $# -ge 2 ] || fail "--python needs an interpreter"; WHERE=current; PY=$2; shift 2 ;;
        --venv) WHERE=venv; shift ;;
        --cuda) [ $# -ge 2 ] || fail "--cuda needs 12 or 13"; CUDA=$2; shift 2 ;;
        --find-links) [ $# -ge 2 ] || fail "--find-links needs a folder"; LINKS=$2; shift 2 ;;
        --venv-dir) [ $# -ge 2 ] || fail "--venv-dir needs a folder"; WHERE=venv; VENV_DIR=$2; shift 2 ;;
        --docker) [ $# -ge 2 ] || fail "--docker needs an image"; WHERE=docker; IMAGE=$2; shift 2 ;;
        --out) [ $# -ge 2 ] || fail "--out needs a folder"; OUT=$2; shift 2 ;;
        -h|--help) sed -n '2,24s/^# \{0,1\}//p' "$0"; exit 0 ;;
        --) shift; ARGS+=("$@"); break ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

case "$CUDA" in
    12) REQUIREMENTS=$ROOT/requirements-image-cu12.txt ;;
    13) REQUIREMENTS=$ROOT/requirements-image.txt ;;
    *) fail "--cuda '$CUDA': use 12 or 13" ;;
esac
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

case "$WHERE" in
    current)
        command -v "$PY" >/dev/null 2>&1 || fail "no interpreter '$PY'"
        exec "$PY" "$ROOT/scripts/gpu_check.py" --out "$OUT" "${ARGS[@]}"
        ;;
    venv)
        KEEP=1
        if [ -z "$VENV_DIR" ]; then
            VENV_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-venv.XXXXXX")
            KEEP=0
        fi
        if [ "$KEEP" = 0 ]; then trap 'rm -rf "$VENV_DIR"' EXIT; fi
        t0=$(date +%s)
        if [ ! -x "$VENV_DIR/bin/python" ]; then
            say "creating a virtual environment in $VENV_DIR ($PY: $("$PY" --version 2>&1))"
            "$PY" -m venv "$VENV_DIR" || fail "python -m venv failed"
        fi
        PIP=("$VENV_DIR/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$REQUIREMENTS")
        if [ -n "$LINKS" ]; then PIP+=(--no-index --find-links "$LINKS"); fi
        say "installing $(basename "$REQUIREMENTS") (--no-deps${LINKS:+, wheels from $LINKS only})"
        "${PIP[@]}" || fail "pip install of $(basename "$REQUIREMENTS") failed"
        say "environment ready in $(( $(date +%s) - t0 )) s"
        rc=0
        "$VENV_DIR/bin/python" "$ROOT/scripts/gpu_check.py" --out "$OUT" "${ARGS[@]}" || rc=$?
        exit "$rc"
        ;;
    docker)
        command -v docker >/dev/null 2>&1 || fail "no 'docker' command"
        docker image inspect "$IMAGE" >/dev/null 2>&1 || fail "image '$IMAGE' not found (load it: docker load -i NAME.tar.gz)"
        say "inside $IMAGE (repository mounted read-only at /repo, report to $OUT)"
        exec docker container run --rm --gpus "device=0" -m 32G \
            -e PYTHONDONTWRITEBYTECODE=1 -v "$ROOT:/repo:ro" -v "$OUT:/out" -w /repo "$IMAGE" \
            python /repo/scripts/gpu_check.py --out /out "${ARGS[@]}"
        ;;
esac
