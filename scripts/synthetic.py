"""Synthetic CT-like volumes in the organizer's layouts, for training and testing the demo model.

Each case is a (D, H, W) uint8 image (0..255, like the organizer's preprocessed data) with a label
map ``gts`` holding classes 1..K (K = 2..4 by default), one object per class, drawn from:

- ``ellipsoid``: a rotated ellipsoid;
- ``blob``: an ellipsoid whose radius is modulated by smooth noise (irregular outline);
- ``tube``: a thin, gently bent tube (radius 1.2-3 mm) running mainly along z, often out of the
  volume;
- ``border``: an ellipsoid or blob centred on a face of the volume, so that the volume cuts it.

Objects are drawn in millimetres on an anisotropic grid (z spacing 1.5x..5x the in-plane spacing),
inside a soft-tissue "body" (an elliptic cylinder along z) over air, with unlabelled distractor
blobs, per-object contrast and texture, a smooth bias field, blur and Gaussian noise.

Layouts written (same as the organizer's data):

- training (``--layout train``): ``OUT/<name>.npz`` with ``imgs``, ``gts``, ``spacing``;
- validation (``--layout val``): ``OUT/images/<name>.npz`` with ``imgs``, ``spacing`` and
  ``boxes`` (omitted for a no-box case), and ``OUT/gts/<name>.npz`` with ``gts``, ``spacing``.

Boxes follow the organizer's ``get_boxes.py``: per class, ``z_min``/``z_max`` = the class's full z
extent (inclusive); ``z_mid`` = the z index of the middle voxel of the class in C order
(``np.where(mask)[0][n // 2]``); the 2D box of the class on slice ``z_mid``, inclusive, widened on
each side by ``int(s * H / 256)`` along y and ``int(s * W / 256)`` along x with ``s`` drawn
uniformly from 0..5 per class, clipped to the image.

Everything is deterministic in ``(seed, case index)``.

``--family varied`` writes the varied training family of ``scripts/varied.py`` instead (more
shapes, touching classes, five intensity models; its knobs are flags of the same command).

    python -m scripts.synthetic --out DIR --n 40 --seed 0 [--layout train|val] [--shape 64 96 96]
    python -m scripts.synthetic --family varied --out DIR --n 500 --seed 1 [--noise 1.5 ...]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from scipy import ndimage

from evaluation.boxes import box_for_mask, boxes_for_gts  # noqa: F401 (re-exported)
from scripts.synth_base import _atomic_savez, _grid_mm, _object_array, _smooth_noise  # noqa: F401

KINDS = ("ellipsoid", "blob", "tube", "border")
MIN_VOXELS = 60  # every class keeps at least this many voxels


# --------------------------------------------------------------------------------------------
# geometry helpers (all in millimetres, arrays in (z, y, x) order)
# --------------------------------------------------------------------------------------------
def _random_rotation(rng):
    """A uniformly random 3x3 rotation matrix."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.astype(np.float32)


def _ellipsoid_level(grid, centre, radii, rot):
    """Normalised radius ((x-c)^T R diag(1/r^2) R^T (x-c))^(1/2): < 1 inside the ellipsoid."""
    d = [g - c for g, c in zip(grid, centre)]
    acc = 0.0
    for k in range(3):
        u = d[0] * rot[0, k] + d[1] * rot[1, k] + d[2] * rot[2, k]
        acc = acc + (u / radii[k]) ** 2
    return np.sqrt(acc)


def _ellipsoid(rng, grid, shape, spacing, centre, extent, irregular):
    radii = rng.uniform(0.09, 0.2, size=3) * extent.min()
    radii = np.maximum(radii, 2.5 * max(spacing))  # at least a few voxels along z
    level = _ellipsoid_level(grid, centre, radii, _random_rotation(rng))
    if irregular:
        return level < 1.0 + 0.35 * _smooth_noise(rng, shape, cells=int(rng.integers(3, 6)))
    return level < 1.0


