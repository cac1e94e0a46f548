"""A held-out family of synthetic cases, for evaluation only (never for training).

Independent of the training generator (``scripts/synthetic.py``): other shape primitives, other
intensity models, other random streams. Only the organizer's box rule and the file writer are
shared (``scripts.synthetic.boxes_for_gts`` / ``_atomic_savez``), since they are the harness's,
not the generator's.

Shape primitives (drawn in millimetres, arrays in (z, y, x) order):

- ``superquadric``: a deformed superquadric, ``(|u1/a1|^(2/e2) + |u2/a2|^(2/e2))^(e2/e1) +
  |u3/a3|^(2/e1) < 1`` in a randomly rotated frame, exponents 0.4..1.6 (pinched to boxy), tapered
  and bent along its third axis, its level modulated by a smooth random field;
- ``noise_organ``: the largest connected part of a level set of smoothed Gaussian noise under an
  ellipsoidal envelope (lumpy, lobed organs);
- ``tree``: a thin branching curved tube (radius 0.8-2.5 mm, branches thinner) grown from a random
  point in a direction uniform on the sphere (not mainly along z), turning smoothly, branching at
  30-70 degrees, allowed to leave the volume;
- ``split``: an organ cut into 2-3 classes by the nearest of random seeds inside it (the parts
  touch each other), and ``wall``: an organ and its wall (a shell 2-4 mm thick) as two touching
  classes.

Scenarios (one per case, cycling through ``Knobs.scenarios``):

- ``organs``: 2-3 organs (superquadrics and noise organs);
- ``large``: one organ longer than 128 voxels in-plane (beyond a 32^3 patch at zoom 4) in a
  volume up to ``max_size`` voxels wide, and a small organ;
- ``tubes``: 1-2 branching trees and an organ;
- ``touching``: a split organ (2-3 touching classes), sometimes plus an organ with its wall;
- ``lowcontrast``: 2 organs whose contrast is 0.15x the usual against the same noise;
- ``mixed``: 3-4 classes from every primitive.

Intensity models (``Knobs.modalities``, alternating so that each scenario gets both):

- ``CT``: Hounsfield-like values (air -1000, fat ring -100, soft tissue 40 +- texture, organs
  40 + 20..150 HU either side, trees enhanced 150-300 HU, an unlabelled bone 700 HU), blur,
  Gaussian noise 5-25 HU, then a soft-tissue window (level 30-60, width 350-500) to 0..255;
- ``MR``: arbitrary tissue values, a strong multiplicative bias field (exp of a smooth field, up
  to +-50%), Rician noise, then clipped at the 0.5 / 99.5 percentiles of the non-zero voxels and
  scaled to 0..255 (the organizer's preprocessing).

Every case also gets an anisotropic spacing (in-plane 0.6-1.2 mm, z 1x..``max_anisotropy``x that),
and with probability ``zero_border`` a zero border (outside a circular field of view and/or a zero
slab at one z end; labels are cut there too). Every ``no_box_every``-th case has no ``boxes``.

Layout written (what ``python -m evaluation --images OUT/images --gts OUT/gts`` reads):
``OUT/images/<name>.npz`` with ``imgs`` (uint8), ``spacing`` and ``boxes`` (organizer's rule;
omitted in no-box cases), ``OUT/gts/<name>.npz`` with ``gts`` (uint8) and ``spacing``. Names are
``<CT|MR>_heldout_<scenario>_s<seed>_<index>.npz``. Deterministic in (seed, index, knobs).

    python -m scripts.heldout --out DIR [--n 16] [--seed 20251] [--max-size 160] [--scenarios ...]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import List, Optional, Tuple

import cc3d
import numpy as np
from scipy import ndimage

from evaluation.boxes import boxes_for_gts
from scripts.synth_base import _atomic_savez, _object_array

SCENARIOS = ("organs", "large", "tubes", "touching", "lowcontrast", "mixed")
MODALITIES = ("CT", "MR")
DEFAULT_SEED = 20251
STREAM = 0x4E1D  # mixed into every seed: streams apart from scripts/synthetic.py's
MIN_VOXELS = 100  # every class keeps at least this many voxels
LARGE_EXTENT = 128  # a "large" organ spans more voxels than this along y or x


@dataclass(frozen=True)
class Knobs:
    """Named knobs of the family (defaults: the standard held-out set)."""
    scenarios: Tuple[str, ...] = SCENARIOS
    modalities: Tuple[str, ...] = MODALITIES
    max_size: int = 160  # largest axis, voxels (the "large" scenario uses it in-plane)
    noise: float = 1.0  # noise level multiplier
    contrast: float = 1.0  # object contrast multiplier
    max_anisotropy: float = 5.0  # largest z spacing / in-plane spacing
    zero_border: float = 0.35  # probability of a zero border
    no_box_every: int = 4  # every N-th case (index % N == N - 1) has no boxes; 0: never

    def __post_init__(self):
        bad = [s for s in self.scenarios if s not in SCENARIOS] + \
              [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.scenarios or not self.modalities:
            raise ValueError(f"unknown or empty scenarios / modalities: {bad}")
        if self.max_size < 64:
            raise ValueError("max_size must be at least 64")


# --------------------------------------------------------------------------------------------
# fields and frames
# --------------------------------------------------------------------------------------------
def _grid_mm(shape, spacing):
    return [(np.arange(n, dtype=np.float32) * s).reshape([-1 if a == i else 1 for a in range(3)])
            for i, (n, s) in enumerate(zip(shape, spacing))]


def _cubic_matrix(n: int, knots: int) -> np.ndarray:
    """(n, knots) Catmull-Rom interpolation matrix from ``knots`` values spanning 0..n-1 (ends
    clamped) to ``n`` points."""
    pos = np.linspace(0, knots - 1, n)
    base = np.floor(pos).astype(int)
    t = pos - base
    weights = [(-t ** 3 + 2 * t ** 2 - t) / 2, (3 * t ** 3 - 5 * t ** 2 + 2) / 2,
               (-3 * t ** 3 + 4 * t ** 2 + t) / 2, (t ** 3 - t ** 2) / 2]
    m = np.zeros((n, knots), np.float32)
    for off, w in zip((-1, 0, 1, 2), weights):
        np.add.at(m, (np.arange(n), np.clip(base + off, 0, knots - 1)), w)
    return m


def smooth_field(rng, shape, cells: int) -> np.ndarray:
    """Zero-mean, unit-max smooth random field of ``shape``: Gaussian noise on about ``cells``
    knots along the longest axis (proportionally fewer on shorter axes, at least 2), interpolated
    separably with cubic (Catmull-Rom) weights."""
    knots = [max(2, int(round(cells * n / max(shape)))) for n in shape]
    field = rng.normal(size=knots).astype(np.float32)
    mz, my, mx = (_cubic_matrix(n, k) for n, k in zip(shape, knots))
    field = np.einsum("ijk,zi->zjk", field, mz)
    field = np.einsum("zjk,yj->zyk", field, my)
    field = np.einsum("zyk,xk->zyx", field, mx)
    field = field - field.mean()
    m = np.abs(field).max()
    return field / m if m > 0 else field


def random_direction(rng) -> np.ndarray:
    """A unit vector uniform on the sphere (z, y, x)."""
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _frame(rng) -> np.ndarray:
    """Random rotation (columns: the local axes)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q.astype(np.float32)


