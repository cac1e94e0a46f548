"""Helpers that the synthetic case families share (``scripts.synthetic``, ``scripts.varied*``,
``scripts.heldout``): millimetre grids, smooth noise, and the compressed atomic npz writer.
Arrays in (z, y, x) order."""
from pathlib import Path

import numpy as np

from infer.writer import atomic_write


def _grid_mm(shape, spacing):
    """Open grid of voxel-centre coordinates in mm: three broadcastable arrays (z, y, x)."""
    return [np.arange(n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)]) * s
            for i, (n, s) in enumerate(zip(shape, spacing))]


def _interp_matrix(n, cells):
    """(n, cells) matrix: linear interpolation from `cells` knots spanning 0..n-1 to n points."""
    pos = np.linspace(0, cells - 1, n)
    lo = np.minimum(np.floor(pos).astype(int), cells - 2)
    w = (pos - lo).astype(np.float32)
    m = np.zeros((n, cells), dtype=np.float32)
    m[np.arange(n), lo] = 1 - w
    m[np.arange(n), lo + 1] = w
    return m


def _smooth_noise(rng, shape, cells=4):
    """Smooth noise in [-1, 1] of `shape`: a coarse random grid, interpolated separably."""
    coarse = rng.uniform(-1, 1, size=(cells, cells, cells)).astype(np.float32)
    mz, my, mx = (_interp_matrix(n, cells) for n in shape)
    field = np.einsum("ijk,zi->zjk", coarse, mz)
    field = np.einsum("zjk,yj->zyk", field, my)
    field = np.einsum("zyk,xk->zyx", field, mx)
    m = np.abs(field).max()
    return field / m if m > 0 else field


def _atomic_savez(path, **arrays):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        np.savez_compressed(f, **arrays)


def _object_array(items):
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        arr[i] = item
    return arr
