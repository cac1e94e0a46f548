"""Prompt simulation for training ("dynamic prompt generation").

One training example for one class of one case, built exactly as inference sees it:

1. First interaction: with probability ``p_box`` the organizer's box (``evaluation.boxes.box_for_mask``:
   ``z_min..z_max`` and a jittered 2D box on ``z_mid``), otherwise one click from the empty
   prediction (``evaluation.clicks.next_click`` against an all-zero mask: the centre of the largest
   ground-truth component, always a foreground click).
2. With probability ``p_second``, a second step: the network is run without gradients through the
   inference's own per-class loop (``infer.interaction.whole_volume_mask`` -> ``run_class`` on
   an engine built on the network being trained: crop choice, zooming out, resampling back into
   the volume, as the interaction policy decides), the organizer's click is placed on
   that prediction (``evaluation.clicks.next_click``: largest 26-connected error component,
   maximum-EDT voxel, fg/bg by the truth), and the previous-mask and click channels are updated
   (the class's prompts parsed by ``infer.case.ClassEntry``, as a case's are).
   Without the second step (or when the first prediction is already perfect) the example trains
   on the first interaction with an empty previous mask, which is what the box stage and the
   first click of a no-box case feed the model.
3. The example is the network input for the final prompts on the crop the interaction policy
   chooses (``infer.interaction.first_view``, inference's own rule; with probability ``p_zoom_out`` the crop reached after
   one or two zoom-out steps, ``infer.policy.view_crop``), and the ground truth resampled onto
   that crop. Refinement examples (``p_refine``) take a zoom-1 tile drawn by
   ``infer.policy.sample_tile`` over the coarse prediction.

The crop decisions come from ``infer.policy`` alone, so examples that need no network (no second
step) are built from a :class:`SimModel` without an engine (its card and policy); one that needs
the network then raises :class:`ModelNeeded`. Crops are taken in the whole volume (the
policy's ``crop_nonzero`` is not applied here). Everything is in (z, y, x) voxel order of ``imgs``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from evaluation.boxes import box_for_mask
from evaluation.clicks import Click, ClickState, next_click
from infer.card import ModelCard
from infer.engine import Engine, network_input
from infer.geometry import Crop, crop_to_patch
from infer.interaction import ClassInput, first_view, whole_volume_mask
from infer.policy import Policy, mirror_flips, policy_for, sample_tile, view_crop
from infer.case import ClassEntry
from infer.prompts import ClassPrompts


@dataclass
class Example:
    """``x`` (C, *patch) float32 network input; ``target`` (*patch) float32 in {0, 1}.

    ``first``: "box" or "click"; ``click``: the second-step click (None without a second step);
    ``first_pred``: (D, H, W) bool prediction the second-step click was placed on (else None);
    ``crop``: the crop ``x`` was sampled on; ``prompts``: the final prompts."""
    x: torch.Tensor
    target: torch.Tensor
    first: str
    click: Optional[Click]
    first_pred: Optional[np.ndarray]
    crop: Crop
    prompts: ClassPrompts


class ModelNeeded(Exception):
    """The example needs a network prediction and the model has no network."""


@dataclass(frozen=True)
class SimModel:
    """What the prompt simulation needs of a model: its ``card``, the interaction ``policy``
    (``infer.policy``) whose decisions the examples follow and, for the examples that need a
    prediction (second step, refinement tiles), an ``engine`` (``infer.engine.Engine``) on the
    network. Without one (:meth:`without_network`, what data-loader workers get) such an example
    raises :class:`ModelNeeded`."""

    card: ModelCard
    policy: Policy
    engine: Optional[Engine] = None

    @classmethod
    def of(cls, network: Optional[torch.nn.Module], card: ModelCard, device: torch.device,
           policy: Optional[str | Policy] = None) -> "SimModel":
        """The model of ``network`` (on ``device``; its train/eval mode is left as it is: its
        layers compute the same in both; None: no engine) with ``policy``: a preset name, a spec
        or a ``Policy``; None: the card's, else the default (``infer.policy.policy_for``)."""
        pol = policy_for(card, policy)
        if network is None:
            return cls(card, pol)
        return cls(card, pol, Engine(network, card, device, mirror_flips(pol)))

    def without_network(self) -> "SimModel":
        """The same card and policy without the engine (picklable, for data-loader workers)."""
        return SimModel(self.card, self.policy)

    @property
    def device(self) -> torch.device:
        """The engine's device (the CPU without one)."""
        return self.engine.device if self.engine is not None else torch.device("cpu")

    def predict(self, image: torch.Tensor, prompts: ClassPrompts, autozoom: bool = True) -> np.ndarray:
        """The binary prediction of one class with no previous mask over the whole volume,
        (D, H, W) bool, without gradients (``infer.interaction.whole_volume_mask``);
        ``autozoom=False``: the policy without zooming out and without refinement (the first crop
        only). Raises :class:`ModelNeeded` without an engine, before it reads ``image``."""
        if self.engine is None:
            raise ModelNeeded
        policy = self.policy if autozoom else self.policy.replace(zoom_out="none", refine="none")
        with torch.no_grad():
            return whole_volume_mask(self.engine, policy, ClassInput(image, prompts))