def _local(grid, centre, rot):
    d = [g - np.float32(c) for g, c in zip(grid, centre)]
    return [d[0] * rot[0, k] + d[1] * rot[1, k] + d[2] * rot[2, k] for k in range(3)]


# --------------------------------------------------------------------------------------------
# shape primitives
# --------------------------------------------------------------------------------------------
def superquadric(rng, grid, shape, centre, radii) -> np.ndarray:
    """Deformed superquadric mask (see module docstring); ``radii`` (3,) in mm."""
    u1, u2, u3 = _local(grid, centre, _frame(rng))
    a1, a2, a3 = (float(r) for r in radii)
    taper = float(rng.uniform(-0.4, 0.4))
    scale = np.clip(1.0 + taper * u3 / a3, 0.3, None)
    u1 = u1 / scale + float(rng.uniform(-0.6, 0.6)) * u3 ** 2 / a3  # taper, then bend
    u2 = u2 / scale
    e1, e2 = (float(v) for v in rng.uniform(0.4, 1.6, size=2))
    with np.errstate(over="ignore"):
        xy = (np.abs(u1 / a1) ** (2 / e2) + np.abs(u2 / a2) ** (2 / e2)) ** (e2 / e1)
        level = xy + np.abs(u3 / a3) ** (2 / e1)
    return level < 1.0 + 0.3 * smooth_field(rng, shape, cells=int(rng.integers(3, 7)))


