"""Synthetic cases in the organizer's input layout, for the benchmarks (``scripts/bench.py``,
``scripts/memory_bench.py``): timing and memory only, no ground truth, not for training.

``make_case(path, shape, k, stage)`` writes one ``.npz``:

- ``imgs``: (D, H, W) uint8, noise 0..39 with K spheres of constant brightness (100..249). The
  noise is drawn slice by slice, so a CT-sized case (300 x 512 x 512) needs no full-size float or
  int64 temporaries in the writing process; each sphere is drawn inside its own bounding box.
- ``spacing``: (3,) float64, 1 mm.
- ``boxes``: object array of K organizer-style dicts (``z_min``, ``z_max``, ``z_mid``,
  ``z_mid_y_min``, ``z_mid_y_max``, ``z_mid_x_min``, ``z_mid_x_max``; inclusive voxel indices) that
  enclose each sphere.
- ``stage="click"`` adds ``prev_pred`` (uint8, each sphere shrunk to 0.8 of its radius, as a
  previous prediction that is slightly too small), ``clicks`` (one foreground click at the
  sphere's centre and one background click at a corner of its box, outside the sphere) and
  ``clicks_order`` (``["fg", "bg"]`` per class).

Sphere radius ``max(2, min(shape) // (4 + K))``; centres at least a radius from every face.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _objects(items: list) -> np.ndarray:
    """A 1-D object array of ``items`` (dicts or lists), as the organizer's files hold them."""
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def make_case(path, shape, k: int, stage: str = "box", seed: int = 0) -> Path:
    """Write a synthetic case with ``k`` classes to ``path`` (see the module docstring); returns
    ``path``. ``stage``: "box" or "click"."""
    if stage not in ("box", "click"):
        raise ValueError(f"stage must be 'box' or 'click', not {stage!r}")
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    imgs = np.empty(shape, np.uint8)
    for z in range(shape[0]):
        imgs[z] = rng.integers(0, 40, size=shape[1:], dtype=np.uint8)
    prev = np.zeros(shape, np.uint8) if stage == "click" else None
    r = max(2, min(shape) // (4 + k))
    boxes, clicks, order = [], [], []
    for c in range(1, k + 1):
        center = [int(rng.integers(min(r, s - 1), max(s - r, min(r, s - 1) + 1))) for s in shape]
        lo = [max(ci - r, 0) for ci in center]
        hi = [min(ci + r, s - 1) for ci, s in zip(center, shape)]
        sl = tuple(slice(l, h + 1) for l, h in zip(lo, hi))
        grids = np.ogrid[sl]
        d2 = sum((g - ci) ** 2 for g, ci in zip(grids, center))
        imgs[sl][d2 <= r * r] = 100 + (c * 37) % 150
        if prev is not None:
            prev[sl][d2 <= (0.8 * r) ** 2] = c
        boxes.append({"z_min": lo[0], "z_max": hi[0], "z_mid": center[0], "z_mid_y_min": lo[1],
                      "z_mid_y_max": hi[1], "z_mid_x_min": lo[2], "z_mid_x_max": hi[2]})
        clicks.append({"fg": [list(center)], "bg": [list(lo)]})
        order.append(["fg", "bg"])
    members = {"imgs": imgs, "spacing": np.array([1.0, 1.0, 1.0]), "boxes": _objects(boxes)}
    if prev is not None:
        members.update(prev_pred=prev, clicks=_objects(clicks), clicks_order=_objects(order))
    np.savez(path, **members)
    return Path(path)