def make_input(card: ModelCard, image: torch.Tensor, prompts: ClassPrompts,
               prev_k: Optional[torch.Tensor], crop: Crop) -> torch.Tensor:
    """The network input the engine builds for one class on ``crop``, without its batch axis:
    (C, *patch) float32 (``infer.engine.network_input``: one place for both)."""
    return network_input(image, prompts, prev_k, crop, card, image.device)[0]


def training_crop(policy: Policy, patch, prompts: ClassPrompts, prev_k: Optional[torch.Tensor],
                  zoom_steps: int = 0) -> Crop:
    """The policy's first crop, or (``zoom_steps`` > 0) the crop its autozoom reaches after that
    many zoom-out steps (``infer.policy.view_crop``)."""
    center, zoom = first_view(policy, prompts, prev_k, patch)
    return view_crop(policy, center, zoom, patch, zoom_steps)


def refine_tile(policy: Policy, mask: np.ndarray, patch, rng: np.random.Generator) -> Crop:
    """A zoom-1 crop of ``patch`` voxels over the coarse prediction ``mask`` ((D, H, W) bool,
    non-empty), drawn by ``infer.policy.sample_tile`` over its bounding box."""
    nz = np.nonzero(mask)
    box = (tuple(int(v.min()) for v in nz), tuple(int(v.max()) + 1 for v in nz))
    p = tuple(int(v) for v in patch)
    return Crop(lo=sample_tile(policy, box, p, rng), size=p, patch=p)


def _bounds(mask: np.ndarray) -> tuple[list, list]:
    """Half-open bounding box ``(lo, hi)`` of a non-empty (D, H, W) mask."""
    lo, hi = [], []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        lo.append(int(hit[0]))
        hi.append(int(hit[-1]) + 1)
    return lo, hi


def local_click(pred: np.ndarray, gt: np.ndarray) -> Optional[Click]:
    """``evaluation.clicks.next_click(pred, gt)`` computed on the bounding box of ``pred | gt``
    only. The click is the same: every error voxel (``pred != gt``) lies in that box, so the
    error components are the same; cc3d numbers components in raster order, which cutting the box
    keeps (ties between equally large components go the same way); and the EDT already works on
    the chosen component's own bounding box. ``pred``, ``gt``: (D, H, W) bool, ``gt`` non-empty."""
    lo, hi = _bounds(pred | gt)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    c = next_click(pred[box], gt[box])
    return None if c is None else Click(c.kind, tuple(int(v) + o for v, o in zip(c.zyx, lo)))


