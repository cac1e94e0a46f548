"""One class, one stage: ``run_class`` asks the policy for each decision and has the engine run it.

The decisions (``infer.policy``): the first view, whether to zoom out after a view, how the last
view comes back into the volume, which zoom-1 tiles refine it. The execution: views on the
engine (``infer.engine.Engine``), each started only if it fits the time budget
(``infer.budget.Budget``); coordinates through the frame (``infer.frame.Frame``); the result a
``infer.region.Region`` in volume coordinates. Inference (``infer.predictor``) and training
(``train.simulate``, through :func:`whole_volume_mask`) both drive this loop.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .budget import Budget
from .engine import Engine, free_device
from .frame import Frame
from .geometry import Crop, bbox_of, crop_to_patch_nearest, make_crop, patch_to_region
from .policy import (Policy, gated_flips, initial_view, refine_tiles, refines, upsample, wants_zoom_out,
                     zoom_step)
from .prompts import ClassPrompts
from .region import Region

log = logging.getLogger("infer")
Vec3 = Tuple[int, int, int]
Box = Tuple[Vec3, Vec3]


@dataclass(frozen=True)
class ClassInput:
    """One class in the policy's frame: the normalised ``image`` (D, H, W) float32, the class's
    ``prompts`` and previous mask ``prev`` (D, H, W) bool or None, and ``prev_box`` =
    ``bbox_of(prev)`` when already known (None: computed when a decision needs it)."""

    image: torch.Tensor
    prompts: ClassPrompts
    prev: Optional[torch.Tensor] = None
    prev_box: Optional[Box] = None


@dataclass
class Coarse:
    """The last view kept by the zoom-out loop: its probability ``prob`` (patch-space), ``crop``
    and nominal ``zoom``."""

    prob: torch.Tensor
    crop: Crop
    zoom: float


def first_view(policy: Policy, prompts: ClassPrompts, prev: Optional[torch.Tensor],
               patch: Sequence[int], prev_box: Optional[Box] = None) -> Tuple[list, float]:
    """(centre, zoom) of the first view (``infer.policy.initial_view``), the previous mask's box
    taken from ``prev`` when the policy needs it and ``prev_box`` is not given."""
    if prev_box is None and prev is not None and prompts.clicks and policy.click_zoom == "fit":
        prev_box = bbox_of(prev)
    return initial_view(policy, prompts, prev_box, patch)


def has_prompt(policy: Policy, prompts: ClassPrompts) -> bool:
    """Whether the class has anything to run a view on (not marked done, a click or a box)."""
    view_box = prompts.box if policy.box_view == "box" else prompts.extent
    return not prompts.done and bool(prompts.clicks or view_box is not None)


def run_class(engine: Engine, policy: Policy, x: ClassInput, budget: Budget, frame: Frame) -> Optional[Region]:
    """Predict one class: the first view, zoom-out steps while the policy asks and the budget
    allows, the last view back into the volume, refinement tiles. Returns the class's new values
    in volume coordinates, or None to keep the previous mask (nothing to prompt with). Raises
    ``TimeoutError`` when not even the first view fits the budget. A device out-of-memory error in
    a zoom-out step keeps the smaller zoom's result (event ``smaller_zoom``)."""
    if not has_prompt(policy, x.prompts):
        return None
    center, zoom = first_view(policy, x.prompts, x.prev, engine.patch, x.prev_box)
    with engine.gated(gated_flips(policy, x.prompts.stage), policy.mirror_gate):
        coarse = zoom_out(engine, policy, x, budget, center, zoom)
        if coarse is None:
            raise TimeoutError("no time left for a forward pass: keeping the previous mask")
        region = Region(*upsample(policy, coarse.prob, frame.to_volume(coarse.crop), frame.volume))
        if refines(policy, coarse.zoom, coarse.crop):
            region = Refinement(engine, policy, x, budget, frame).run(region, center)
    return region


def whole_volume_mask(engine: Engine, policy: Policy, x: ClassInput) -> np.ndarray:
    """One class predicted over the whole volume without a time limit (``run_class`` in the
    volume's own frame), as a (D, H, W) bool mask: its values > 0.5, the previous mask where it
    leaves the values open and where it has nothing to prompt with (all False without one). The
    caller chooses the autograd mode: training runs it under ``torch.no_grad``."""
    shape = tuple(x.image.shape)
    region = run_class(engine, policy, x, Budget(), Frame.whole(shape))
    if region is None:
        return np.zeros(shape, dtype=bool) if x.prev is None else x.prev.cpu().numpy().astype(bool)
    return region.binary(x.prev, shape)


