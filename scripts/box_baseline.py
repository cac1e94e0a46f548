"""The box-filling baseline: Dice of simply filling each class's box, against the ground truth.

    python -m scripts.box_baseline --images DIR --gts DIR [--csv OUT.csv]

What a model's box stage has to beat. For each case with ``boxes`` and each class k, the box is
filled as a 3D block: slices ``z_min..z_max`` (inclusive) by the 2D box of slice ``z_mid``
(``z_mid_y_min..z_mid_y_max`` x ``z_mid_x_min..z_mid_x_max``, inclusive) -- the 3D box the
reference baseline feeds nnInteractive; ``DSC_box2d`` fills only the 2D box on slice ``z_mid``.
Dice is ``evaluation.metrics.dice`` per class; a case's score is the mean over the classes present
in ``gts``, as the organizer averages a stage. Cases without ``boxes`` are listed and skipped.
Prints one line per case and the mean; ``--csv`` writes ``CaseName, num_class, DSC_box3d,
DSC_box2d`` per case.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from evaluation.metrics import dice
from infer.npz import read_case


def fill_box(shape, box: dict, three_d: bool = True) -> np.ndarray:
    """(D, H, W) bool: the box's block (``three_d``) or its 2D box on slice ``z_mid`` alone."""
    out = np.zeros(shape, bool)
    z0, z1 = (box["z_min"], box["z_max"]) if three_d else (box["z_mid"], box["z_mid"])
    out[z0:z1 + 1, box["z_mid_y_min"]:box["z_mid_y_max"] + 1, box["z_mid_x_min"]:box["z_mid_x_max"] + 1] = True
    return out


def case_scores(boxes: List[dict], gts: np.ndarray) -> Optional[tuple]:
    """(mean Dice of the 3D boxes, of the 2D boxes) over the classes present in ``gts``."""
    d3, d2 = [], []
    for k, box in enumerate(boxes, start=1):
        truth = gts == k
        if not truth.any():
            continue
        d3.append(dice(truth, fill_box(gts.shape, box, True)))
        d2.append(dice(truth, fill_box(gts.shape, box, False)))
    return (float(np.mean(d3)), float(np.mean(d2))) if d3 else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.box_baseline", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, type=Path, help="folder of case .npz files (with boxes)")
    p.add_argument("--gts", required=True, type=Path, help="folder of the same names holding gts")
    p.add_argument("--csv", type=Path, help="write the per-case scores here")
    a = p.parse_args(argv)
    rows = []
    for image in sorted(a.images.glob("*.npz")):
        boxes = read_case(image, keys=("boxes",))["boxes"]
        if boxes is None:
            print(f"{image.name}: no boxes: skipped")
            continue
        with np.load(a.gts / image.name, allow_pickle=False) as f:
            gts = f["gts"]
        scores = case_scores(boxes, gts)
        if scores is None:
            continue
        rows.append({"CaseName": image.name, "num_class": len(boxes), "DSC_box3d": scores[0],
                     "DSC_box2d": scores[1]})
        print(f"{image.name}: box filled as 3D block DSC {scores[0]:.4f}, 2D box on z_mid only {scores[1]:.4f}")
    if not rows:
        print("no case with boxes", file=sys.stderr)
        return 1
    print(f"mean over {len(rows)} box cases: 3D block {np.mean([r['DSC_box3d'] for r in rows]):.4f}, "
          f"2D box {np.mean([r['DSC_box2d'] for r in rows]):.4f}")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
