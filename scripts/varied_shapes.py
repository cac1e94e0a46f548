"""Shape primitives of the varied training family (``scripts/varied.py``).

All geometry is in millimetres, arrays in (z, y, x) order; ``coords`` are the three (D, H, W)
float32 arrays of voxel-centre positions, possibly displaced by :func:`warp` (a smooth random
deformation shared by every object of a case).

- :func:`organ_field`: a chain of 2-6 Gaussian "metaballs" along a random direction; the organ is
  ``field > 0.5`` (smooth, lobed, elongated), and higher levels of the same field give nested
  regions (a lumen inside a wall, the core of a lesion);
- :func:`bezier_tree`: a branching structure of cubic Bezier segments (radius tapering along each
  segment, children thinner) in any direction, rendered through one distance transform to its
  centre lines;
- :func:`abut`, :func:`lesion_in`, :func:`nested_levels`: classes that touch (adjacent organs, a
  lesion inside an organ, a wall and its lumen, a lesion's rim and core).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from scripts.synth_base import _smooth_noise


def warp(rng, grid, shape, amp_mm: float, cells: int = 4):
    """``grid`` (open mm grid) displaced by a smooth random field of up to ``amp_mm`` per axis:
    three (D, H, W) float32 arrays."""
    return [(np.broadcast_to(g, shape) + np.float32(amp_mm) * _smooth_noise(rng, shape, cells))
            .astype(np.float32) for g in grid]


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def random_unit(rng):
    return _unit(rng.normal(size=3))


def _box(points_mm, reach_mm, spacing, shape):
    """Slices of the voxels within ``reach_mm`` of the bounding box of ``points_mm`` (N, 3)."""
    lo = np.floor((points_mm.min(0) - reach_mm) / spacing).astype(int)
    hi = np.ceil((points_mm.max(0) + reach_mm) / spacing).astype(int) + 1
    lo, hi = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def organ_field(rng, coords, spacing, centre, size_mm: float, balls=(2, 6), direction=None,
                margin_mm: float = 0.0):
    """Metaball field of one organ, (D, H, W) float32 (0 far away, about 1 at its core); the
    organ is ``field > 0.5``. ``size_mm``: its approximate length along ``direction`` (default:
    random); ``margin_mm``: the largest displacement of ``coords`` (bounds the computed box)."""
    n = int(rng.integers(balls[0], balls[1] + 1))
    d = _unit(direction) if direction is not None else random_unit(rng)
    t = np.linspace(-0.5, 0.5, n)[:, None] if n > 1 else np.zeros((1, 1))
    centres = np.asarray(centre) + t * d * size_mm * 0.7 + rng.normal(0, 0.08 * size_mm, (n, 3))
    radii = size_mm * rng.uniform(0.18, 0.32, size=n)
    shape = coords[0].shape
    field = np.zeros(shape, dtype=np.float32)
    box = _box(centres, 2.2 * radii.max() + margin_mm, np.asarray(spacing), np.asarray(shape))
    if any(s.stop <= s.start for s in box):
        return field
    sub = [c[box] for c in coords]
    acc = np.zeros(sub[0].shape, dtype=np.float32)
    for c, r in zip(centres, radii):
        d2 = (sub[0] - c[0]) ** 2 + (sub[1] - c[1]) ** 2 + (sub[2] - c[2]) ** 2
        acc += np.exp(-d2 / np.float32(r * r))
    field[box] = acc
    return field


def _bezier(p0, p1, p2, p3, n):
    t = np.linspace(0.0, 1.0, n)[:, None]
    return ((1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t ** 2 * p2 + t ** 3 * p3)


def _segment(rng, start, direction, length, step):
    """Cubic Bezier from ``start`` along ``direction`` (mm), bent sideways by up to 30% of
    ``length``: (N, 3) points about ``step`` mm apart."""
    side1, side2 = random_unit(rng), random_unit(rng)
    bend = rng.uniform(0.05, 0.3, size=2) * length
    p1 = start + direction * length / 3 + side1 * bend[0]
    p2 = start + direction * 2 * length / 3 + side2 * bend[1]
    p3 = start + direction * length
    n = max(8, int(np.ceil(1.6 * length / step)))
    return _bezier(start, p1, p2, p3, n)


def bezier_tree(rng, shape, spacing, start, direction, length_mm: float, radius_mm: float,
                depth: int = 2, children=(1, 3)):
    """A branching tubular structure: a root segment from ``start`` along ``direction`` and, on
    each segment up to ``depth`` levels down, 1-3 child segments leaving it at 25-85 degrees from
    a random point of its middle 70%, 0.4-0.7x as long and 0.55-0.8x as thick. The radius tapers
    to 0.7x along each segment.

    Returns (mask (D, H, W) bool, segments): ``segments`` lists ``(points (N, 3) mm, radii (N,)
    mm, parent index or -1)``; the mask is the voxels closer (in mm) to some in-volume centre-line
    point than that point's radius.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    step = 0.5 * float(spacing.min())
    segments = []
    todo = [(np.asarray(start, float), _unit(direction), float(length_mm), float(radius_mm), -1, 0)]
    while todo:
        p0, d, length, r, parent, level = todo.pop(0)
        pts = _segment(rng, p0, d, length, step)
        radii = r * np.linspace(1.0, 0.7, len(pts))
        segments.append((pts, radii, parent))
        if level >= depth:
            continue
        me = len(segments) - 1
        for _ in range(int(rng.integers(children[0], children[1] + 1))):
            j = int(rng.integers(int(0.15 * len(pts)), int(0.85 * len(pts))))
            tangent = _unit(pts[min(j + 1, len(pts) - 1)] - pts[max(j - 1, 0)])
            side = _unit(np.cross(tangent, random_unit(rng)))
            angle = np.deg2rad(rng.uniform(25, 85))
            cd = np.cos(angle) * tangent + np.sin(angle) * side
            todo.append((pts[j], cd, length * rng.uniform(0.4, 0.7), radii[j] * rng.uniform(0.55, 0.8),
                         me, level + 1))
    return render_tubes(shape, spacing, segments), segments


