#!/bin/sh
# Smoke test: run predict.sh on sample_inputs/ into a temporary folder and check every output:
# present, key `segs` only, shape of `imgs`, dtype uint8 (uint16 when K > 255), labels within 0..K.
#   usage: sh tests/smoke.sh [WEIGHTS_DIR]     (PYTHON names the interpreter; default .venv's)
set -eu
case "${1:-}" in
    -h|--help) sed -n '2,4s/^# \{0,1\}//p' "$0"; exit 0 ;;
esac
root=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)
weights=${1:-$root/weights/demo}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$root/.venv/bin/python" ]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT INT TERM
sh "$root/predict.sh" --inputs "$root/sample_inputs" --outputs "$out" --weights "$weights" --device cpu
PYTHONPATH="$root" "$PYTHON" - "$root/sample_inputs" "$out" <<'PY'
import os, sys
import numpy as np
from infer.npz import read_case
from infer.case import num_classes

inputs, outputs = sys.argv[1], sys.argv[2]
names = sorted(n for n in os.listdir(inputs) if n.endswith(".npz"))
assert names, f"no sample cases in {inputs}"
bad = []
for n in names:
    case = read_case(os.path.join(inputs, n))
    k = num_classes(case)
    path = os.path.join(outputs, n)
    if not os.path.exists(path):
        bad.append(f"{n}: no output"); continue
    with np.load(path, allow_pickle=False) as f:
        keys = list(f.keys())
        segs = f["segs"] if "segs" in keys else None
    want = np.uint8 if k <= 255 else np.uint16
    if keys != ["segs"]:
        bad.append(f"{n}: keys {keys}")
    elif segs.shape != case["imgs"].shape:
        bad.append(f"{n}: shape {segs.shape} != {case['imgs'].shape}")
    elif segs.dtype != want:
        bad.append(f"{n}: dtype {segs.dtype} != {np.dtype(want)}")
    elif segs.size and int(segs.max()) > k:
        bad.append(f"{n}: label {int(segs.max())} > K={k}")
    else:
        print(f"smoke: {n}: ok (K={k}, labels {sorted(np.unique(segs).tolist())})")
if bad:
    print("smoke: FAILED\n  " + "\n  ".join(bad)); sys.exit(1)
print(f"smoke: {len(names)} case(s) ok")
PY
