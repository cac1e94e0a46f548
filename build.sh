#!/usr/bin/env bash
# Build the submission image and save it as the tarball handed to the organizer.
#
#   usage: ./build.sh [--weights DIR] [--name NAME] [--demo] [--cuda 12|13] [--out DIR]
#
#   --weights DIR  weights folder copied to /workspace/weights: a converted artifact
#                  (model_card.json + weights.pt) or an nnInteractive release folder.
#                  Default: weights/nninteractive_v1.0 (see scripts/prepare_weights.py),
#                  or weights/demo with --demo.
#   --name NAME    image and tarball name (default: nnint). The organizer runs the image
#                  named after the tarball, lower-cased and cut at its first '.' and first
#                  '_', so NAME must be lower-case letters, digits and inner '-' only.
#   --demo         allow the demo model (model card "demo": true); refused otherwise.
#   --cuda 12|13   torch build in the image. 12 (default): torch 2.8.0 for CUDA 12.8
#                  (requirements-image-cu12.txt), uses the GPU on any NVIDIA driver >= 525.
#                  13: torch 2.13.0 for CUDA 13.0 (requirements-image.txt), needs driver >= 580;
#                  on an older driver it runs on CPU, far over the time budget.
#   --out DIR      where NAME.tar.gz goes (default: the current directory).
#
# Steps: check the arguments and that Docker answers (starts nothing), stage a build context
# holding only Dockerfile, the chosen requirements file, infer/, predict.sh and the weights, build
# NAME:build, squash everything above the base image into one layer with docker-squash
# (>= 1.2.0; installed into a throw-away virtual environment if missing), tag NAME:latest,
# save NAME.tar.gz, print image size, tarball size and sha256.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")" && pwd)
NAME=nnint
WEIGHTS=
DEMO=0
CUDA=12
OUT=.
SQUASH_VERSION=1.2.2

say() { echo "build.sh: $*"; }
fail() { echo "build.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,18s/^# \{0,1\}//p' "$0"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --weights) [ $# -ge 2 ] || fail "--weights needs a folder"; WEIGHTS=$2; shift 2 ;;
        --name) [ $# -ge 2 ] || fail "--name needs a value"; NAME=$2; shift 2 ;;
        --demo) DEMO=1; shift ;;
        --cuda) [ $# -ge 2 ] || fail "--cuda needs a value: 12 or 13"; CUDA=$2; shift 2 ;;
        --out) [ $# -ge 2 ] || fail "--out needs a folder"; OUT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; fail "unknown argument: $1" ;;
    esac
done

case "$CUDA" in
    12) REQUIREMENTS=requirements-image-cu12.txt ;;
    13) REQUIREMENTS=requirements-image.txt ;;
    *) fail "--cuda '$CUDA' is not supported: use 12 (torch 2.8.0, CUDA 12.8, NVIDIA driver >= 525; the default) or 13 (torch 2.13.0, CUDA 13.0, driver >= 580)" ;;
esac

# The organizer derives the image name from the tarball: base name, lower-cased, cut at the
# first '.' and then at the first '_'. Refuse any NAME that this would change.
case "$NAME" in
    *[A-Z]*) fail "name '$NAME' has upper-case letters: the organizer lower-cases the tarball name and would run '$(echo "$NAME" | tr '[:upper:]' '[:lower:]'):latest', which does not exist" ;;
    *.*) fail "name '$NAME' has a '.': the organizer cuts the tarball name at its first '.' and would run '${NAME%%.*}:latest', which does not exist" ;;
    *_*) fail "name '$NAME' has a '_': the organizer cuts the tarball name at its first '_' and would run '${NAME%%_*}:latest', which does not exist" ;;
esac
echo "$NAME" | grep -Eq '^[a-z0-9]+(-+[a-z0-9]+)*$' \
    || fail "name '$NAME' is not a plain image name: use lower-case letters, digits and inner '-' only"

if [ -z "$WEIGHTS" ]; then
    if [ "$DEMO" = 1 ]; then WEIGHTS=$ROOT/weights/demo; else WEIGHTS=$ROOT/weights/nninteractive_v1.0; fi
fi
[ -d "$WEIGHTS" ] || fail "weights folder '$WEIGHTS' not found (production weights: python -m scripts.prepare_weights; demo: --demo)"
if [ -f "$WEIGHTS/model_card.json" ]; then
    if grep -Eq '"demo"[[:space:]]*:[[:space:]]*true' "$WEIGHTS/model_card.json" && [ "$DEMO" != 1 ]; then
        fail "'$WEIGHTS' holds the demo model (model card \"demo\": true), not a submission: pass --demo to build it anyway"
    fi
elif [ ! -f "$WEIGHTS/plans.json" ] || [ ! -f "$WEIGHTS/fold_0/checkpoint_final.pth" ]; then
    fail "'$WEIGHTS' is neither a converted artifact (model_card.json) nor an nnInteractive release folder (plans.json, fold_0/checkpoint_final.pth)"