def _tube(rng, shape, spacing, extent):
    """A thin tube (radius 1.2-3 mm) along a smooth curve running mainly along z (within about 30
    degrees, like the vessels, airways and oesophagus of axial CT), gently bent, over half to all
    of the z extent: EDT (in mm) to its centre line < radius."""
    start = rng.uniform(0.25, 0.75, size=3) * extent
    direction = np.array([1.0, *rng.normal(0.0, 0.35, size=2)])
    direction /= np.linalg.norm(direction)
    perp = np.cross(direction, rng.normal(size=3))
    perp /= np.linalg.norm(perp)
    length = rng.uniform(0.5, 1.1) * extent[0]
    t = np.linspace(-0.5, 0.5, 400)[:, None] * length
    amp, freq, phase = rng.uniform(0.04, 0.12) * length, rng.uniform(0.5, 1.5), rng.uniform(0, 6.3)
    curve = start + t * direction + amp * np.sin(freq * 2 * np.pi * t / length + phase) * perp
    idx = np.round(curve / np.asarray(spacing)).astype(int)
    keep = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
    line = np.ones(shape, dtype=bool)
    if keep.any():
        line[tuple(idx[keep].T)] = False
    dist = ndimage.distance_transform_edt(line, sampling=spacing)
    radius = max(float(rng.uniform(1.2, 3.0)), 1.5 * spacing[1])
    return dist < radius


def _border_centre(rng, extent):
    """A centre on one face of the volume (a random axis at 0 or its far end)."""
    centre = rng.uniform(0.25, 0.75, size=3) * extent
    axis = int(rng.integers(0, 3))
    centre[axis] = extent[axis] * (rng.uniform(-0.03, 0.03) + float(rng.integers(0, 2)))
    return centre


def _draw_object(rng, kind, grid, shape, spacing, extent):
    if kind == "tube":
        return _tube(rng, shape, spacing, extent)
    if kind == "border":
        centre = _border_centre(rng, extent)
        return _ellipsoid(rng, grid, shape, spacing, centre, extent, irregular=bool(rng.integers(0, 2)))
    centre = rng.uniform(0.25, 0.75, size=3) * extent
    return _ellipsoid(rng, grid, shape, spacing, centre, extent, irregular=(kind == "blob"))


def touches_border(mask):
    """True if a boolean (D, H, W) mask has a voxel on any face of the volume."""
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
                or mask[:, :, 0].any() or mask[:, :, -1].any())


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------
def generate_case(rng, shape=(64, 96, 96), n_classes=None, kinds=None):
    """Draw one case.

    Args:
        rng: np.random.Generator.
        shape: (D, H, W) of the volume.
        n_classes: number of classes K (default: 2..4 at random).
        kinds: optional list of K kinds from KINDS (default: random, at least one "border"
            object in about half of the cases).

    Returns:
        dict with ``imgs`` (D, H, W) uint8, ``gts`` (D, H, W) uint8 with labels 1..K all present,
        ``spacing`` (3,) float64 (z, y, x) in mm, and ``kinds`` (list of K str).
    """
    shape = tuple(int(n) for n in shape)
    K = int(n_classes) if n_classes is not None else int(rng.integers(2, 5))
    if kinds is None:
        kinds = [str(k) for k in rng.choice(["ellipsoid", "blob", "blob", "tube", "border"], size=K)]
        if "border" not in kinds and rng.random() < 0.5:
            kinds[int(rng.integers(0, K))] = "border"
    assert len(kinds) == K and all(k in KINDS for k in kinds), kinds

    s_xy = float(rng.uniform(0.6, 1.0))
    s_z = max(1.5 * s_xy, s_xy * shape[1] / shape[0] * float(rng.uniform(0.8, 1.4)))
    s_z = min(s_z, 5.0 * s_xy)
    spacing = (round(s_z, 4), round(s_xy, 4), round(s_xy, 4))
    extent = np.array(shape, dtype=np.float32) * np.array(spacing, dtype=np.float32)
    grid = _grid_mm(shape, spacing)

    gts = np.zeros(shape, dtype=np.uint8)
    for label, kind in enumerate(kinds, start=1):
        for _attempt in range(20):
            mask = _draw_object(rng, kind, grid, shape, spacing, extent)
            if kind == "border" and not touches_border(mask):
                continue
            # objects overwrite earlier ones only where they do not erase them
            free = mask & (gts == 0)
            if free.sum() >= MIN_VOXELS:
                gts[free] = label
                break
        else:
            raise RuntimeError(f"could not place a {kind} object")

    # intensities: air, body, distractors, objects (contrast >= 35 grey levels vs the body)
    body_level = float(rng.uniform(90, 120))
    cy, cx = extent[1] * rng.uniform(0.45, 0.55), extent[2] * rng.uniform(0.45, 0.55)
    ry, rx = extent[1] * rng.uniform(0.42, 0.6), extent[2] * rng.uniform(0.42, 0.6)
    body = ((grid[1] - cy) / ry) ** 2 + ((grid[2] - cx) / rx) ** 2 < 1.0
    img = np.where(body, body_level, float(rng.uniform(0, 10))).astype(np.float32)
    img = np.broadcast_to(img, shape).copy()
    img += 8.0 * _smooth_noise(rng, shape, cells=6) * body

    def contrast_level():
        sign = 1.0 if rng.random() < 0.6 else -1.0
        return float(np.clip(body_level + sign * rng.uniform(35, 110), 15, 245))

    for _ in range(int(rng.integers(1, 4))):  # unlabelled distractors, drawn under the objects
        d = _ellipsoid(rng, grid, shape, spacing, rng.uniform(0.1, 0.9, size=3) * extent, extent,
                       irregular=True)
        img[d & (gts == 0)] = contrast_level()
    for label in range(1, K + 1):
        m = gts == label
        texture = 6.0 * _smooth_noise(rng, shape, cells=5)
        img[m] = contrast_level() + texture[m]

    img *= 1.0 + 0.1 * _smooth_noise(rng, shape, cells=3)  # bias field
    img = ndimage.gaussian_filter(img, sigma=(0.4, 0.7, 0.7))  # partial volume
    img += rng.normal(0.0, rng.uniform(4, 12), size=shape).astype(np.float32)
    imgs = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return {"imgs": imgs, "gts": gts, "spacing": np.asarray(spacing, dtype=np.float64),
            "kinds": kinds}


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def case_name(seed, index):
    return f"CT_synth_s{seed}_{index:04d}.npz"