def render_tubes(shape, spacing, segments):
    """(D, H, W) bool: voxels within the local radius of the nearest in-volume centre-line point
    (one Euclidean distance transform with indices, on the bounding box of the lines)."""
    spacing = np.asarray(spacing, dtype=np.float64)
    pts = np.concatenate([s[0] for s in segments])
    rad = np.concatenate([s[1] for s in segments])
    idx = np.round(pts / spacing).astype(int)
    keep = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
    mask = np.zeros(shape, dtype=bool)
    if not keep.any():
        return mask
    idx, rad = idx[keep], rad[keep]
    box = _box(idx * spacing, rad.max() + 2 * spacing.max(), spacing, np.asarray(shape))
    lo = np.array([s.start for s in box])
    sub_shape = tuple(s.stop - s.start for s in box)
    line = np.ones(sub_shape, dtype=bool)
    radius = np.zeros(sub_shape, dtype=np.float32)
    local = tuple((idx - lo).T)
    line[local] = False
    np.maximum.at(radius, local, rad.astype(np.float32))
    dist, near = ndimage.distance_transform_edt(line, sampling=spacing, return_indices=True)
    mask[box] = dist < radius[tuple(near)]
    return mask


def _warped(coords, voxel):
    """The (warped) coordinates of ``voxel`` (z, y, x index), mm: where a shape drawn in
    ``coords`` must be centred to cover that voxel."""
    return np.array([float(c[tuple(voxel)]) for c in coords])


def abut(rng, coords, spacing, organ, size_mm: float, margin_mm: float = 0.0):
    """An organ mask overlapping ``organ`` ((D, H, W) bool, non-empty) around a random voxel of
    its surface; the caller keeps the part outside ``organ``, which shares a boundary with it."""
    surface = organ & ~ndimage.binary_erosion(organ)
    pts = np.argwhere(surface)
    p = _warped(coords, pts[int(rng.integers(0, len(pts)))])
    return organ_field(rng, coords, spacing, p, size_mm, balls=(1, 3), margin_mm=margin_mm) > 0.5


def lesion_in(rng, coords, spacing, organ, fraction: float, margin_mm: float = 0.0):
    """A blob around a random deep voxel of ``organ`` (in its inner half by distance to the
    surface), about ``fraction`` x the diameter of the organ's largest inscribed ball wide,
    clipped to the organ."""
    depth = ndimage.distance_transform_edt(organ, sampling=spacing)
    size_mm = 2.5 * fraction * 2.0 * float(depth.max())  # one metaball: diameter ~ 0.4 x size
    deep = np.argwhere(depth >= 0.5 * depth.max())
    p = _warped(coords, deep[int(rng.integers(0, len(deep)))])
    return (organ_field(rng, coords, spacing, p, size_mm, balls=(1, 2), margin_mm=margin_mm) > 0.5) & organ


def nested_levels(field, levels):
    """Shells of one field for increasing ``levels``: ``[levels[0] < field <= levels[1], ...,
    field > levels[-1]]``, each widened where needed so that it encloses the next one by at least
    one voxel (a shell touches only its neighbours in the list)."""
    inner = field > levels[-1]
    out = [inner]
    for lv in levels[-2::-1]:
        region = (field > lv) | ndimage.binary_dilation(inner)
        out.insert(0, region & ~inner)
        inner = region
    return out
