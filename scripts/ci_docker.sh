#!/usr/bin/env bash
# CI, real Docker: make Docker usable, then run the image's end-to-end test, which builds the
# demo image with ./build.sh --demo, loads the tarball, runs every sample case's stages with the
# organizer's command through `python -m evaluation --docker`, and checks the image, including
# `python -m scripts.server_check --image` on it: the image's torch build has kernels for the
# evaluation server's GPU (compute capability 7.5) and runs on its CUDA 12.1 driver, and no
# bfloat16 is used (no GPU needed; the result lines are in the test's summary).
# Needs root on a machine without Docker (the set-up installs and starts it) and the venv that
# .ci/run makes (.venv; PYTHON overrides). Prints how long each part took.
#   usage: bash scripts/ci_docker.sh [DOCKER_SETUP_SCRIPT]
set -euo pipefail
case "${1:-}" in
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SETUP=${1:-../shared/docker/offline-docker.sh}
start=$(date +%s)

# The set-up script is idempotent: it returns at once when the daemon answers and the base
# image is there.
if [ -f "$SETUP" ]; then
    bash "$SETUP"
elif ! docker info >/dev/null 2>&1; then
    echo "ci_docker: Docker does not answer and there is no set-up script at $SETUP" >&2
    exit 1
fi
# pigz lets build.sh compress the 4 GB image on both cores (about 45 s less than gzip here).
if ! command -v pigz >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pigz >/dev/null 2>&1 \
        || echo "ci_docker: pigz not installed; build.sh uses gzip"
fi
setup_done=$(date +%s)
echo "ci_docker: Docker set-up took $((setup_done - start)) s"

# Its own temporary folder: .ci/run runs the main suite at the same time, and pytest's default
# base folder keeps only the three newest sessions' folders.
base=$(mktemp -d)
"$PY" -m pytest -q -m docker -rs -p no:cacheprovider --basetemp "$base/pytest" tests/test_docker_e2e.py
rm -rf "$base"
end=$(date +%s)
echo "ci_docker: image end-to-end test took $((end - setup_done)) s; total $((end - start)) s"