def write_dataset(out, n, seed=0, layout="train", shape=(64, 96, 96), no_box_every=0):
    """Write `n` cases to `out` in the training or validation layout; returns the file names.

    In the validation layout, every `no_box_every`-th case (index % no_box_every ==
    no_box_every - 1; 0 = never) has no ``boxes`` key, like the challenge's no-box cases.
    """
    if layout not in ("train", "val"):
        raise ValueError(f"layout must be 'train' or 'val', not {layout!r}")
    out = Path(out)
    names = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        case = generate_case(rng, shape=shape)
        name = case_name(seed, i)
        if layout == "train":
            _atomic_savez(out / name, imgs=case["imgs"], gts=case["gts"], spacing=case["spacing"])
        else:
            arrays = {"imgs": case["imgs"], "spacing": case["spacing"]}
            if not (no_box_every and i % no_box_every == no_box_every - 1):
                arrays["boxes"] = _object_array(boxes_for_gts(case["gts"], rng))
            _atomic_savez(out / "images" / name, **arrays)
            _atomic_savez(out / "gts" / name, gts=case["gts"], spacing=case["spacing"])
        names.append(name)
    return names


def main(argv=None):
    from scripts import varied  # the varied family builds on this module's helpers

    p = argparse.ArgumentParser(prog="python -m scripts.synthetic", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=20, help="number of cases")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole set (case i is the same for any --n)")
    p.add_argument("--family", choices=("classic", "varied"), default="classic",
                   help="classic: this module's CT-like cases; varied: scripts/varied.py (organs, "
                        "touching and nested classes, large objects, branching trees; CT, MR, PET, "
                        "US, microscopy intensities)")
    p.add_argument("--layout", choices=("train", "val"), default="train",
                   help="train: one npz per case with imgs, gts, spacing; val: images/ (with boxes) and gts/")
    p.add_argument("--shape", type=int, nargs=3, default=(64, 96, 96), metavar=("D", "H", "W"),
                   help="volume shape z y x (varied family: before its size jitter)")
    p.add_argument("--no-box-every", type=int, default=0,
                   help="val layout: every N-th case has no boxes (0 = none)")
    varied.add_knob_arguments(p)
    a = p.parse_args(argv)
    try:
        knobs, given = varied.knobs_from_args(a, a.shape)
    except ValueError as e:
        p.error(str(e))
    t0 = time.perf_counter()
    if a.family == "classic":
        if given:
            p.error(f"--{given[0].replace('_', '-')} is a knob of the varied family (--family varied)")
        names = write_dataset(a.out, a.n, seed=a.seed, layout=a.layout, shape=tuple(a.shape),
                              no_box_every=a.no_box_every)
    else:
        names = varied.write_dataset(a.out, a.n, seed=a.seed, layout=a.layout, knobs=knobs,
                                     no_box_every=a.no_box_every)
    dt = time.perf_counter() - t0
    print(f"wrote {len(names)} {a.family} cases to {a.out} ({a.layout} layout) in {dt:.1f} s "
          f"({len(names) / max(dt, 1e-9):.2f} cases/s)")
    return 0

if __name__ == "__main__":
    sys.exit(main())
