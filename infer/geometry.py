"""Crop, zoom, resample and paste: pure torch functions on (z, y, x) volumes.

Conventions
-----------
* Every coordinate is in array-index order (z, y, x) of the case's ``imgs``; voxel ``i`` has its
  centre at coordinate ``i``.
* A ``Crop`` is a half-open box ``[lo, lo + size)`` of the volume (it may reach outside the
  volume: outside voxels read as a pad value) that is resampled to a network patch of shape
  ``patch``. ``scale = size / patch`` volume voxels per patch voxel along each axis.
* Resampling is linear and follows ``torch.nn.functional.interpolate(..., mode="trilinear",
  align_corners=False)`` exactly: patch voxel ``j`` samples crop coordinate
  ``max((j + 0.5) * scale - 0.5, 0)``. The functions here compute those samples straight from the
  uncropped source, axis by axis, so that no crop-sized (possibly mostly padded) tensor is built
  and only the requested output range is produced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

Vec3 = Tuple[int, int, int]


@dataclass(frozen=True)
class Crop:
    """A region ``[lo, lo + size)`` of the volume (voxels) mapped onto a patch of ``patch`` voxels."""

    lo: Vec3
    size: Vec3
    patch: Vec3

    @property
    def hi(self) -> Vec3:
        return tuple(l + s for l, s in zip(self.lo, self.size))  # type: ignore[return-value]

    @property
    def scale(self) -> Tuple[float, float, float]:
        """Volume voxels per patch voxel, per axis."""
        return tuple(s / p for s, p in zip(self.size, self.patch))  # type: ignore[return-value]

    def inside(self, shape: Sequence[int]) -> Tuple[Vec3, Vec3]:
        """The part of the crop inside a volume of ``shape``: half-open ``(lo, hi)``, possibly empty."""
        lo = tuple(max(l, 0) for l in self.lo)
        hi = tuple(max(min(h, s), l) for h, s, l in zip(self.hi, shape, lo))
        return lo, hi  # type: ignore[return-value]


def make_crop(center: Sequence[float], zoom: float, patch: Sequence[int]) -> Crop:
    """Crop of ``round(patch * zoom)`` voxels per axis around ``center`` (volume coordinates, float
    allowed), as nnInteractive places it: the centre is rounded to a voxel ``c`` with Python's
    ``round`` (half to even), then the crop spans ``[c - s // 2, c + s // 2 + s % 2)``; for an even
    size ``s`` the voxel ``c`` is the first of the two middle ones' upper half (``lo + s / 2``)."""
    size = tuple(max(1, int(round(p * zoom))) for p in patch)
    lo = tuple(int(round(c)) - s // 2 for c, s in zip(center, size))
    return Crop(lo=lo, size=size, patch=tuple(int(p) for p in patch))  # type: ignore[arg-type]


def zoom_for_extent(extent: Sequence[float], patch: Sequence[int], margin: float = 1 / 3,
                    min_zoom: float = 1.0, max_zoom: float = 4.0) -> float:
    """nnInteractive's starting zoom for an object of ``extent`` voxels per axis: the smallest
    zoom at which the extent plus ``margin * patch`` voxels of context fits the patch,
    ``max_a (extent_a + margin * patch_a) / patch_a``, clamped to ``[min_zoom, max_zoom]``."""
    need = max((e + margin * p) / p for e, p in zip(extent, patch))
    return float(min(max(need, min_zoom), max_zoom))


def to_patch_coords(points: torch.Tensor, crop: Crop) -> torch.Tensor:
    """Volume coordinates (N, 3) -> continuous patch coordinates (N, 3) (inverse of
    :func:`to_volume_coords`)."""
    lo = torch.tensor(crop.lo, dtype=torch.float64, device=points.device)
    sc = torch.tensor(crop.scale, dtype=torch.float64, device=points.device)
    return (points.double() - lo + 0.5) / sc - 0.5


def to_volume_coords(points: torch.Tensor, crop: Crop) -> torch.Tensor:
    """Continuous patch coordinates (N, 3) -> volume coordinates (N, 3)."""
    lo = torch.tensor(crop.lo, dtype=torch.float64, device=points.device)
    sc = torch.tensor(crop.scale, dtype=torch.float64, device=points.device)
    return lo + (points.double() + 0.5) * sc - 0.5


def _linear_axis(t: torch.Tensor, axis: int, n_in: int, n_out: int, window: Tuple[int, int],
                 src_offset: int, pad: float) -> torch.Tensor:
    """Linear resampling of a *virtual* 1-D signal along ``axis`` of ``t``.

    The virtual signal has ``n_in`` samples; sample ``i`` is ``t[src_offset + i]`` along ``axis``
    when that index lies inside ``t`` and ``pad`` otherwise. It is resampled to ``n_out`` samples
    exactly as ``interpolate(align_corners=False)`` does, and outputs ``[start, stop) = window``
    are returned.
    """
    dev = t.device
    length = t.shape[axis]
    k = torch.arange(window[0], window[1], device=dev, dtype=torch.float64)
    c = ((k + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    i0 = torch.floor(c).long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w = (c - i0.double()).to(t.dtype)
    shape = [1] * t.dim()
    shape[axis] = -1
    w = w.view(shape)
    out = None
    for idx, wt in ((src_offset + i0, 1 - w), (src_offset + i1, w)):
        valid = (idx >= 0) & (idx < length)
        vals = t.index_select(axis, idx.clamp(0, max(length - 1, 0)))
        if not bool(valid.all()):
            vals = torch.where(valid.view(shape), vals, torch.full_like(vals, pad))
        out = vals * wt if out is None else out + vals * wt
    return out


def _area_axis(t: torch.Tensor, axis: int, n_in: int, n_out: int, src_offset: int,
               pad: float) -> torch.Tensor:
    """Area (box-average) resampling of the same virtual signal as :func:`_linear_axis`, all
    ``n_out`` outputs, as ``interpolate(mode="area")`` (= adaptive average pooling): output ``j``
    averages source samples ``[floor(j * n_in / n_out), ceil((j + 1) * n_in / n_out))``."""
    dev = t.device
    length = t.shape[axis]
    j = torch.arange(n_out, device=dev)
    s = (j * n_in) // n_out + src_offset
    e = ((j + 1) * n_in + n_out - 1) // n_out + src_offset
    a, b = s.clamp(0, length), e.clamp(0, length)
    zero = torch.zeros_like(t.narrow(axis, 0, 1)) if length else None
    csum = torch.cat([zero, torch.cumsum(t, dim=axis)], dim=axis)
    total = csum.index_select(axis, b) - csum.index_select(axis, a)
    shape = [1] * t.dim()
    shape[axis] = -1
    n_pad = ((e - s) - (b - a)).to(t.dtype).view(shape)
    return (total + pad * n_pad) / (e - s).to(t.dtype).view(shape)


def _axis_order(sizes_in: Sequence[int], sizes_out: Sequence[int]) -> list:
    """Spatial axes ordered so that the ones that shrink most go first (smallest temporaries)."""
    return sorted(range(3), key=lambda a: sizes_out[a] / max(sizes_in[a], 1))


def crop_to_patch(src: torch.Tensor, crop: Crop, origin: Sequence[int] = (0, 0, 0),
                  pad: float = 0.0, mode: str = "linear") -> torch.Tensor:
    """Resample the crop of a volume to the patch.

    ``src``: (..., d, h, w) tensor (a bool / integer mask is read as float32) holding the volume's values at volume coordinates
    ``origin + index`` (``origin`` = (0, 0, 0) for a whole volume; a small tensor with another
    origin stands for a volume that is ``pad`` everywhere else). Returns (..., *crop.patch), equal
    to ``interpolate(padded_crop, crop.patch, mode="trilinear", align_corners=False)``, or with
    ``mode="area"`` to ``interpolate(padded_crop, crop.patch, mode="area")``.
    """
    if mode not in ("linear", "area"):
        raise ValueError(f"unknown resampling mode {mode!r}")
    lead = src.dim() - 3
    # Only source samples inside the crop are ever read: cut them out first (a view, no copy).
    origin = [int(o) for o in origin]
    for a in range(3):
        n = src.shape[lead + a]
        s0 = min(max(crop.lo[a] - origin[a], 0), n)
        s1 = max(min(crop.hi[a] - origin[a], n), s0)
        if s1 == s0:  # the crop misses the source entirely
            dtype = src.dtype if src.is_floating_point() else torch.float32
            return torch.full(src.shape[:lead] + tuple(crop.patch), pad, dtype=dtype, device=src.device)
        src = src.narrow(lead + a, s0, s1 - s0)
        origin[a] += s0
    out = src if src.is_floating_point() else src.float()  # masks: convert only the part read
    for a in _axis_order(crop.size, crop.patch):
        off = crop.lo[a] - origin[a]
        if mode == "area":
            out = _area_axis(out, lead + a, crop.size[a], crop.patch[a], off, pad)
        else:
            out = _linear_axis(out, lead + a, crop.size[a], crop.patch[a], (0, crop.patch[a]), off, pad)
    return out


def patch_to_region(patch: torch.Tensor, crop: Crop, shape: Sequence[int]) -> Tuple[torch.Tensor, Vec3, Vec3]:
    """Resample a patch-space tensor (..., *crop.patch) back to the volume, inside it only.

    Returns ``(values, lo, hi)``: ``values`` (..., *(hi - lo)) is what
    ``interpolate(patch, crop.size, mode="trilinear", align_corners=False)`` holds over the part
    ``[lo, hi)`` of the crop that lies inside a volume of ``shape``.
    """
    lo, hi = crop.inside(shape)
    out = patch
    lead = patch.dim() - 3
    for a in _axis_order(crop.patch, [h - l for l, h in zip(lo, hi)]):
        out = _linear_axis(out, lead + a, crop.patch[a], crop.size[a],
                           (lo[a] - crop.lo[a], hi[a] - crop.lo[a]), 0, 0.0)
    return out, lo, hi


def bbox_of(mask: torch.Tensor) -> Tuple[Vec3, Vec3] | None:
    """Half-open bounding box ``(lo, hi)`` of the non-zero voxels of a (d, h, w) tensor, or None.

    Two passes over the volume: its (d, h) and (h, w) projections; the three 1-D profiles come
    from those."""
    if mask.dtype != torch.bool:
        mask = mask != 0
    zy = mask.any(dim=2)
    yx = mask.any(dim=0)
    lo, hi = [], []
    for prof in (zy.any(dim=1), zy.any(dim=0), yx.any(dim=0)):
        idx = torch.nonzero(prof).flatten()
        if idx.numel() == 0:
            return None
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]) + 1)
    return tuple(lo), tuple(hi)  # type: ignore[return-value]


def touches_border(mask: torch.Tensor, crop: Crop, shape: Sequence[int]) -> bool:
    """True when a binary patch-space ``mask`` reaches a face of the patch that lies inside the
    volume (a face on the volume's own border does not count: zooming out cannot help there)."""
    for a in range(3):
        n = crop.patch[a]
        first = mask.narrow(a, 0, 1).any()
        last = mask.narrow(a, n - 1, 1).any()
        if bool(first) and crop.lo[a] > 0:
            return True
        if bool(last) and crop.hi[a] < shape[a]:
            return True
    return False


def crop_to_patch_nearest(src: torch.Tensor, crop: Crop, pad: float = 0.0) -> torch.Tensor:
    """Nearest-neighbour resampling of the crop of a (d, h, w) volume to the patch, equal to
    ``interpolate(padded_crop[None, None].double(), crop.patch, mode="nearest")[0, 0]`` (as
    nnInteractive resamples its previous mask; returned as float32; voxels outside the volume
    read as ``pad``). Per axis, patch voxel ``j`` reads the crop voxel torch's nearest mode picks
    for a float64 input (taken from ``interpolate`` of a float64 index ramp, so rounding is
    torch's own: float32 inputs can pick another voxel); only the selected voxels are gathered."""
    idx = []
    for a in range(3):
        ramp = torch.arange(crop.size[a], dtype=torch.float64)[None, None]
        sel = torch.nn.functional.interpolate(ramp, size=crop.patch[a], mode="nearest")[0, 0].long()
        idx.append(sel + crop.lo[a])
    out = torch.full(tuple(crop.patch), pad, dtype=torch.float32, device=src.device)
    valid = [(i >= 0) & (i < n) for i, n in zip(idx, src.shape)]
    picked = [i[v].to(src.device) for i, v in zip(idx, valid)]
    if any(p.numel() == 0 for p in picked):
        return out
    vals = src[picked[0][:, None, None], picked[1][None, :, None], picked[2][None, None, :]].float()
    where = [torch.nonzero(v).flatten().to(src.device) for v in valid]
    out[where[0][:, None, None], where[1][None, :, None], where[2][None, None, :]] = vals
    return out



def patch_to_region_torch(patch: torch.Tensor, crop: Crop, shape: Sequence[int]) -> Tuple[torch.Tensor, Vec3, Vec3]:
    """:func:`patch_to_region` computed by ``interpolate(patch, crop.size, mode="trilinear",
    align_corners=False)`` itself on the whole crop, then cut to the part inside ``shape``: the
    same values to the last bit as torch's kernel (whose rounding differs from the separable
    evaluation in the last place), for values thresholded at exact ties (an upsampled 0/1 label
    against 0.5). Memory: the whole crop in ``patch``'s dtype. (*patch) tensors only."""
    lo, hi = crop.inside(shape)
    full = torch.nn.functional.interpolate(patch[None, None], size=tuple(crop.size), mode="trilinear",
                                           align_corners=False)[0, 0]
    return full[tuple(slice(l - c, h - c) for l, h, c in zip(lo, hi, crop.lo))], lo, hi