def noise_organ(rng, grid, shape, spacing, centre, radii) -> np.ndarray:
    """Largest 6-connected part of ``envelope + noise > 0`` (see module docstring)."""
    u = _local(grid, centre, _frame(rng))
    r2 = sum((uk / np.float32(rk)) ** 2 for uk, rk in zip(u, radii))
    sigma = [max(0.35 * min(radii) / s, 1.0) for s in spacing]
    noise = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma)
    noise /= max(float(np.abs(noise).max()), 1e-6)
    mask = (1.0 - r2) + float(rng.uniform(0.5, 0.9)) * noise > 0
    return _largest_part(mask)


def _largest_part(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    labels = cc3d.connected_components(mask.astype(np.uint8), connectivity=6)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def tree(rng, shape, spacing, start, length_mm, radius_mm, max_depth=2) -> np.ndarray:
    """A branching curved tube (see module docstring) as a mask; ``start`` in mm."""
    extent = np.asarray(shape) * np.asarray(spacing)
    step = 0.5 * float(min(spacing))
    levels: List[List[np.ndarray]] = [[] for _ in range(max_depth + 1)]
    stack = [(np.asarray(start, float), random_direction(rng), float(length_mm), 0)]
    while stack:
        pos, direction, length, depth = stack.pop()
        for _ in range(int(length / step)):
            direction = direction + rng.normal(0.0, 0.06, size=3)
            direction /= np.linalg.norm(direction)
            pos = pos + step * direction
            if np.any(pos < -5) or np.any(pos > extent + 5):
                break
            levels[depth].append(pos.copy())
            if depth < max_depth and rng.random() < 0.012:
                turn = np.radians(rng.uniform(30, 70))
                side = np.cross(direction, random_direction(rng))
                side /= np.linalg.norm(side)
                child = np.cos(turn) * direction + np.sin(turn) * side
                stack.append((pos.copy(), child, length * rng.uniform(0.3, 0.6), depth + 1))
    mask = np.zeros(shape, bool)
    for depth, points in enumerate(levels):
        if not points:
            continue
        idx = np.round(np.asarray(points) / np.asarray(spacing)).astype(int)
        idx = idx[np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)]
        if not len(idx):
            continue
        line = np.ones(shape, bool)
        line[tuple(idx.T)] = False
        radius = max(radius_mm * 0.7 ** depth, 0.75 * float(max(spacing[1:])))
        mask |= ndimage.distance_transform_edt(line, sampling=spacing) <= radius
    return mask


def split_by_seeds(rng, mask: np.ndarray, parts: int) -> List[np.ndarray]:
    """``mask`` cut into ``parts`` pieces by the nearest of random seed voxels inside it."""
    coords = np.argwhere(mask)
    seeds = coords[rng.choice(len(coords), size=parts, replace=False)]
    d = np.stack([((coords - s) ** 2).sum(axis=1) for s in seeds])
    owner = np.argmin(d, axis=0)
    out = []
    for p in range(parts):
        m = np.zeros(mask.shape, bool)
        m[tuple(coords[owner == p].T)] = True
        out.append(m)
    return out


def wall(mask: np.ndarray, spacing, thickness_mm: float) -> np.ndarray:
    """The shell of ``thickness_mm`` around ``mask`` (outside it)."""
    dist = ndimage.distance_transform_edt(~mask, sampling=spacing)
    return (dist > 0) & (dist <= thickness_mm)


def touching(a: np.ndarray, b: np.ndarray) -> bool:
    """True when some voxel of ``a`` is a 6-neighbour of a voxel of ``b``."""
    return bool((ndimage.binary_dilation(a) & b).any())


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------
@dataclass
class _Canvas:
    rng: np.random.Generator
    shape: tuple
    spacing: tuple
    grid: list
    fov: np.ndarray  # voxels that keep image data (False: zero border)
    gts: np.ndarray = None
    kinds: list = field(default_factory=list)
    touch: list = field(default_factory=list)  # class pairs that must touch

    @property
    def extent(self):
        return np.asarray(self.shape) * np.asarray(self.spacing)

    def centre(self, margin=0.3):
        """A random point well inside the field of view (mm)."""
        for _ in range(50):
            c = self.rng.uniform(margin, 1 - margin, size=3) * self.extent
            if self.fov[tuple(np.minimum((c / self.spacing).astype(int), np.asarray(self.shape) - 1))]:
                return c
        return 0.5 * self.extent

    def radii(self, lo=0.08, hi=0.18):
        r = self.rng.uniform(lo, hi, size=3) * float(self.extent[1:].min())
        return np.maximum(r, 3.0 * max(self.spacing))

    def add(self, mask: np.ndarray, kind: str, overwrite: bool = False) -> Optional[int]:
        """Give the free (or, with ``overwrite``, all) voxels of ``mask`` inside the field of view a
        new label; None (nothing added) when fewer than MIN_VOXELS remain."""
        keep = mask & self.fov & (True if overwrite else self.gts == 0)
        if keep.sum() < MIN_VOXELS:
            return None
        label = len(self.kinds) + 1
        self.gts[keep] = label
        self.kinds.append(kind)
        return label


