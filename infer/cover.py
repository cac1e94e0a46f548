"""nnInteractive's refinement tile cover, exact and fast: which patch-sized tiles cover a mask
(``cover_tiles``, its ``generate_bounding_boxes``) and the opening of a difference map
(``open_mask``). Pure functions on (d, h, w) tensors, (z, y, x) order, half-open boxes.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import bbox_of

Vec3 = Tuple[int, int, int]
Box = Tuple[Vec3, Vec3]


def open_mask(mask: torch.Tensor, size: int = 5) -> torch.Tensor:
    """Grey opening of a (d, h, w) 0/1 tensor by a ``size``^3 cube: min-pool then max-pool, each
    on the input padded by replication (nnInteractive's ``iterative_3x3_same_padding_pool3d``;
    equal to ``scipy.ndimage.grey_opening(size=size, mode="nearest")``)."""
    if size % 2 != 1:
        raise ValueError("odd size only")
    x = mask.float()[None, None]
    r = size // 2
    x = -F.max_pool3d(F.pad(-x, (r,) * 6, mode="replicate"), size, stride=1)
    x = F.max_pool3d(F.pad(x, (r,) * 6, mode="replicate"), size, stride=1)
    return x[0, 0] > 0.5


def _windows(centers: torch.Tensor, half, end, margin, shape):
    """The margin-shrunk tile windows ``[lo, hi)`` (N, 3) of ``centers`` (N, 3), clipped to
    ``shape``."""
    lo = torch.stack([(centers[:, a] - half[a] + margin[a]).clamp(0, shape[a]) for a in range(3)], 1)
    hi = torch.stack([(centers[:, a] + end[a] - margin[a]).clamp(0, shape[a]) for a in range(3)], 1)
    return lo, torch.maximum(hi, lo)


class _CellCounts:
    """Voxel counts of a mask over boxes whose faces lie on given coordinates per axis: the mask
    is summed once into the cells between consecutive coordinates (one pass over the volume),
    then any such box's count is a sum over cells (exact, float64)."""

    def __init__(self, mask: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
        shape = tuple(mask.shape)
        self.bounds = []
        x = mask.to(torch.float32)
        for a in range(3):
            b = torch.unique(torch.cat([lo[:, a], hi[:, a], torch.tensor([0, shape[a]], device=lo.device)]))
            self.bounds.append(b)
            ids = torch.bucketize(torch.arange(shape[a], device=mask.device), b[1:-1].to(mask.device), right=True)
            size = list(x.shape)
            size[a] = len(b) - 1
            x = torch.zeros(size, dtype=torch.float64 if a else torch.float32, device=mask.device).index_add_(
                a, ids, x if a else x)
            x = x.double()
        self.cells = x  # counts per cell

    def index(self, v: torch.Tensor, a: int) -> torch.Tensor:
        return torch.searchsorted(self.bounds[a].to(v.device), v.contiguous())

    def sums(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Counts over boxes ``[lo, hi)`` (N, 3) of the cells not zeroed by :meth:`clear`."""
        c = self.cells.cumsum(0).cumsum(1).cumsum(2)
        c = torch.nn.functional.pad(c, (1, 0, 1, 0, 1, 0))
        z0, y0, x0 = (self.index(lo[:, a], a).to(c.device) for a in range(3))
        z1, y1, x1 = (self.index(hi[:, a], a).to(c.device) for a in range(3))
        return (c[z1, y1, x1] - c[z0, y1, x1] - c[z1, y0, x1] - c[z1, y1, x0]
                + c[z0, y0, x1] + c[z0, y1, x0] + c[z1, y0, x0] - c[z0, y0, x0])

    def clear(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Zero the cells of one box ``[lo, hi)`` (3,) whose faces are cell bounds."""
        i0 = [int(self.index(lo[a:a + 1], a)) for a in range(3)]
        i1 = [int(self.index(hi[a:a + 1], a)) for a in range(3)]
        self.cells[i0[0]:i1[0], i0[1]:i1[1], i0[2]:i1[2]] = 0


def cover_tiles(mask: torch.Tensor, patch: Sequence[int], margin: Sequence[int] = (10, 10, 10),
                max_depth: int = 3, stride="auto", rng: Optional[np.random.RandomState] = None,
                _depth: int = 0) -> List[Box]:
    """Tiles (half-open ``(lo, hi)`` boxes of ``patch`` voxels) that cover the True voxels of
    ``mask`` (d, h, w): nnInteractive's ``generate_bounding_boxes`` (greedy set cover).

    Candidate centres: mask voxels on a grid of ``stride`` from the mask's lower corner ("auto":
    a quarter of the mask's extent per axis, at least 1). A centre covers its tile shrunk by
    ``margin`` on each side. Repeatedly the candidate covering the most still-uncovered voxels
    wins (the first in z, y, x order on ties); what remains is covered at half the stride (up to
    ``max_depth`` times), or, when fewer than ``prod(patch // 3)`` voxels or deeper, by
    :func:`_random_cover` (centres drawn with ``rng``, default ``RandomState(0)``). The margin is
    capped at ``patch // 2 - 1`` so that a tile always covers its own centre. Counts are exact
    (:class:`_CellCounts`), not the voxel-by-voxel sums nnInteractive takes.
    """
    margin = [max(0, min(int(m), int(p) // 2 - 1)) for m, p in zip(margin, patch)]
    if not bool(mask.any()):
        return []
    if _depth > max_depth:
        return _random_cover(mask, patch, margin, 25, rng)
    half = [int(p) // 2 for p in patch]
    end = [int(p) - h for p, h in zip(patch, half)]
    shape = tuple(mask.shape)
    box = bbox_of(mask)
    mn, mx = box[0], [h - 1 for h in box[1]]
    if stride == "auto":
        stride = [max(1, round((j - i) / 4)) for i, j in zip(mn, mx)]
    stride = [int(s) for s in stride]
    grids = [torch.arange(mn[a], mx[a] + 1, stride[a], device=mask.device) for a in range(3)]
    cz, cy, cx = torch.meshgrid(*grids, indexing="ij")
    cand = torch.stack([cz.flatten(), cy.flatten(), cx.flatten()], 1)
    cand = cand[mask[cand[:, 0], cand[:, 1], cand[:, 2]]]
    if cand.shape[0] == 0:
        return cover_tiles(mask, patch, margin, max_depth, [max(1, s // 2) for s in stride], rng, _depth + 1)
    uncovered = mask.clone()
    wlo, whi = _windows(cand, half, end, margin, shape)
    counts = _CellCounts(mask, wlo, whi)
    tiles: List[Box] = []
    while cand.shape[0] > 0 and float(counts.cells.sum()) > 0:
        wlo, whi = _windows(cand, half, end, margin, shape)
        sums = counts.sums(wlo, whi)
        best = int(torch.argmax(sums))
        if float(sums[best]) == 0:
            break
        c = [int(v) for v in cand[best]]
        tiles.append((tuple(c[a] - half[a] for a in range(3)), tuple(c[a] + end[a] for a in range(3))))
        uncovered[tuple(slice(int(wlo[best, a]), int(whi[best, a])) for a in range(3))] = False
        counts.clear(wlo[best], whi[best])
        cand = cand[uncovered[cand[:, 0], cand[:, 1], cand[:, 2]]]
    left = int(counts.cells.sum())
    if left:
        if left < math.prod(int(p) // 3 for p in patch):
            tiles += _random_cover(uncovered, patch, margin, 25, rng)
        else:
            tiles += cover_tiles(uncovered, patch, margin, max_depth, [max(1, s // 2) for s in stride],
                                 rng, _depth + 1)
    return tiles


def _random_cover(mask: torch.Tensor, patch, margin, n_samples: int,
                  rng: Optional[np.random.RandomState]) -> List[Box]:
    """nnInteractive's ``random_sampling_fallback``: while voxels remain, of ``n_samples`` mask
    voxels drawn at random (indices into the remaining voxels in z, y, x order) the one whose
    (margin-shrunk) tile covers most wins (the first drawn on ties)."""
    rng = np.random.RandomState(0) if rng is None else rng
    half = [int(p) // 2 for p in patch]
    end = [int(p) - h for p, h in zip(patch, half)]
    shape = tuple(mask.shape)
    idx = torch.nonzero(mask)  # the remaining voxels, in nonzero's order
    tiles: List[Box] = []
    while len(idx):
        cand = idx[torch.as_tensor([rng.choice(len(idx)) for _ in range(n_samples)], device=idx.device)]
        wlo, whi = _windows(cand, half, end, margin, shape)
        inside = [((idx >= wlo[i]) & (idx < whi[i])).all(1) for i in range(n_samples)]
        best = int(torch.argmax(torch.stack([m.sum() for m in inside])))
        c = [int(v) for v in cand[best]]
        tiles.append((tuple(c[a] - half[a] for a in range(3)), tuple(c[a] + end[a] for a in range(3))))
        idx = idx[~inside[best]]
    return tiles
