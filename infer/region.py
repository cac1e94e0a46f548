"""A class's new values over a box of the volume, and the merges of classes into one label map.

:class:`Region` states the rule once: NaN in a region's values means "not predicted here: the
previous mask stays". :class:`ProbMerge` and :class:`LabelMerge` merge the classes of a case.
Conventions: (z, y, x) voxel indices; boxes half-open ``(lo, hi)``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .writer import label_dtype

Vec3 = Tuple[int, int, int]
Box = Tuple[Vec3, Vec3]
KEEP = 1.0 + 1e-3  # merge weight of a kept (previous) mask voxel


def _window(lo: Sequence[int], hi: Sequence[int]) -> Tuple[slice, ...]:
    return tuple(slice(l, h) for l, h in zip(lo, hi))


class Region(NamedTuple):
    """``values`` over ``[lo, hi)`` of the volume: foreground probability (or 0/1 labels); NaN
    where the class keeps its previous mask."""

    values: torch.Tensor
    lo: Vec3
    hi: Vec3

    def over(self, base: torch.Tensor, lo: Sequence[int]) -> torch.Tensor:
        """``base`` (values over a box starting at ``lo`` that contains this region) with this
        region's values written over it, NaN keeping ``base``'s."""
        sub = tuple(slice(a - l, b - l) for a, b, l in zip(self.lo, self.hi, lo))
        vals = self.values.float()
        base[sub] = torch.where(torch.isnan(vals), base[sub], vals)
        return base

    def binary(self, prev: Optional[torch.Tensor], shape: Sequence[int]) -> np.ndarray:
        """The class's mask over the whole volume of ``shape``, (D, H, W) bool: this region's
        values > 0.5 inside it, the previous mask ``prev`` where they are NaN, False elsewhere."""
        out = np.zeros(tuple(shape), dtype=bool)
        vals = self.values.clone()
        sl = _window(self.lo, self.hi)
        keep = torch.isnan(vals)
        if prev is not None and bool(keep.any()):
            vals[keep] = prev[sl][keep].float()
        out[sl] = (vals > 0.5).cpu().numpy()
        return out


def class_values(region: Optional[Region], prev_k: Optional[torch.Tensor], pbox: Optional[Box],
                 device: torch.device):
    """One class's values for the merge: ``(values, lo, hi)`` over the union of ``region`` and the
    previous mask's box ``pbox`` (``bbox_of(prev_k)``), the previous mask weighted ``KEEP`` where
    the region does not say otherwise, or None when there is neither. Kept masks enter just above
    certainty, so that a saturated prediction of another class (softmax == 1.0 in float32) cannot
    take voxels from a class the harness called perfect."""
    boxes = [b for b in (pbox, region and (region.lo, region.hi)) if b is not None]
    if not boxes:
        return None
    lo = tuple(min(b[0][a] for b in boxes) for a in range(3))
    hi = tuple(max(b[1][a] for b in boxes) for a in range(3))
    if prev_k is not None:
        prob = prev_k[_window(lo, hi)].float() * KEEP
    else:
        prob = torch.zeros(tuple(h - l for l, h in zip(lo, hi)), device=device)
    if region is not None:
        prob = region.over(prob, lo)
    return prob, lo, hi


def _label_volume(shape: Sequence[int], k: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(tuple(shape), dtype=torch.int16 if k < 2 ** 15 else torch.int32, device=device)


class ProbMerge:
    """Running class merge: label = argmax(background, p_1 .. p_K), background = prod(1 - p_c).

    Holds three volumes (background product, best probability, best label) whatever K is. A class
    contributes its probabilities on the box where they can be non-zero."""

    def __init__(self, shape: Sequence[int], k: int, device: torch.device):
        self.bg = torch.ones(tuple(shape), dtype=torch.float32, device=device)
        self.best = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
        self.label = _label_volume(shape, k, device)

    def add(self, k: int, prob: torch.Tensor, lo: Sequence[int], hi: Sequence[int]) -> None:
        sl = _window(lo, hi)
        self.bg[sl] *= 1 - prob.clamp(max=1.0)
        better = prob > self.best[sl]
        self.best[sl] = torch.where(better, prob, self.best[sl])
        self.label[sl] = torch.where(better, torch.full_like(self.label[sl], k), self.label[sl])

    def result(self, k: int) -> np.ndarray:
        lab = torch.where(self.best > self.bg, self.label, torch.zeros_like(self.label))
        return lab.cpu().numpy().astype(label_dtype(k), copy=False)


class LabelMerge:
    """Class merge by labels (nnInteractive's challenge script): each class writes its label where
    its mask is set, in class order, so a later class overwrites an earlier one. One volume."""

    def __init__(self, shape: Sequence[int], k: int, device: torch.device):
        self.label = _label_volume(shape, k, device)

    def add(self, k: int, prob: torch.Tensor, lo: Sequence[int], hi: Sequence[int]) -> None:
        sl = _window(lo, hi)
        self.label[sl] = torch.where(prob > 0.5, torch.full_like(self.label[sl], k), self.label[sl])

    def result(self, k: int) -> np.ndarray:
        return self.label.cpu().numpy().astype(label_dtype(k), copy=False)


MERGES = {"prob": ProbMerge, "label": LabelMerge}