def _organ(cv: _Canvas, radii=None, centre=None) -> np.ndarray:
    radii = cv.radii() if radii is None else radii
    centre = cv.centre() if centre is None else centre
    if cv.rng.random() < 0.5:
        return superquadric(cv.rng, cv.grid, cv.shape, centre, radii)
    return noise_organ(cv.rng, cv.grid, cv.shape, cv.spacing, centre, radii)


def _add_organ(cv, kind="organ", tries=20, **kw):
    for _ in range(tries):
        if cv.add(_organ(cv, **kw), kind) is not None:
            return True
    return False


def _add_tree(cv, tries=20):
    for _ in range(tries):
        m = tree(cv.rng, cv.shape, cv.spacing, cv.centre(0.2), float(cv.rng.uniform(0.5, 1.0)) *
                 float(cv.extent.max()), float(cv.rng.uniform(0.8, 2.5)))
        if cv.add(m, "tree") is not None:
            return True
    return False


def _add_split(cv, parts, tries=20):
    for _ in range(tries):
        organ = _organ(cv, radii=cv.radii(0.14, 0.24)) & cv.fov & (cv.gts == 0)
        if organ.sum() < parts * 4 * MIN_VOXELS:
            continue
        pieces = [_largest_part(p) for p in split_by_seeds(cv.rng, organ, parts)]
        if min(p.sum() for p in pieces) < MIN_VOXELS:
            continue
        labels = [cv.add(p, "split") for p in pieces]
        # neighbouring pieces touch; record the pairs that do (at least one per piece)
        cv.touch += [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]
                     if touching(cv.gts == a, cv.gts == b)]
        return True
    return False


def _add_wall(cv, tries=20):
    for _ in range(tries):
        organ = _organ(cv, radii=cv.radii(0.08, 0.14))
        shell = wall(organ, cv.spacing, float(cv.rng.uniform(2.0, 4.0)))
        free = cv.gts == 0
        if (organ & free & cv.fov).sum() < MIN_VOXELS or (shell & free & cv.fov).sum() < MIN_VOXELS:
            continue
        a = cv.add(organ, "lumen")
        b = cv.add(shell, "wall")
        if touching(cv.gts == a, cv.gts == b):
            cv.touch.append((a, b))
        return True
    return False


def _add_large(cv, tries=20):
    """An organ longer than LARGE_EXTENT voxels along y or x."""
    for _ in range(tries):
        r = cv.radii(0.2, 0.3)
        axis = int(cv.rng.integers(1, 3))
        r[0] = max(r[0], 0.47 * cv.extent[axis])  # the long radius, laid along `axis`
        m = superquadric_inplane(cv, r, axis)
        keep = m & cv.fov
        if keep.any():
            ext = np.ptp(np.nonzero(keep)[axis]) + 1
            if ext > LARGE_EXTENT and cv.add(m, "large") is not None:
                return True
    return False


def superquadric_inplane(cv, radii, axis) -> np.ndarray:
    """A superquadric whose long radius ``radii[0]`` lies along array ``axis`` (1 or 2), tilted a
    little, so that it spans most of that axis."""
    rng = cv.rng
    long_dir = np.zeros(3)
    long_dir[axis] = 1.0
    long_dir += rng.normal(0, 0.1, size=3)
    long_dir /= np.linalg.norm(long_dir)
    other = np.cross(long_dir, random_direction(rng))
    other /= np.linalg.norm(other)
    third = np.cross(long_dir, other)
    rot = np.stack([long_dir, other, third], axis=1).astype(np.float32)
    u1, u2, u3 = _local(cv.grid, 0.5 * cv.extent, rot)
    e = float(rng.uniform(0.6, 1.2))
    a1, a2, a3 = (float(r) for r in radii)
    level = np.abs(u1 / a1) ** (2 / e) + np.abs(u2 / a2) ** 2 + np.abs(u3 / a3) ** 2
    return level < 1.0 + 0.2 * smooth_field(rng, cv.shape, cells=4)


