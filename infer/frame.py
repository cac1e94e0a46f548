"""The frame chain: volume -> working frame (the whole volume, or the image's non-zero box) ->
view crop -> network patch, and back.

A :class:`Frame` is the one object that knows where the working frame sits in the volume; the
crop -> patch step is ``infer.geometry.Crop``'s (``crop_to_patch`` / ``patch_to_region``). The
predictor and the interaction loop never shift coordinates inline.

Conventions: (z, y, x) voxel indices; boxes and windows half-open ``(lo, hi)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from .geometry import Crop, patch_to_region

Vec3 = Tuple[int, int, int]
Box = Tuple[Vec3, Vec3]


def _box_in(box: Optional[Box], origin: Sequence[int], shape: Sequence[int]) -> Optional[Box]:
    """A box in the frame ``[origin, origin + shape)``, as nnInteractive brings a box into its crop
    of the image: shifted, clipped, and a box collapsed by the clipping made one voxel thick
    (start 0: ``[0, 1)``, else its start moved back by one); None when still empty."""
    if box is None:
        return None
    lo, hi = [], []
    for l, h, o, s in zip(box[0], box[1], origin, shape):
        a, b = max(0, l - o), min(s, h - o)
        if b <= a:
            if a == 0:
                b = min(1, s)
            else:
                a = max(a - 1, 0)
        lo.append(a)
        hi.append(b)
    if any(b <= a for a, b in zip(lo, hi)):
        return None
    return tuple(lo), tuple(hi)  # type: ignore[return-value]


@dataclass(frozen=True)
class Frame:
    """The working frame ``[origin, origin + shape)`` of a volume of shape ``volume``.

    ``cropped``: the frame is a crop of the volume (even one as large as the volume), into which
    prompts are brought by clipping; False: the volume itself, prompts as given."""

    origin: Vec3
    shape: Vec3
    volume: Vec3
    cropped: bool = False

    @classmethod
    def whole(cls, volume: Sequence[int]) -> "Frame":
        v = tuple(int(s) for s in volume)
        return cls((0, 0, 0), v, v)  # type: ignore[arg-type]

    @classmethod
    def of_box(cls, box: Optional[Box], volume: Sequence[int]) -> "Frame":
        """The frame of a half-open ``box`` of the volume (None: the whole volume, uncropped)."""
        if box is None:
            return cls.whole(volume)
        lo, hi = box
        return cls(tuple(int(v) for v in lo), tuple(int(h) - int(l) for l, h in zip(lo, hi)),
                   tuple(int(s) for s in volume), cropped=True)

    @property
    def is_whole(self) -> bool:
        return not self.cropped

    @property
    def window(self) -> Tuple[slice, slice, slice]:
        """The frame's slices of the volume."""
        return tuple(slice(o, o + s) for o, s in zip(self.origin, self.shape))  # type: ignore[return-value]

    def cut(self, volume: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A volume-shaped tensor's part inside the frame (a view; None stays None)."""
        if volume is None or self.is_whole:
            return volume
        return volume[self.window]

    def prompts(self, prompts):
        """A class's prompts (``infer.prompts.ClassPrompts``) in frame coordinates: box and
        extent as nnInteractive brings a box into its crop (:func:`_box_in`), clicks shifted (a
        click outside the frame still centres the view; its ball is drawn where it reaches into
        the frame)."""
        if self.is_whole:
            return prompts
        o = self.origin
        return dataclasses.replace(
            prompts, box=_box_in(prompts.box, o, self.shape), extent=_box_in(prompts.extent, o, self.shape),
            clicks=[(pos, tuple(int(v) - a for v, a in zip(p, o))) for pos, p in prompts.clicks])

    def to_volume(self, crop: Crop) -> Crop:
        """A crop in frame coordinates moved to volume coordinates."""
        if not any(self.origin):
            return crop
        return Crop(lo=tuple(l + o for l, o in zip(crop.lo, self.origin)), size=crop.size, patch=crop.patch)

    def paste(self, prob: torch.Tensor, crop: Crop):
        """A patch-space prediction on ``crop`` (frame coordinates) resampled into the volume:
        ``(values, lo, hi)`` over the crop's part inside the volume (``patch_to_region``)."""
        return patch_to_region(prob, self.to_volume(crop), self.volume)

    def inner(self, vals: torch.Tensor, lo: Sequence[int], hi: Sequence[int]):
        """Values over ``[lo, hi)`` of the volume cut to their part inside the frame, in frame
        coordinates: ``(values, flo, fhi)``."""
        o, s = self.origin, self.shape
        flo = [max(l - a, 0) for l, a in zip(lo, o)]
        fhi = [max(min(h - a, n), b) for h, a, n, b in zip(hi, o, s, flo)]
        cut = vals[tuple(slice(b + a - l, e + a - l) for b, e, a, l in zip(flo, fhi, o, lo))]
        return cut, flo, fhi
