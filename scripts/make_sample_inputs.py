"""Write ``sample_inputs/``: three small synthetic cases in the harness's input layout.

- ``CT_sample_box.npz``: a box-stage input (``imgs``, ``spacing``, ``boxes``), 3 classes;
- ``CT_sample_clicks.npz``: the input of click stage 3 (``imgs``, ``spacing``, ``clicks``,
  ``clicks_order``, ``prev_pred``, ``boxes``), 2 classes. Its clicks come from
  ``evaluation.clicks.simulate_round`` run on two deliberately imperfect predictions: in round 1
  class 1 is eroded and class 2 shifted; in round 2 class 1 is perfect (so its ``clicks_order``
  ends with ``None``) and class 2 is still shifted. ``prev_pred`` is the round-2 prediction;
- ``CT_sample_nobox.npz``: the first click stage of a case without boxes (``imgs``, ``spacing``,
  ``clicks``, ``clicks_order``, ``prev_pred`` all zeros), 2 classes.

Stage files are written by ``evaluation.runner.write_stage_input`` (the organizer's key order and
``np.savez_compressed``), boxes by the organizer's rule (``scripts.synthetic.boxes_for_gts``).
Ground truth goes to ``sample_inputs/gts/<name>`` (``gts``, ``spacing``), outside the folder the
predictor reads. Volumes are (48, 80, 80); everything is deterministic (fixed seeds).

    python -m scripts.make_sample_inputs [--out sample_inputs]
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from evaluation.clicks import ClickState, simulate_round
from evaluation.runner import write_stage_input
from scripts.synthetic import _atomic_savez, _object_array, boxes_for_gts, generate_case

SEED = 2025
SHAPE = (48, 80, 80)
NAMES = ("CT_sample_box.npz", "CT_sample_clicks.npz", "CT_sample_nobox.npz")


def _boxes_npy(boxes) -> bytes:
    """The ``boxes.npy`` member bytes of an object array of box dicts (as ``np.savez`` stores it)."""
    buf = io.BytesIO()
    np.save(buf, _object_array(boxes))
    return buf.getvalue()


def _imperfect(gts: np.ndarray, perfect: set) -> np.ndarray:
    """A uint8 label map: classes in ``perfect`` copied (drawn last, so nothing overwrites them),
    class 1 otherwise eroded by 2 voxels, every other class shifted by 3 voxels along x."""
    pred = np.zeros_like(gts, dtype=np.uint8)
    labels = range(1, int(gts.max()) + 1)
    for k in sorted(labels, key=lambda k: k in perfect):
        m = gts == k
        if k in perfect:
            pred[m] = k
        elif k == 1:
            pred[ndimage.binary_erosion(m, iterations=2)] = k
        else:
            pred[np.roll(m, 3, axis=2)] = k
    return pred


def make(out) -> list[Path]:
    out = Path(out)
    gdir = out / "gts"
    written = []

    # 1. box stage, 3 classes
    c = generate_case(np.random.default_rng([SEED, 0]), shape=SHAPE, n_classes=3,
                      kinds=["blob", "border", "ellipsoid"])
    boxes = boxes_for_gts(c["gts"], np.random.default_rng([SEED, 0, 1]))
    _atomic_savez(out / NAMES[0], imgs=c["imgs"], spacing=c["spacing"], boxes=_object_array(boxes))
    _atomic_savez(gdir / NAMES[0], gts=c["gts"], spacing=c["spacing"])
    written.append(out / NAMES[0])

    # 2. click stage 3 with a None: class 1 already perfect in round 2
    c = generate_case(np.random.default_rng([SEED, 1]), shape=SHAPE, n_classes=2,
                      kinds=["blob", "ellipsoid"])
    gts = c["gts"]
    boxes = boxes_for_gts(gts, np.random.default_rng([SEED, 1, 1]))
    state = ClickState.empty(2)
    simulate_round(_imperfect(gts, set()), gts, state)
    prev = _imperfect(gts, {1})
    simulate_round(prev, gts, state)
    assert state.clicks_order[0][-1] is None and state.clicks_order[1][-1] is not None
    path = out / NAMES[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_stage_input(path, c["imgs"], c["spacing"], state, prev_pred=prev,
                      boxes_npy=_boxes_npy(boxes))
    _atomic_savez(gdir / NAMES[1], gts=gts, spacing=c["spacing"])
    written.append(path)

    # 3. no boxes: first click stage, from an all-zero previous output
    c = generate_case(np.random.default_rng([SEED, 2]), shape=SHAPE, n_classes=2,
                      kinds=["blob", "tube"])
    gts = c["gts"]
    state = ClickState.empty(2)
    zeros = np.zeros(gts.shape, dtype=np.uint8)
    simulate_round(zeros, gts, state)
    write_stage_input(out / NAMES[2], c["imgs"], c["spacing"], state, prev_pred=zeros)
    _atomic_savez(gdir / NAMES[2], gts=gts, spacing=c["spacing"])
    written.append(out / NAMES[2])
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.make_sample_inputs",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "sample_inputs"),
                    help="folder for the cases (ground truth goes to OUT/gts/) (default: %(default)s)")
    a = ap.parse_args(argv)
    for p in make(a.out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