def _shape_and_spacing(rng, scenario, knobs: Knobs):
    s_xy = float(rng.uniform(0.6, 1.2))
    ratio = 1.0 if rng.random() < 0.25 else float(rng.uniform(1.5, max(knobs.max_anisotropy, 1.5)))
    s_z = s_xy * ratio
    m = knobs.max_size
    if scenario == "large":
        hw = int(rng.integers(max(LARGE_EXTENT + 16, int(0.9 * m)), m + 1)) if m > LARGE_EXTENT + 16 else m
        d = int(rng.integers(40, 57))
        return (min(d, m), hw, hw), (s_z, s_xy, s_xy)
    hw = int(rng.integers(int(0.55 * m), int(0.75 * m) + 1))
    # z: about the same physical extent as in-plane, within 40..0.75 max_size voxels
    d = int(np.clip(hw * s_xy / s_z * rng.uniform(0.6, 1.0), 40, int(0.75 * m)))
    return (d, hw, hw), (round(s_z, 4), round(s_xy, 4), round(s_xy, 4))


def _field_of_view(rng, shape, want: bool) -> np.ndarray:
    fov = np.ones(shape, bool)
    if not want:
        return fov
    kind = int(rng.integers(0, 3))  # 0: circle, 1: z slab, 2: both
    if kind in (0, 2):
        yy, xx = np.ogrid[:shape[1], :shape[2]]
        r = 0.5 * min(shape[1:]) * float(rng.uniform(0.85, 0.97))
        circle = (yy - (shape[1] - 1) / 2) ** 2 + (xx - (shape[2] - 1) / 2) ** 2 <= r * r
        fov &= circle[None]
    if kind in (1, 2):
        n = int(rng.integers(2, 9))
        if rng.random() < 0.5:
            fov[:n] = False
        else:
            fov[-n:] = False
    return fov


def generate_case(rng, scenario: str, modality: str, knobs: Knobs = Knobs()) -> dict:
    """Draw one case of ``scenario`` with the ``modality`` intensity model.

    Returns a dict: ``imgs`` (D, H, W) uint8 (0 outside the field of view), ``gts`` (D, H, W)
    uint8 with every label 1..K present (>= MIN_VOXELS voxels), ``spacing`` (3,) float64 (z, y,
    x) mm, ``kinds`` (K str), ``touching`` (label pairs that touch, where the scenario asks for
    it), ``fov`` (bool mask of the voxels with image data), ``scenario``, ``modality``.
    """
    for _attempt in range(10):
        shape, spacing = _shape_and_spacing(rng, scenario, knobs)
        fov = _field_of_view(rng, shape, rng.random() < knobs.zero_border)
        cv = _Canvas(rng, shape, spacing, _grid_mm(shape, spacing), fov, np.zeros(shape, np.uint8))
        if _fill(cv, scenario):
            break
    else:
        raise RuntimeError(f"could not draw a {scenario} case")
    imgs = (_ct if modality == "CT" else _mr)(cv, knobs, scenario)
    imgs[~cv.fov] = 0
    return {"imgs": imgs, "gts": cv.gts, "spacing": np.asarray(spacing, np.float64),
            "kinds": cv.kinds, "touching": cv.touch, "fov": cv.fov, "scenario": scenario,
            "modality": modality}


def _fill(cv: _Canvas, scenario: str) -> bool:
    rng = cv.rng
    if scenario == "organs" or scenario == "lowcontrast":
        n = int(rng.integers(2, 4)) if scenario == "organs" else 2
        return all(_add_organ(cv) for _ in range(n))
    if scenario == "large":
        return _add_large(cv) and _add_organ(cv, radii=cv.radii(0.05, 0.1))
    if scenario == "tubes":
        n = int(rng.integers(1, 3))
        return all(_add_tree(cv) for _ in range(n)) and _add_organ(cv)
    if scenario == "touching":
        ok = _add_split(cv, int(rng.integers(2, 4)))
        if ok and rng.random() < 0.5:
            ok = _add_wall(cv)
        return ok and bool(cv.touch)
    if scenario == "mixed":
        makers = [_add_organ, _add_tree, _add_wall, lambda c: _add_split(c, 2)]
        order = rng.permutation(len(makers))
        k = int(rng.integers(3, 5))
        for i in order:
            if len(cv.kinds) >= k:
                break
            if not makers[i](cv):
                return False
        return len(cv.kinds) >= 3
    raise ValueError(f"unknown scenario {scenario!r}")