def zoom_out(engine: Engine, policy: Policy, x: ClassInput, budget: Budget, center: Sequence[float],
             zoom: float) -> Optional[Coarse]:
    """The first view at (``center``, ``zoom``), then zoom-out steps while the policy wants them
    and the budget allows; the last view kept, or None when none fitted."""
    crop = make_crop(center, zoom, engine.patch)
    shape = tuple(x.image.shape)
    kept = None
    while engine.fits(budget, x.prompts):
        try:
            new = engine.view(x.image, x.prompts, x.prev, crop, budget)
        except torch.OutOfMemoryError:
            if kept is None:
                raise
            log.warning("device out of memory at zoom %.2f: keeping the smaller zoom", max(crop.scale))
            engine.report("smaller_zoom", zoom=max(crop.scale))
            free_device(engine.device)
            break
        if policy.keep_lost and kept is not None and bool((kept.prob > 0.5).any()) and not bool((new > 0.5).any()):
            log.warning("zooming out to %.2f lost the object: keeping the smaller zoom", max(crop.scale))
            break
        kept = Coarse(new, crop, zoom)
        nxt = None if policy.zoom_out == "none" else zoom_step(policy, center, zoom, crop, engine.patch)
        if nxt is None:
            break
        prev_patch = None
        if policy.zoom_out == "border_change" and x.prev is not None:
            prev_patch = crop_to_patch_nearest(x.prev, crop)
        if not wants_zoom_out(policy, new, crop, shape, prev_patch):
            break
        zoom, crop = nxt
    return kept


class Refinement:
    """Full-resolution refinement of a zoomed-out prediction: zoom-1 tiles where
    ``infer.policy.refine_tiles`` puts them, each predicted with the coarse mask pasted into the
    previous mask (pseudo-lasso on box+ when ``policy.lasso``). "tiles": tiles overwrite the
    coarse values they cover; "diff": the previous mask is updated tile by tile and only the
    tiles are pasted (NaN elsewhere). Tiles stop when the time budget runs out (what is left
    keeps the coarse values, or the previous mask)."""

    def __init__(self, engine: Engine, policy: Policy, x: ClassInput, budget: Budget, frame: Frame):
        self.engine, self.policy, self.x, self.budget, self.frame = engine, policy, x, budget, frame

    def tiles(self, region: Region, center: Sequence[float]):
        """``(crops, running)``: the tiles' crops (frame coordinates) and the running previous
        mask (the class's previous mask with the coarse label pasted over the frame's part)."""
        shape = tuple(self.x.image.shape)
        inner, flo, fhi = self.frame.inner(region.values, region.lo, region.hi)
        rng = np.random.RandomState(0)  # the cover's random fallback: reproducible
        patch = self.engine.patch
        starts = refine_tiles(self.policy, (inner, flo, fhi), self.x.prev, shape, patch,
                              [int(round(c)) for c in center], rng)
        if not starts:
            return [], None
        prev = self.x.prev
        running = torch.zeros(shape, dtype=torch.bool, device=self.engine.device) if prev is None else prev.clone()
        running[tuple(slice(a, b) for a, b in zip(flo, fhi))] = inner > 0.5
        return [Crop(lo=tuple(t), size=patch, patch=patch) for t in starts], running

    def canvas(self, region: Region, crops: List[Crop]) -> Region:
        """What the tiles are pasted into: "diff": NaN over the tiles' union in the volume;
        "tiles": a copy of the coarse values."""
        if self.policy.refine != "diff":
            return Region(region.values.clone(), region.lo, region.hi)
        lo, hi = region.lo, region.hi
        wins = [w for w in (self.frame.to_volume(c).inside(self.frame.volume) for c in crops)
                if all(h > l for l, h in zip(*w))]
        if wins:
            lo = tuple(min(w[0][a] for w in wins) for a in range(3))
            hi = tuple(max(w[1][a] for w in wins) for a in range(3))
        out = torch.full(tuple(h - l for l, h in zip(lo, hi)), float("nan"), device=self.engine.device)
        return Region(out, lo, hi)

    def run(self, region: Region, center: Sequence[float]) -> Region:
        crops, running = self.tiles(region, center)
        if not crops:
            return region
        x, shape = self.x, tuple(self.x.image.shape)
        box_mask = running.clone() if self.policy.lasso and x.prompts.box is not None else None
        out = self.canvas(region, crops)
        for crop in crops:
            if not self.engine.fits(self.budget, x.prompts):
                break
            prob = self.engine.view(x.image, x.prompts, running, crop, self.budget, box_mask)
            if self.policy.refine == "diff":
                pv, plo, phi = patch_to_region(prob, crop, shape)
                running[tuple(slice(a, b) for a, b in zip(plo, phi))] = pv > 0.5
            _paste(out, *self.frame.paste(prob, crop))
        return out


def _paste(out: Region, vals: torch.Tensor, lo: Sequence[int], hi: Sequence[int]) -> None:
    """Write ``vals`` (over ``[lo, hi)`` of the volume) into ``out`` where the two overlap."""
    a0 = [max(lo[a], out.lo[a]) for a in range(3)]
    a1 = [min(hi[a], out.hi[a]) for a in range(3)]
    if any(e <= b for b, e in zip(a0, a1)):
        return
    out.values[tuple(slice(a0[a] - out.lo[a], a1[a] - out.lo[a]) for a in range(3))] = \
        vals[tuple(slice(a0[a] - lo[a], a1[a] - lo[a]) for a in range(3))]
