"""Golden outputs: a sha256 per predicted array, to prove a refactor changes no output bit.

Runs the predictor on the CPU with the demo weights (``weights/demo``) over

- the three cases of ``sample_inputs/`` (their box stage when they have ``boxes``, then click
  stages built by the evaluation harness's click rule, ``evaluation.clicks.simulate_round``,
  against ``sample_inputs/gts``);
- a small fixed subset of the held-out family (``scripts.heldout.make_case``, indices
  ``HELDOUT``, at most ``HELDOUT_SIZE`` voxels per axis);

once per policy in ``POLICIES`` (every preset of ``infer.policy.PRESETS``, the demo card's own
policy and a few variants that reach the remaining branches). Each stage's input is written the
way the harness writes it (``evaluation.runner.write_stage_input``) and read back with the
predictor's own reader, and each stage's output feeds the next stage's clicks. The hashes are of
CPU float32 results of one torch version (stored in the JSON): another version or another
device may round differently.

    python -m scripts.golden record [--out tests/golden/outputs.json]
    python -m scripts.golden check  [--out tests/golden/outputs.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch

from evaluation.clicks import ClickState, class_labels, simulate_round
from evaluation.runner import write_stage_input
from infer.npz import read_case
from infer.policy import PRESETS
from infer.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights" / "demo"
SAMPLES = ROOT / "sample_inputs"
GOLDEN = ROOT / "tests" / "golden" / "outputs.json"
THREADS = 1  # one thread: the same reduction order on every machine with this torch
N_CLICKS = 2  # click stages per case (the harness runs 5; 2 reach every branch at a third of the cost)
HELDOUT = (2, 3, 5)  # tubes, touching (no boxes), mixed; several have a zero border
HELDOUT_SIZE = 64
POLICIES = tuple(sorted(PRESETS)) + (
    "card",  # the demo card's own policy (mirroring, classes merged by probability on the reference loop)
    "project,mirror=on,mirror_axes=z,max_refine_patches=2",
    "reference,crop_nonzero=off,keep_lost=on,zoom_value=scale",
    "release,mirror_last=on,last_click=2,mirror_axes=yx",  # gated mirroring at the 2nd click stage
)


def cases(tmp: Path) -> List[Tuple[str, Path, np.ndarray]]:
    """``(name, image file, gts)`` for every golden case; held-out cases are written to ``tmp``."""
    out = []
    for path in sorted(SAMPLES.glob("*.npz")):
        with np.load(SAMPLES / "gts" / path.name, allow_pickle=False) as f:
            out.append((path.name, path, f["gts"]))
    from scripts.heldout import Knobs, make_case
    knobs = Knobs(max_size=HELDOUT_SIZE)
    for i in HELDOUT:
        name = write_set_one(tmp, i, knobs, make_case)
        with np.load(tmp / "gts" / name, allow_pickle=False) as f:
            out.append((name, tmp / "images" / name, f["gts"]))
    return out


def write_set_one(tmp: Path, i: int, knobs, make_case) -> str:
    """Write held-out case ``i`` as ``scripts.heldout.write_set`` writes it; returns its name."""
    from scripts.synth_base import _atomic_savez, _object_array
    c = make_case(i, knobs=knobs)
    arrays = {"imgs": c["imgs"], "spacing": c["spacing"]}
    if c["boxes"] is not None:
        arrays["boxes"] = _object_array(c["boxes"])
    _atomic_savez(tmp / "images" / c["name"], **arrays)
    _atomic_savez(tmp / "gts" / c["name"], gts=c["gts"], spacing=c["spacing"])
    return c["name"]


def _plain(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in ("imgs", "spacing") if k in f.files}, "boxes" in f.files


def stages(predictor: Predictor, path: Path, gts: np.ndarray, tmp: Path) -> Iterator[Tuple[int, np.ndarray]]:
    """``(stage number, segs)`` for every stage of one case (1 = box stage), as the harness chains them (box stage when the case
    has boxes, then ``N_CLICKS`` click stages)."""
    import zipfile
    plain, has_boxes = _plain(path)
    boxes_npy = zipfile.ZipFile(path).read("boxes.npy") if has_boxes else None
    labels = class_labels(gts)
    state, prev = ClickState.empty(len(labels)), None
    stage_in = tmp / path.name
    for k in range(1 + N_CLICKS):
        if k == 0:
            if not has_boxes:
                continue
            write_stage_input(stage_in, plain["imgs"], plain["spacing"], None, boxes_npy=boxes_npy)
        else:
            segs_u8 = np.zeros(gts.shape, np.uint8) if prev is None else prev.astype(np.uint8)
            simulate_round(segs_u8, gts, state, labels)
            write_stage_input(stage_in, plain["imgs"], plain["spacing"], state, prev_pred=segs_u8,
                              boxes_npy=boxes_npy)
        prev = predictor.predict(read_case(stage_in))
        yield k + 1, prev


def digest(arr: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def compute() -> Dict[str, str]:
    """``{"<policy>/<case>/stage<n>": sha256}`` over every policy, case and stage (n = 1: box stage)."""
    torch.set_num_threads(THREADS)
    out: Dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        work = tmp / "stage"
        work.mkdir()
        all_cases = cases(tmp)
        for pol in POLICIES:
            predictor = Predictor.from_path(WEIGHTS, device="cpu", policy=None if pol == "card" else pol)
            for name, path, gts in all_cases:
                for i, segs in stages(predictor, path, gts, work):
                    out[f"{pol}/{name}/stage{i}"] = digest(segs)
    return out


def header() -> dict:
    return {"torch": torch.__version__, "numpy": np.__version__, "device": "cpu", "threads": THREADS,
            "note": "sha256 of CPU float32 predictions from this torch version (dtype, shape, bytes "
                    "of each stage's segs); another torch version or device may round differently"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.golden", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("record", "check"),
                   help="record: write the hashes; check: recompute and compare (exit 1 on a difference)")
    p.add_argument("--out", type=Path, default=GOLDEN, help=f"the JSON file (default {GOLDEN.relative_to(ROOT)})")
    a = p.parse_args(argv)
    hashes = compute()
    if a.command == "record":
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"meta": header(), "outputs": hashes}, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(hashes)} output hashes in {a.out}")
        return 0
    stored = json.loads(a.out.read_text())
    want = stored["outputs"]
    bad = sorted(k for k in set(want) | set(hashes) if want.get(k) != hashes.get(k))
    for k in bad:
        print(f"differs: {k}")
    print(f"{len(hashes) - len(bad)}/{len(set(want) | set(hashes))} outputs identical"
          f" (recorded with torch {stored['meta']['torch']}, now {torch.__version__})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