# --------------------------------------------------------------------------------------------
# intensity models
# --------------------------------------------------------------------------------------------
def _body(cv: _Canvas) -> np.ndarray:
    """An elliptic body cross-section (y, x) wider than every object, broadcast along z."""
    occupied = np.nonzero(cv.gts)
    e = cv.extent
    cy, cx = 0.5 * e[1], 0.5 * e[2]
    if occupied[0].size:
        ys, xs = occupied[1] * cv.spacing[1], occupied[2] * cv.spacing[2]
        ry = max(float(np.abs(ys - cy).max()) * 1.15, 0.42 * e[1])
        rx = max(float(np.abs(xs - cx).max()) * 1.15, 0.42 * e[2])
    else:
        ry, rx = 0.45 * e[1], 0.45 * e[2]
    return (((cv.grid[1] - cy) / ry) ** 2 + ((cv.grid[2] - cx) / rx) ** 2 < 1.0) & np.ones(cv.shape, bool)


def _object_delta(rng, scale, lo, hi, knobs: Knobs) -> float:
    return float(rng.choice([-1.0, 1.0])) * float(rng.uniform(lo, hi)) * scale * knobs.contrast


def _ct(cv: _Canvas, knobs: Knobs, scenario: str) -> np.ndarray:
    rng = cv.rng
    body = _body(cv)
    inner = ndimage.binary_erosion(body, iterations=max(2, int(6 / cv.spacing[1])))
    hu = np.full(cv.shape, -1000.0, np.float32)
    hu[body] = -100.0  # fat ring
    hu[inner] = 40.0
    hu += (15.0 * smooth_field(rng, cv.shape, cells=8)) * inner
    bone = superquadric(rng, cv.grid, cv.shape, cv.centre(0.25), cv.radii(0.03, 0.06)) & inner & (cv.gts == 0)
    hu[bone] = 700.0
    scale = 0.15 if scenario == "lowcontrast" else 1.0
    for label, kind in enumerate(cv.kinds, start=1):
        m = cv.gts == label
        if kind == "tree":
            level = 40.0 + float(rng.uniform(150, 300)) * knobs.contrast
        else:
            level = 40.0 + _object_delta(rng, scale, 20, 150, knobs)
        hu[m] = level + 10.0 * smooth_field(rng, cv.shape, cells=6)[m]
    hu = ndimage.gaussian_filter(hu, sigma=[0.6 / s for s in cv.spacing])
    hu += rng.normal(0.0, float(rng.uniform(5, 25)) * knobs.noise, size=cv.shape).astype(np.float32)
    level, width = float(rng.uniform(30, 60)), float(rng.uniform(350, 500))
    img = (hu - (level - width / 2)) / width * 255.0
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _mr(cv: _Canvas, knobs: Knobs, scenario: str) -> np.ndarray:
    rng = cv.rng
    body = _body(cv)
    sig = np.zeros(cv.shape, np.float32)
    sig[body] = 0.4
    sig += 0.04 * smooth_field(rng, cv.shape, cells=8) * body
    scale = 0.15 if scenario == "lowcontrast" else 1.0
    for label, kind in enumerate(cv.kinds, start=1):
        m = cv.gts == label
        delta = (float(rng.uniform(0.2, 0.45)) * knobs.contrast if kind == "tree"
                 else _object_delta(rng, scale, 0.1, 0.35, knobs))
        sig[m] = max(0.4 + delta, 0.03) + 0.03 * smooth_field(rng, cv.shape, cells=6)[m]
    sig *= np.exp(float(rng.uniform(0.2, 0.4)) * smooth_field(rng, cv.shape, cells=3))  # bias field
    sig = ndimage.gaussian_filter(sig, sigma=[0.5 / s for s in cv.spacing])
    sigma = float(rng.uniform(0.015, 0.05)) * knobs.noise
    n1 = rng.normal(0.0, sigma, size=cv.shape).astype(np.float32)
    n2 = rng.normal(0.0, sigma, size=cv.shape).astype(np.float32)
    mag = np.sqrt((sig + n1) ** 2 + n2 ** 2)  # Rician
    inside = mag[cv.fov]
    lo, hi = np.percentile(inside[inside > 0], [0.5, 99.5])
    img = (np.clip(mag, lo, hi) - lo) / max(hi - lo, 1e-6) * 255.0
    return np.round(img).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# the set
