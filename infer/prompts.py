"""Prompts: one class's parsed prompts (``ClassPrompts``, made by ``infer.case``) to the 7 prompt
channels.

Channel order (after the image channel): [previous mask, box+, box-, point+, point-, scribble+,
scribble-], as nnInteractive v1.0 was trained. Prompts are drawn as nnInteractive draws them, in
volume space, then brought into the patch with the crop:

* a box is a solid block of 1s: on the ``z_mid`` slice only (``box_style="2d"``, how v1.0 was
  trained) or over ``z_min..z_max`` (``"3d"``); which one comes from the model card;
* a click is a soft ball: the Euclidean distance transform of a radius-r ball, divided by its
  maximum (1 at the centre, 1/sqrt(r^2 + 1) at the rim); overlapping balls combine by maximum;
* every new click multiplies the earlier clicks (both point channels) by the decay factor, so the
  click made ``n`` clicks ago weighs ``decay ** n``;
* when the crop is zoomed out (scale > 1), each point channel of the whole crop (the balls combined
  by maximum, zero outside the volume) is first dilated by a max filter of ``nearest odd(2 * zoom
  - 1)`` voxels whose window is clipped to the crop, then every prompt channel is area-averaged
  onto the patch (the image itself is resampled linearly), as nnInteractive does.

All coordinates are (z, y, x) voxel indices of ``imgs``; boxes are half-open ``(lo, hi)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .geometry import Crop, crop_to_patch

Vec3 = Tuple[int, int, int]
Box = Tuple[Vec3, Vec3]

CHANNELS = ("prev_mask", "box+", "box-", "point+", "point-", "scribble+", "scribble-")


@dataclass
class ClassPrompts:
    """Everything the case says about one class.

    ``box``: the box as drawn into the box channel (half-open, clipped to the volume) or None.
    ``extent``: the object's known 3D extent (``z_min..z_max`` by the 2D box), used to choose the
    crop; None without a box. ``clicks``: chronological ``(positive, (z, y, x))``.
    ``done``: this stage's ``clicks_order`` entry is None: the class is already perfect.
    ``stage``: the click stage, i.e. how many ``clicks_order`` entries the class has (None
    entries too; without ``clicks_order``, its number of clicks); 0 in the box stage.
    """

    box: Optional[Box] = None
    extent: Optional[Box] = None
    clicks: List[Tuple[bool, Vec3]] = field(default_factory=list)
    done: bool = False
    stage: int = 0


def clicks_drawn(prompts: ClassPrompts) -> int:
    """How many click balls :func:`encode` draws for ``prompts`` (what drawing time grows with;
    the predictor's time budget scales its estimate of a pass by it)."""
    return len(prompts.clicks)


@lru_cache(maxsize=8)
def soft_ball(radius: int) -> torch.Tensor:
    """(2r+1,)*3 float32: inside the ball ``|d| <= r``, each voxel's Euclidean distance to the
    nearest voxel outside it (within the cube), divided by the maximum; 0 outside."""
    r = int(radius)
    ax = torch.arange(-r, r + 1, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    inside = (grid ** 2).sum(1) <= r * r
    if bool(inside.all()):  # degenerate radius 0: a single voxel
        return torch.ones((1, 1, 1))
    dist = torch.cdist(grid[inside], grid[~inside]).min(1).values
    out = torch.zeros(grid.shape[0], dtype=torch.float64)
    out[inside] = dist / dist.max()
    return out.reshape((2 * r + 1,) * 3).float()


def _odd_kernel(zoom: float) -> int:
    """nnInteractive's dilation kernel for point channels at a zoom: nearest odd of 2*zoom - 1
    (its ``round_to_nearest_odd``: 1.5 -> 3, 2.25 -> 3, 2.6 -> 5, 3.375 -> 5, 4 -> 7)."""
    return int(math.floor((2 * zoom - 1 - 1) / 2 + 0.5)) * 2 + 1


# Voxels of one point-channel slab rendered at crop resolution (bounds memory at any zoom).
_SLAB_VOXELS = 1 << 24
# Clicks drawn per scatter (bounds the (clicks x ball voxels) index tensor).
_CLICK_CHUNK = 4096


def _unique_clicks(clicks: Sequence[Tuple[bool, Vec3]], decay: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positive (m,) bool, points (m, 3) int64, weight (m,) float32) with one row per distinct
    (polarity, point). A click made ``a`` clicks before the newest weighs ``decay ** a``; repeated
    copies combine by maximum in nnInteractive's channels, so the newest copy's weight is kept."""
    n = len(clicks)
    pos = torch.tensor([bool(c[0]) for c in clicks], dtype=torch.bool)
    pts = torch.tensor([c[1] for c in clicks], dtype=torch.int64).reshape(n, 3)
    age = torch.arange(n - 1, -1, -1, dtype=torch.int64)
    # one row (polarity, z, y, x) per click, any coordinate range; rows sort lexicographically
    uniq, inv = torch.unique(torch.cat([pos.long()[:, None], pts], 1), dim=0, return_inverse=True)
    newest = torch.full((uniq.shape[0],), n, dtype=torch.int64).scatter_reduce(0, inv, age, "amin")
    weight = torch.pow(torch.tensor(float(decay), dtype=torch.float64), newest.double()).float()
    first = torch.full((uniq.shape[0],), n, dtype=torch.int64).scatter_reduce(
        0, inv, torch.arange(n, dtype=torch.int64), "amin")  # any row of each group
    return pos[first], pts[first], weight


def _area_range(t: torch.Tensor, axis: int, n_in: int, n_out: int, o0: int, o1: int, start: int) -> torch.Tensor:
    """Outputs ``[o0, o1)`` of ``interpolate(mode="area")`` from ``n_in`` to ``n_out`` samples along
    ``axis``; ``t`` holds input samples ``[start, start + t.shape[axis])``, which must cover the bins
    of those outputs (output ``j`` averages ``[floor(j n_in / n_out), ceil((j + 1) n_in / n_out))``)."""
    j = torch.arange(o0, o1, device=t.device)
    s = (j * n_in) // n_out - start
    e = ((j + 1) * n_in + n_out - 1) // n_out - start
    csum = torch.cat([torch.zeros_like(t.narrow(axis, 0, 1)), torch.cumsum(t, dim=axis)], dim=axis)
    shape = [1] * t.dim()
    shape[axis] = -1
    return (csum.index_select(axis, e) - csum.index_select(axis, s)) / (e - s).to(t.dtype).view(shape)


def _bins(n_in: int, n_out: int, g0: int, g1: int) -> Tuple[int, int]:
    """Outputs ``[o0, o1)`` of an area resampling whose bins meet inputs ``[g0, g1)``."""
    j = torch.arange(n_out)
    s = (j * n_in) // n_out
    e = ((j + 1) * n_in + n_out - 1) // n_out
    hit = torch.nonzero((s < g1) & (e > g0)).flatten()
    return int(hit[0]), int(hit[-1]) + 1


def _reach(pts: torch.Tensor, weight: torch.Tensor, crop: Crop, shape: Optional[Sequence[int]], half: int,
           h: int):
    """Where the balls (half-width ``half``) of the clicks ``pts`` (N, 3) reach into ``crop`` and
    the volume of ``shape``, dilated by ``h`` more voxels: ``(pts, weight, rlo, rhi, ob)`` with the
    clicks that reach at all and their weights, the drawable box ``[rlo, rhi)`` (volume
    coordinates: inside crop and volume) and, per axis, the range of patch outputs whose bins
    meet the reached part (:func:`_bins`); None when no ball reaches."""
    clo = torch.tensor(crop.lo, dtype=torch.int64)
    chi = torch.tensor(crop.hi, dtype=torch.int64)
    vhi = chi if shape is None else torch.minimum(chi, torch.tensor(tuple(shape[-3:]), dtype=torch.int64))
    rlo, rhi = torch.clamp(clo, min=0), vhi  # balls are drawn inside crop and volume only
    blo = torch.maximum(pts - half, rlo)
    bhi = torch.minimum(pts + half + 1, rhi)
    keep = (bhi > blo).all(1)
    if not bool(keep.any()):
        return None
    pts, weight, blo, bhi = pts[keep], weight[keep], blo[keep], bhi[keep]
    # crop-relative region the dilated balls can reach, and the outputs whose bins meet it
    g0 = (blo.min(0).values - h - clo).clamp(min=0)
    g1 = torch.minimum(bhi.max(0).values + h - clo, chi - clo)
    ob = [_bins(crop.size[a], crop.patch[a], int(g0[a]), int(g1[a])) for a in range(3)]
    return pts, weight, rlo, rhi, ob


def _point_channel(pts: torch.Tensor, weight: torch.Tensor, crop: Crop, shape: Optional[Sequence[int]],
                   ball: torch.Tensor, kern: int, dev: torch.device) -> torch.Tensor:
    """One point channel in patch space, (*crop.patch) float32, as nnInteractive builds it: the
    weighted soft balls combined by maximum in the volume (clipped to the volume), cut to the crop
    (zero outside the volume), dilated by a ``kern``^3 max filter whose window is clipped to the
    crop, then area-resampled to the patch (at zoom 1, ``kern`` = 1 and the crop is the patch).

    Only the part of the crop that the balls can reach is rendered, in slabs of bounded size, and
    each slab draws its balls with one scatter: no loop over clicks."""
    out = torch.zeros(tuple(crop.patch), dtype=torch.float32, device=dev)
    half, h = ball.shape[0] // 2, kern // 2
    reach = _reach(pts, weight, crop, shape, half, h)
    if reach is None:
        return out
    pts, weight, rlo, rhi, ob = reach
    clo = torch.tensor(crop.lo, dtype=torch.int64)
    S, P = crop.size, crop.patch
    lo_in = [(ob[a][0] * S[a]) // P[a] for a in range(3)]
    hi_in = [((ob[a][1]) * S[a] + P[a] - 1) // P[a] for a in range(3)]
    # the render window of axes y, x: the bins' inputs plus the dilation halo, inside the crop
    wy = (max(lo_in[1] - h, 0), min(hi_in[1] + h, S[1]))
    wx = (max(lo_in[2] - h, 0), min(hi_in[2] + h, S[2]))
    offs = torch.nonzero(ball > 0)  # (V, 3)
    vals = ball[ball > 0].to(dev)
    offs = (offs - half).to(dev)
    plane = (wy[1] - wy[0]) * (wx[1] - wx[0])
    per_out = max(1, -(-S[0] // P[0]))  # crop planes per output plane (upper bound)
    step = max(1, (_SLAB_VOXELS // max(plane, 1) - 2 * h) // per_out)
    # everything indexed by ``near`` / ``sel`` (device tensors) lives on the device
    rel = pts.to(dev) - clo.to(dev)  # crop-relative click centres
    weight = weight.to(dev)
    rlo_rel, rhi_rel = (rlo - clo).to(dev), (rhi - clo).to(dev)
    for a0 in range(ob[0][0], ob[0][1], step):
        a1 = min(a0 + step, ob[0][1])
        z_in = ((a0 * S[0]) // P[0], (a1 * S[0] + P[0] - 1) // P[0])
        wz = (max(z_in[0] - h, 0), min(z_in[1] + h, S[0]))
        w0 = torch.tensor((wz[0], wy[0], wx[0]), device=dev)
        w1 = torch.tensor((wz[1], wy[1], wx[1]), device=dev)
        dims = (wz[1] - wz[0], wy[1] - wy[0], wx[1] - wx[0])
        buf = torch.zeros(dims[0] * dims[1] * dims[2], dtype=torch.float32, device=dev)
        near = ((rel + half >= w0) & (rel - half < w1)).all(1).nonzero().flatten()
        for c0 in range(0, int(near.numel()), _CLICK_CHUNK):
            sel = near[c0:c0 + _CLICK_CHUNK]
            idx = rel[sel, None, :] + offs[None]  # (m, V, 3) crop-relative voxels
            ok = ((idx >= torch.maximum(w0, rlo_rel)) & (idx < torch.minimum(w1, rhi_rel))).all(2)
            idx = idx - w0
            flat = (idx[..., 0] * dims[1] + idx[..., 1]) * dims[2] + idx[..., 2]
            v = weight[sel][:, None] * vals[None]
            buf.scatter_reduce_(0, flat[ok], v[ok], "amax")
        buf = buf.view(dims)
        if h:
            buf = torch.nn.functional.max_pool3d(buf[None, None], kern, stride=1, padding=h)[0, 0]
        part = buf
        for a, (w, o) in enumerate(zip((wz, wy, wx), ((a0, a1), ob[1], ob[2]))):
            part = _area_range(part, a, S[a], P[a], o[0], o[1], w[0])
        out[a0:a1, ob[1][0]:ob[1][1], ob[2][0]:ob[2][1]] = part
    return out


def encode(prompts: ClassPrompts, crop: Crop, prev_mask: Optional[torch.Tensor], radius: int,
           decay: float, device: torch.device | str = "cpu",
           shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The 7 prompt channels in patch space: (7, *crop.patch) float32 on ``device``.

    ``prev_mask``: (D, H, W) tensor (bool or float) of the class's previous mask, or None.
    ``shape``: the volume's (D, H, W) (default: ``prev_mask``'s): click balls are clipped to it, as
    nnInteractive draws them into a volume-sized channel. Cost: a click whose ball misses the crop
    costs nothing; repeated identical clicks are drawn once; the rest is drawn without a Python loop
    over clicks, into at most the part of the crop the balls reach.
    """
    dev = torch.device(device)
    if shape is None and prev_mask is not None:
        shape = tuple(prev_mask.shape[-3:])
    zoom = max(crop.scale)
    mode = "area" if zoom > 1 else "linear"
    out = torch.zeros((7,) + tuple(crop.patch), dtype=torch.float32, device=dev)
    if prev_mask is not None:
        out[0] = crop_to_patch(prev_mask.to(dev), crop, mode=mode)
    if prompts.box is not None:
        lo, hi = prompts.box
        block = torch.ones(tuple(h - l for l, h in zip(lo, hi)), device=dev)
        out[1] = crop_to_patch(block, crop, origin=lo, mode=mode)
    if prompts.clicks:
        kern = _odd_kernel(zoom) if zoom > 1 else 1
        ball = soft_ball(radius)
        positive, pts, weight = _unique_clicks(prompts.clicks, decay)
        for ch, sel in ((3, positive), (4, ~positive)):
            if bool(sel.any()):
                out[ch] = _point_channel(pts[sel], weight[sel], crop, shape, ball, kern, dev)
    return out