fi
for f in Dockerfile .dockerignore "$REQUIREMENTS" predict.sh infer/__init__.py; do
    [ -e "$ROOT/$f" ] || fail "$ROOT/$f is missing"
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

command -v docker >/dev/null 2>&1 || fail "no 'docker' command on PATH: install Docker first"
docker info >/dev/null 2>&1 || fail "Docker does not answer ('docker info' failed): start the Docker daemon, or run as a user allowed to use it"

BASE=$(sed -n 's/^FROM[[:space:]]\{1,\}\([^[:space:]]\{1,\}\).*/\1/p' "$ROOT/Dockerfile" | head -n 1)
[ -n "$BASE" ] || fail "no FROM line in $ROOT/Dockerfile"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/build-sh.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# docker-squash >= 1.2.0: the one on PATH, or a throw-away virtual environment.
squash_ok() {
    local v
    v=$("$1" --version 2>/dev/null | grep -Eo '[0-9]+\.[0-9]+\.[0-9]+' | head -n 1) || return 1
    [ -n "$v" ] && [ "$(printf '%s\n%s\n' 1.2.0 "$v" | sort -V | head -n 1)" = 1.2.0 ]
}
SQUASH=$(command -v docker-squash || true)
if [ -z "$SQUASH" ] || ! squash_ok "$SQUASH"; then
    say "docker-squash >= 1.2.0 not found: installing docker-squash==$SQUASH_VERSION into a throw-away virtual environment"
    python3 -m venv "$WORK/venv" || fail "could not create a virtual environment (python3 -m venv)"
    "$WORK/venv/bin/pip" install -q "docker-squash==$SQUASH_VERSION" || fail "could not install docker-squash"
    SQUASH=$WORK/venv/bin/docker-squash
    squash_ok "$SQUASH" || fail "docker-squash in $WORK/venv does not report a version >= 1.2.0"
fi

# A build context with nothing but what the image needs.
CTX=$WORK/context
mkdir -p "$CTX"
cp "$ROOT/Dockerfile" "$ROOT/.dockerignore" "$ROOT/$REQUIREMENTS" "$ROOT/predict.sh" "$CTX/"
cp -R "$ROOT/infer" "$CTX/infer"
cp -RL "$WEIGHTS" "$CTX/weights"
find "$CTX" \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +

now() { date +%s; }
t0=$(now)
say "building $NAME:build from $BASE with weights $WEIGHTS and $REQUIREMENTS (CUDA $CUDA)"
docker build --build-arg WEIGHTS=weights --build-arg "REQUIREMENTS=$REQUIREMENTS" -t "$NAME:build" "$CTX"
t1=$(now)

say "squashing the layers above $BASE into one"
BASE_ID=$(docker image inspect --format '{{.Id}}' "$BASE")
OLD_ID=$(docker image inspect --format '{{.Id}}' "$NAME:latest" 2>/dev/null || true)
"$SQUASH" -f "$BASE_ID" -t "$NAME:latest" "$NAME:build"
docker image rm "$NAME:build" >/dev/null
# The previous NAME:latest, now untagged, would hold gigabytes: drop it unless something uses it.
if [ -n "$OLD_ID" ]; then docker image rm "$OLD_ID" >/dev/null 2>&1 || true; fi
t2=$(now)

TARBALL=$OUT/$NAME.tar.gz
say "saving $NAME:latest to $TARBALL"
# Level 1: measured 2.71 GB in ~1 min against 2.63 GB in 2 min 15 s at gzip's default level 6.
if command -v pigz >/dev/null 2>&1; then GZ=pigz; else GZ=gzip; fi
docker save "$NAME:latest" | "$GZ" -1 -c >"$TARBALL.partial"
mv "$TARBALL.partial" "$TARBALL"
t3=$(now)

IMAGE_BYTES=$(docker image inspect --format '{{.Size}}' "$NAME:latest")
TAR_BYTES=$(wc -c <"$TARBALL" | tr -d ' ')
SHA=$(sha256sum "$TARBALL" | cut -d ' ' -f 1)
echo "$SHA  $NAME.tar.gz" >"$TARBALL.sha256"
mib() { echo $(( ($1 + 524288) / 1048576 )); }
say "done: build $((t1 - t0)) s, squash $((t2 - t1)) s, save $((t3 - t2)) s"
echo "image:   $NAME:latest  $(mib "$IMAGE_BYTES") MiB ($IMAGE_BYTES bytes)"
echo "tarball: $TARBALL  $(mib "$TAR_BYTES") MiB ($TAR_BYTES bytes)"
echo "sha256:  $SHA"
echo "run:     docker container run --gpus \"device=0\" -m 32G --rm -v \$PWD/inputs/:/workspace/inputs/ -v \$PWD/outputs/:/workspace/outputs/ $NAME:latest /bin/bash -c \"sh predict.sh\""