# --------------------------------------------------------------------------------------------
def case_plan(i: int, knobs: Knobs) -> Tuple[str, str, bool]:
    """(scenario, modality, has_boxes) of case ``i``: scenarios cycle; modalities alternate with a
    shift per cycle, so each scenario meets each modality; every ``no_box_every``-th has no boxes."""
    n = len(knobs.scenarios)
    scenario = knobs.scenarios[i % n]
    modality = knobs.modalities[(i + i // n) % len(knobs.modalities)]
    boxes = not (knobs.no_box_every and i % knobs.no_box_every == knobs.no_box_every - 1)
    return scenario, modality, boxes


def case_name(i: int, seed: int, knobs: Knobs) -> str:
    scenario, modality, _ = case_plan(i, knobs)
    return f"{modality}_heldout_{scenario}_s{seed}_{i:03d}.npz"


def make_case(i: int, seed: int = DEFAULT_SEED, knobs: Knobs = Knobs()) -> dict:
    """Case ``i`` of the set: :func:`generate_case` output plus ``boxes`` (None for a no-box case)
    and ``name``."""
    scenario, modality, has_boxes = case_plan(i, knobs)
    rng = np.random.default_rng([STREAM, seed, i])
    case = generate_case(rng, scenario, modality, knobs)
    case["boxes"] = boxes_for_gts(case["gts"], rng) if has_boxes else None
    case["name"] = case_name(i, seed, knobs)
    return case


def write_set(out, n: int, seed: int = DEFAULT_SEED, knobs: Knobs = Knobs()) -> List[str]:
    """Write ``n`` cases to ``out/images`` and ``out/gts``; returns the file names."""
    out = Path(out)
    names = []
    for i in range(n):
        c = make_case(i, seed, knobs)
        arrays = {"imgs": c["imgs"], "spacing": c["spacing"]}
        if c["boxes"] is not None:
            arrays["boxes"] = _object_array(c["boxes"])
        _atomic_savez(out / "images" / c["name"], **arrays)
        _atomic_savez(out / "gts" / c["name"], gts=c["gts"], spacing=c["spacing"])
        names.append(c["name"])
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.heldout", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (images/ and gts/ inside)")
    p.add_argument("--n", type=int, default=16, help="number of cases (default 16)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"default {DEFAULT_SEED}")
    d = Knobs()
    p.add_argument("--scenarios", default=",".join(d.scenarios), help="comma-separated, cycled")
    p.add_argument("--modalities", default=",".join(d.modalities), help="CT, MR or both")
    p.add_argument("--max-size", type=int, default=d.max_size, help="largest axis in voxels")
    p.add_argument("--noise", type=float, default=d.noise, help="noise multiplier")
    p.add_argument("--contrast", type=float, default=d.contrast, help="object contrast multiplier")
    p.add_argument("--max-anisotropy", type=float, default=d.max_anisotropy,
                   help="largest ratio of z spacing to in-plane spacing")
    p.add_argument("--zero-border", type=float, default=d.zero_border, help="probability")
    p.add_argument("--no-box-every", type=int, default=d.no_box_every, help="0: every case has boxes")
    a = p.parse_args(argv)
    try:
        knobs = Knobs(scenarios=tuple(a.scenarios.split(",")), modalities=tuple(a.modalities.split(",")),
                      max_size=a.max_size, noise=a.noise, contrast=a.contrast,
                      max_anisotropy=a.max_anisotropy, zero_border=a.zero_border,
                      no_box_every=a.no_box_every)
    except ValueError as exc:
        p.error(str(exc))
    names = write_set(a.out, a.n, a.seed, knobs)
    print(f"wrote {len(names)} held-out cases to {a.out}/images and {a.out}/gts "
          f"(seed {a.seed}; {', '.join(f'{f.name}={getattr(knobs, f.name)}' for f in fields(knobs))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