def first_click(gt: np.ndarray) -> Click:
    """``evaluation.clicks.next_click(np.zeros_like(gt), gt)`` (the first click of a no-box case:
    the centre of ``gt``'s largest component), computed on ``gt``'s bounding box as
    :func:`local_click` does, without a volume-sized empty prediction. ``gt``: (D, H, W) bool,
    non-empty."""
    lo, hi = _bounds(gt)
    sub = gt[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    c = next_click(np.zeros_like(sub), sub)
    return Click(c.kind, tuple(int(v) + o for v, o in zip(c.zyx, lo)))


def crop_target(gt: torch.Tensor, crop: Crop) -> torch.Tensor:
    """The training target on ``crop``: (*patch) float32 in {0, 1}, ``crop_to_patch(gt, crop) >
    0.5`` for ``gt`` (D, H, W) bool. At zoom 1 (``crop.size == crop.patch``) linear resampling
    reads every voxel with weight 1 and its neighbour with weight 0, so that is the crop of ``gt``
    itself, 0 outside the volume: taken directly here, without the three resampling passes."""
    if tuple(crop.size) != tuple(crop.patch):
        return (crop_to_patch(gt, crop) > 0.5).float()
    out = torch.zeros(tuple(crop.patch), dtype=torch.float32, device=gt.device)
    lo, hi = crop.inside(gt.shape)
    if all(h > l for l, h in zip(lo, hi)):
        dst = tuple(slice(l - c, h - c) for l, h, c in zip(lo, hi, crop.lo))
        out[dst] = gt[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].float()
    return out


def harness_prompts(shape, box: Optional[dict], state: Optional[ClickState], style: str) -> ClassPrompts:
    """The prompts of the one class the harness's ``box`` (or None) and click ``state`` (or
    None) describe, parsed by inference's own rule (``infer.case.ClassEntry``)."""
    clicks = order = None
    if state is not None:
        clicks, order = state.clicks[0], state.clicks_order[0]
    return ClassEntry.parse(box, clicks, order, shape).prompts(style)


def simulate_example(model: SimModel, imgs: np.ndarray, gt: np.ndarray, rng: np.random.Generator,
                     p_box: float = 0.5, p_second: float = 0.5, image: Optional[torch.Tensor] = None,
                     autozoom: bool = True, p_zoom_out: float = 0.0, p_refine: float = 0.0) -> Example:
    """One training example for the binary object ``gt`` ((D, H, W) bool, non-empty) of ``imgs``.

    ``model``: the card and interaction policy the example follows, and the engine that runs the
    network for the second step and refinement examples (without one, such an example raises
    :class:`ModelNeeded`).

    ``image``: ``infer.predictor.normalize_image(imgs)`` when the caller already has it (else it
    is computed on first use, so an example that raises :class:`ModelNeeded` never pays for it).
    ``autozoom``: let the no-grad first prediction zoom out as the policy says (default).
    ``p_zoom_out``: probability that the trained-on crop is the one the policy's autozoom
    reaches after one or two x1.5 steps (equally likely) instead of its first crop, so that the
    network also learns the zoomed-out views autozoom feeds it at inference.
    Random draws, in this order: box or click (``p_box``), box jitter (box only), second step
    (``p_second``), zoom-out (``p_zoom_out``, then the number of steps).
    """
    card, policy = model.card, model.policy
    patch = tuple(int(p) for p in card.patch_size)
    dev = image.device if image is not None else model.device

    def the_image() -> torch.Tensor:
        nonlocal image
        if image is None:
            from infer.predictor import normalize_image
            image = normalize_image(imgs, dev)
        return image
    style = card.box_style
    if rng.random() < p_box:
        first, box, state = "box", box_for_mask(gt, rng), None
    else:
        first, box, state = "click", None, ClickState.empty(1)
        state.add(0, first_click(gt))
    prompts = harness_prompts(imgs.shape, box, state, style)
    prev_k = None
    click, first_pred = None, None
    u = rng.random()
    crop = None
    if p_second <= u < p_second + p_refine:
        _, zoom = first_view(policy, prompts, None, patch)
        if zoom > 1 + 1e-6:
            # without a network predict raises ModelNeeded before it reads the image
            pred = model.predict(the_image() if model.engine is not None else None, prompts,
                                 autozoom=False)
            if pred.any():
                crop = refine_tile(policy, pred, patch, rng)
                prev_k = torch.from_numpy(pred).to(dev)
                first_pred = pred
    if u < p_second:
        pred = model.predict(the_image() if model.engine is not None else None, prompts, autozoom)
        click = local_click(pred, gt)
        if click is not None:
            first_pred = pred
            state = state or ClickState.empty(1)
            state.add(0, click)
            prompts = harness_prompts(imgs.shape, box, state, style)
            prev_k = torch.from_numpy(pred).to(dev)
    if crop is None:
        steps = int(rng.integers(1, 3)) if rng.random() < p_zoom_out else 0
        crop = training_crop(policy, patch, prompts, prev_k, steps)
    with torch.no_grad():
        x = make_input(card, the_image(), prompts, prev_k, crop)
        target = crop_target(torch.from_numpy(gt).to(dev), crop)
    return Example(x, target, first, click, first_pred, crop, prompts)
