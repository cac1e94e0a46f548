"""The interaction policy: where to crop, how far to zoom, when to zoom out, which refinement tiles
to run and how classes merge. Pure decisions: no network, no I/O, no state.

The predictor (``infer.predictor``) executes these decisions and alone runs the network, guards
the time budget and merges classes; training (``train.simulate``) reads the same decisions for the
crops it trains on. A :class:`Policy` is a frozen set of knobs; ``PRESETS`` names two:

* ``"reference"``: nnInteractive 1.1.5's inference loop for the v1.0 weights (its
  ``nnInteractiveInferenceSession._predict`` as driven by its CVPR 2025 challenge script): crop the
  case to the image's non-zero bounding box; predict once, centred on the newest interaction (a
  point at zoom 1, a box at the zoom that fits it plus a third of a patch); zoom out by 1.5 up to
  4 while the label on a crop face changes against the previous mask; upsample the coarse label
  trilinearly (>= 0.5); refine at zoom 1 only the tiles covering where the coarse label differs
  from the previous mask (opened by a 5^3 min- then max-pool), with box+ restricted to the coarse
  mask (pseudo-lasso); classes merged by pasting labels in class order.
* ``"project"``: this project's own loop (see docs/POLICY.md for every difference).

``parse_policy("reference,refine=none")`` builds a preset with knobs overridden (CLI use).

Conventions: (z, y, x) voxel indices; boxes and windows half-open ``(lo, hi)``; patch-space
tensors have the network patch's shape.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .cover import cover_tiles, open_mask
from .geometry import (Crop, bbox_of, make_crop, patch_to_region, patch_to_region_torch, touches_border,
                       zoom_for_extent)

Vec3 = Tuple[int, int, int]
Box = Tuple[Vec3, Vec3]

CHOICES = {
    "box_view": ("extent", "box"),
    "click_zoom": ("fit", "one"),
    "zoom_out": ("none", "touch", "border_change"),
    "zoom_value": ("scale", "nominal"),
    "upsample": ("prob", "label"),
    "refine": ("none", "tiles", "diff"),
    "merge": ("prob", "label"),
    "mirror_axes": ("zyx", "zy", "zx", "yx", "z", "y", "x"),
}


@dataclass(frozen=True)
class Policy:
    """Knobs of the interaction loop (docs/POLICY.md describes each).

    crop_nonzero: work inside the image's non-zero bounding box (nnInteractive does this first).
    box_view: first view of a box stage. "extent": centred on the object's 3D extent
      (``z_min..z_max`` by the 2D box), zoom ``max((extent + context * patch) / patch)``;
      "box": nnInteractive's rule on the drawn box: centre ``round((lo + hi) / 2)``, zoom
      ``max(1, max((size + patch // 3) / patch))``.
    click_zoom: first zoom of a click stage (centred on the newest click). "fit": so that the
      previous mask and the box fit around the click; "one": zoom 1 (nnInteractive).
    context: fraction of a patch of context around the extent ("extent" view only).
    max_zoom, zoom_step: zoom-out steps multiply the zoom by ``zoom_step``, capped at ``max_zoom``.
    zoom_out: when to zoom out. "none"; "touch": the foreground reaches a crop face that lies
      inside the volume; "border_change": the label on a crop face differs from the previous
      mask's there (nnInteractive's thresholds, :func:`border_change`).
    zoom_value: the zoom that zoom-out steps multiply and that decides whether the last view was
      zoomed out (and so is refined): "scale": the crop's actual scale ``round(patch * zoom) /
      patch``; "nominal": the zoom itself (nnInteractive's ``zoom_out_factor``).
    keep_lost: when a zoom-out step loses the whole object, keep the smaller zoom's result.
    upsample: coarse patch -> volume. "prob": the foreground probability, trilinear;
      "label": the argmax label, trilinear, then ``>= 0.5`` (nnInteractive).
    refine: full-resolution refinement of a zoomed-out prediction. "none"; "tiles": zoom-1 tiles
      over the coarse object's bounding box (at most ``max_refine_patches``); "diff":
      nnInteractive's tiles over the opened difference between coarse label and previous mask
      (only the tiles are pasted, the coarse label is not).
    lasso: during refinement, restrict the box+ channel to the coarse mask (pseudo-lasso).
    merge: how the classes of a case become one label map. "prob": by probability (background =
      prod(1 - p_c), argmax); "label": each class pastes its labels, a later class overwrites an
      earlier one. Spelt ``paste`` before (``ALIASES``): that spelling is still read.
    mirror: test-time augmentation: average the softmax over the axis flips of the input.
    mirror_axes: the axes those flips combine, in z, y, x order: "zyx" (8 flips), "yx" (the 4
      in-plane flips, half the passes), ... (nnU-Net's allowed mirroring axes).
    mirror_last: gated mirroring at the last click stage only (``mirror`` off): a class whose
      clicks_order holds ``last_click`` or more entries has each view predicted plain and under
      the ``mirror_axes`` flips; the mean is kept when its mask agrees with the plain one (Dice
      >= ``mirror_gate``), else the plain prediction (:func:`gated_flips`, ``Engine.gated``).
    mirror_gate: that agreement threshold, in [0, 1].
    last_click: the click stage that counts as the last (the organizer's flow has five).
    """

    name: str = "project"
    crop_nonzero: bool = False
    box_view: str = "extent"
    click_zoom: str = "fit"
    context: float = 1 / 3
    max_zoom: float = 4.0
    zoom_step: float = 1.5
    zoom_out: str = "touch"
    zoom_value: str = "scale"
    keep_lost: bool = True
    upsample: str = "prob"
    refine: str = "tiles"
    max_refine_patches: int = 27
    lasso: bool = False
    merge: str = "prob"
    mirror: bool = False
    mirror_axes: str = "zyx"
    mirror_last: bool = False
    mirror_gate: float = 0.9
    last_click: int = 5

    def __post_init__(self):
        for k, allowed in CHOICES.items():
            if getattr(self, k) not in allowed:
                raise ValueError(f"policy {k}={getattr(self, k)!r}: one of {allowed}")
        if not (1 <= self.max_zoom <= 64 and 1 < self.zoom_step <= 64 and 0 <= self.context <= 64):
            raise ValueError(f"policy needs 1 <= max_zoom <= 64, 1 < zoom_step <= 64, 0 <= context <= 64 "
                             f"(finite): {self}")
        if self.max_refine_patches < 0:
            raise ValueError("policy max_refine_patches must be >= 0")
        if not (0.0 <= self.mirror_gate <= 1.0) or self.last_click < 1:
            raise ValueError(f"policy needs 0 <= mirror_gate <= 1 and last_click >= 1: {self}")

    def replace(self, **kw) -> "Policy":
        """A copy with knobs changed (an old spelling of ``ALIASES`` accepted)."""
        return dataclasses.replace(self, **{ALIASES.get(k, k): v for k, v in kw.items()})

    @property
    def paste(self) -> str:
        """The old spelling of :attr:`merge` (read only)."""
        return self.merge


# old knob spellings, still read in policy specs (a model card may carry them) -> today's names
ALIASES = {"paste": "merge"}


PRESETS = {
    "project": Policy(name="project"),
    "reference": Policy(name="reference", crop_nonzero=True, box_view="box", click_zoom="one",
                        zoom_out="border_change", zoom_value="nominal", keep_lost=False,
                        upsample="label", refine="diff", lasso=True, merge="label"),
}
# For release weights: nnInteractive's loop, but overlapping classes merged by probability (the
# coarse probability upsampled, not the label, so that there is a probability to merge by);
# docs/POLICY.md gives the evidence.
PRESETS["release"] = PRESETS["reference"].replace(name="release", upsample="prob", merge="prob")
DEFAULT = "project"


def _value(field: dataclasses.Field, text: str):
    t = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    if t == "bool":
        low = text.strip().lower()
        if low in ("1", "true", "on", "yes"):
            return True
        if low in ("0", "false", "off", "no"):
            return False
        raise ValueError(f"policy {field.name}: not a boolean: {text!r}")
    if t == "int":
        return int(text)
    if t == "float":
        return float(text)
    return text.strip()


def parse_policy(spec) -> Policy:
    """A :class:`Policy` from a Policy (returned as is), None (the default preset) or a string
    ``"preset[,knob=value...]"`` (``"reference"``, ``"project,mirror=on"``,
    ``"reference,refine=none"``). The name of a modified preset records the spec."""
    if isinstance(spec, Policy):
        return spec
    if spec is None or not str(spec).strip():
        return PRESETS[DEFAULT]
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    base, overrides = parts[0], parts[1:]
    if "=" in base:
        base, overrides = DEFAULT, parts
    if base not in PRESETS:
        raise ValueError(f"unknown policy preset {base!r} (one of {sorted(PRESETS)})")
    fields = {f.name: f for f in dataclasses.fields(Policy) if f.name != "name"}
    kw = {}
    for item in overrides:
        key, sep, val = item.partition("=")
        key = ALIASES.get(key.strip(), key.strip())
        if not sep or key not in fields:
            raise ValueError(f"policy override {item!r}: expected knob=value, knob one of {sorted(fields)}")
        kw[key] = _value(fields[key], val)
    if not kw:
        return PRESETS[base]
    return PRESETS[base].replace(name=",".join([base] + overrides), **kw)


def policy_for(card, policy=None) -> Policy:
    """The interaction policy a model runs with: ``policy`` (a preset name, a spec or a
    ``Policy``) when given, else its card's ``policy`` field, else the default preset."""
    return parse_policy(policy if policy is not None else getattr(card, "policy", None))


# the predictor's keyword overrides: flags that switch a knob off, and knobs taken as they are
SWITCHES = {"autozoom": ("zoom_out", "none"), "refine": ("refine", "none")}
OVERRIDES = ("max_zoom", "context", "max_refine_patches")


def with_overrides(policy: Policy, **kw) -> Policy:
    """``policy`` with the predictor's keyword overrides applied: ``autozoom=False`` ->
    ``zoom_out="none"``, ``refine=False`` -> ``refine="none"`` (True or None change nothing), and
    ``max_zoom``, ``context``, ``max_refine_patches`` as given (None: unchanged). Any other
    keyword raises TypeError, as a misspelt argument would."""
    unknown = sorted(set(kw) - set(SWITCHES) - set(OVERRIDES))
    if unknown:
        raise TypeError(f"unknown predictor option(s) {unknown}; known: {sorted(SWITCHES) + list(OVERRIDES)}")
    knobs = {k: v for k, v in kw.items() if k in OVERRIDES and v is not None}
    for flag, (knob, off) in SWITCHES.items():
        if kw.get(flag) is False:
            knobs[knob] = off
    return policy.replace(**knobs) if knobs else policy


def mirror_flips(policy: Policy) -> List[Tuple[int, ...]]:
    """The flips one view is predicted under, as dims of a (B, C, Z, Y, X) tensor: ``[()]``
    without mirroring, else every combination of ``policy.mirror_axes`` (the identity first)."""
    if not policy.mirror:
        return [()]
    return _axis_flips(policy.mirror_axes)


def _axis_flips(axes: str) -> List[Tuple[int, ...]]:
    dims = [2 + "zyx".index(a) for a in axes]
    return [tuple(d for j, d in enumerate(dims) if i >> j & 1) for i in range(2 ** len(dims))]


def gated_flips(policy: Policy, stage: int) -> Optional[List[Tuple[int, ...]]]:
    """The flips of gated mirroring for a class at click stage ``stage`` (its clicks_order
    length; 0 in the box stage), or None when this view is predicted as usual: ``mirror_last``
    on, ``mirror`` off (already mirrored otherwise) and ``stage >= last_click``."""
    if not policy.mirror_last or policy.mirror or stage < policy.last_click:
        return None
    return _axis_flips(policy.mirror_axes)


# ---------------------------------------------------------------------------- first view
def box_view_reference(box: Box, patch: Sequence[int]) -> Tuple[List[int], float]:
    """nnInteractive's first view of a box ``(lo, hi)``: centre ``round((lo + hi) / 2)`` per axis
    (Python's round: halves go to the even integer), zoom ``max(1, max_a (size_a + patch_a // 3)
    / patch_a)`` (uncapped here; the caller caps it)."""
    lo, hi = box
    center = [int(round((l + h) / 2)) for l, h in zip(lo, hi)]
    zoom = max(1.0, max((h - l + p // 3) / p for l, h, p in zip(lo, hi, patch)))
    return center, float(zoom)


def initial_view(policy: Policy, prompts, prev_box: Optional[Box], patch: Sequence[int]):
    """(centre, zoom) of the first crop for a class's ``prompts`` (``infer.prompts.ClassPrompts``);
    ``prev_box``: bounding box of the class's previous mask, or None. The zoom is capped at
    ``policy.max_zoom``. Box stage (no clicks): by ``policy.box_view``; click stage: centred on
    the newest click, zoom by ``policy.click_zoom``."""
    if not prompts.clicks:
        if policy.box_view == "box":
            center, zoom = box_view_reference(prompts.box, patch)
            return center, min(zoom, policy.max_zoom)
        lo, hi = prompts.extent
        center = [(l + h - 1) / 2.0 for l, h in zip(lo, hi)]
        return center, zoom_for_extent([h - l for l, h in zip(lo, hi)], patch, policy.context, 1.0,
                                       policy.max_zoom)
    c = prompts.clicks[-1][1]
    if policy.click_zoom == "one":
        return list(c), 1.0
    boxes = [b for b in (prompts.extent, prev_box) if b is not None]
    # half-width around the click that covers every box, as a full extent
    ext = [2 * max([0] + [max(c[a] - b[0][a], b[1][a] - 1 - c[a]) for b in boxes]) + 1 for a in range(3)]
    return list(c), zoom_for_extent(ext, patch, policy.context, 1.0, policy.max_zoom)


# ---------------------------------------------------------------------------- zooming out
def next_zoom(policy: Policy, zoom: float) -> Optional[float]:
    """The zoom of the next zoom-out step, or None when ``zoom`` is already at ``max_zoom``."""
    if zoom >= policy.max_zoom - 1e-6:
        return None
    return min(zoom * policy.zoom_step, policy.max_zoom)


def zoom_of(policy: Policy, zoom: float, crop: Crop) -> float:
    """The zoom of a view taken at nominal ``zoom`` on ``crop``, by ``policy.zoom_value``."""
    return float(zoom) if policy.zoom_value == "nominal" else max(crop.scale)


def refines(policy: Policy, zoom: float, crop: Crop) -> bool:
    """Whether the last view (nominal ``zoom`` on ``crop``) is zoomed out and gets refined."""
    if policy.refine == "none":
        return False
    z = zoom_of(policy, zoom, crop)
    return z > 1 if policy.zoom_value == "nominal" else z > 1 + 1e-6


def zoom_step(policy: Policy, center: Sequence[float], zoom: float, crop: Crop,
              patch: Sequence[int]) -> Optional[Tuple[float, Crop]]:
    """One zoom-out step from the view (nominal ``zoom``, ``crop``) centred on ``center``:
    ``(new zoom, new crop)``, or None at ``max_zoom``."""
    nz = next_zoom(policy, zoom_of(policy, zoom, crop))
    return None if nz is None else (nz, make_crop(center, nz, patch))


def view_crop(policy: Policy, center: Sequence[float], zoom: float, patch: Sequence[int],
              steps: int = 0) -> Crop:
    """The crop of the first view (``center``, ``zoom``), or of the view ``steps`` zoom-out steps
    further (the same as the predictor reaches when it keeps zooming out)."""
    crop = make_crop(center, zoom, patch)
    for _ in range(steps):
        nxt = zoom_step(policy, center, zoom, crop, patch)
        if nxt is None:
            break
        zoom, crop = nxt
    return crop


def border_change(pred: torch.Tensor, prev: torch.Tensor, abs_threshold: int = 1500,
                  rel_threshold: float = 0.2, min_threshold: int = 100) -> bool:
    """nnInteractive's ``_detect_change_at_border``: for each of the 6 faces of the patch, compare
    the label ``pred`` (patch-space, 0/1) with the previous mask ``prev`` (patch-space, 0/1) there.
    A change: more than ``abs_threshold`` voxels differ, or more than ``min_threshold`` differ and
    ``max(n_prev, n_pred) / max(min(n_prev, n_pred), 1e-5) - 1 > rel_threshold``."""
    pred = pred.double()
    prev = prev.to(pred.device).double()
    for dim in range(pred.dim()):
        for idx in (0, pred.shape[dim] - 1):
            a = prev.select(dim, idx)
            b = pred.select(dim, idx)
            n_prev, n_pred = float(a.sum()), float(b.sum())
            n_diff = int((a != b).sum())
            rel = max(n_prev, n_pred) / max(min(n_prev, n_pred), 1e-5) - 1
            if n_diff > abs_threshold:
                return True
            if n_diff > min_threshold and rel > rel_threshold:
                return True
    return False


def wants_zoom_out(policy: Policy, prob: torch.Tensor, crop: Crop, shape: Sequence[int],
                   prev_patch: Optional[torch.Tensor] = None) -> bool:
    """Whether to zoom out after a prediction ``prob`` (patch-space foreground probability) on
    ``crop`` of a volume of ``shape``; ``prev_patch``: the previous mask resampled to the patch
    by nearest neighbour (``infer.geometry.crop_to_patch_nearest``; "border_change" only, None =
    empty)."""
    if policy.zoom_out == "none":
        return False
    if policy.zoom_out == "touch":
        return touches_border(prob > 0.5, crop, shape)
    label = prob > 0.5
    if prev_patch is None:
        prev_patch = torch.zeros_like(label)
    return border_change(label, prev_patch)


# ---------------------------------------------------------------------------- coarse -> volume
def upsample(policy: Policy, prob: torch.Tensor, crop: Crop, shape: Sequence[int]):
    """A prediction on ``crop`` back in the volume: ``(values, lo, hi)`` over the part of the crop
    inside ``shape``. "prob": the probability, trilinear; "label": the label (``prob > 0.5``, i.e.
    the argmax of two classes) trilinear in float64 by torch's own kernel over the whole crop
    (``infer.geometry.patch_to_region_torch``), then ``>= 0.5``, as 0./1. At zoom 1 both are a
    copy."""
    if policy.upsample == "prob":
        return patch_to_region(prob, crop, shape)
    # torch's own trilinear kernel in float64, as nnInteractive interpolates its label
    # (``.to(float)``): labels land on exact ties (0.5) and only the same kernel rounds them alike
    if crop.size == crop.patch:  # zoom 1: a copy of the label
        lo, hi = crop.inside(shape)
        return (prob > 0.5).float()[tuple(slice(l - c, h - c) for l, h, c in zip(lo, hi, crop.lo))], lo, hi
    vals, lo, hi = patch_to_region_torch((prob > 0.5).double(), crop, shape)
    return (vals >= 0.5).float(), lo, hi


# ---------------------------------------------------------------------------- refinement
def diff_map(coarse: torch.Tensor, lo: Sequence[int], hi: Sequence[int], prev: Optional[torch.Tensor],
             shape: Sequence[int]) -> torch.Tensor:
    """nnInteractive's difference map: (``shape``) bool, where the coarse label ``coarse`` (values
    over ``[lo, hi)``, > 0.5 = object) differs from the previous mask ``prev`` (``shape``, or None =
    empty), opened by :func:`open_mask` over ``[lo, hi)`` only (that box's faces replicate);
    False outside ``[lo, hi)``."""
    out = torch.zeros(tuple(shape), dtype=torch.bool, device=coarse.device)
    sl = tuple(slice(l, h) for l, h in zip(lo, hi))
    new = coarse > 0.5
    old = prev[sl].to(coarse.device) > 0.5 if prev is not None else torch.zeros_like(new)
    if new.numel():
        out[sl] = open_mask(new != old)
    return out


def fallback_tile(center: Sequence[int], patch: Sequence[int]) -> Box:
    """nnInteractive's tile when the difference map is empty: ``patch`` voxels from
    ``center - patch // 2``."""
    lo = tuple(int(c) - int(p) // 2 for c, p in zip(center, patch))
    return lo, tuple(l + int(p) for l, p in zip(lo, patch))


def tile_start_range(lo: int, hi: int, p: int) -> Tuple[int, int]:
    """Along one axis, the first and last start of a ``p``-voxel tile over the object's extent
    ``[lo, hi)``: inside it when the extent is longer than the tile, else the one start that
    centres the tile on it."""
    ext = hi - lo
    if ext > p:
        return lo, hi - p
    s = lo + (ext - p) // 2
    return s, s


def bbox_tiles(box: Box, patch: Sequence[int]) -> List[Vec3]:
    """The project's refinement tiles over an object's bounding box ``box``: per axis one tile
    when the extent fits, else enough tiles, evenly spread over :func:`tile_start_range`, to
    overlap by at least a fifth of a tile; tile starts (z, y, x) in z, y, x order."""
    starts = []
    for a in range(3):
        first, last = tile_start_range(box[0][a], box[1][a], int(patch[a]))
        ext, p = box[1][a] - box[0][a], int(patch[a])
        n = 1 if ext <= p else 1 + -(-(ext - p) // max(int(p * 0.8), 1))
        starts.append([first + (round((last - first) * i / (n - 1)) if n > 1 else 0) for i in range(n)])
    return [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]


def refine_tiles(policy: Policy, coarse, prev: Optional[torch.Tensor], shape: Sequence[int],
                 patch: Sequence[int], center: Sequence[float],
                 rng: Optional[np.random.RandomState] = None) -> List[Vec3]:
    """Starts of the zoom-1 refinement tiles after a zoomed-out prediction ``coarse`` =
    ``(values, lo, hi)`` (values over ``[lo, hi)`` of a volume of ``shape``, > 0.5 = object; an
    ``infer.region.Region`` or a plain tuple). "tiles": :func:`bbox_tiles` over the
    coarse object (none when it has no voxel or needs more than ``max_refine_patches``); "diff":
    :func:`cover_tiles` of :func:`diff_map` against ``prev``, or the :func:`fallback_tile` around
    ``center`` when that map is empty; "none": no tile."""
    if policy.refine == "none":
        return []
    coarse, lo, hi = coarse
    if policy.refine == "tiles":
        box = bbox_of(coarse > 0.5)
        if box is None:
            return []
        box = (tuple(l + b for l, b in zip(lo, box[0])), tuple(l + b for l, b in zip(lo, box[1])))
        tiles = bbox_tiles(box, patch)
        return tiles if len(tiles) <= policy.max_refine_patches else []
    diff = diff_map(coarse, lo, hi, prev, shape)
    boxes = cover_tiles(diff, patch, rng=rng)
    if not boxes:
        boxes = [fallback_tile([int(c) for c in center], patch)]
    return [b[0] for b in boxes]


def sample_tile(policy: Policy, mask_box: Box, patch: Sequence[int], rng: np.random.Generator) -> Vec3:
    """A refinement tile start drawn at random for training: per axis uniformly over
    :func:`tile_start_range` of the coarse object's bounding box ``mask_box`` (one draw per axis,
    z first), so that it overlaps the object the way the predictor's tiles do."""
    out = []
    for a in range(3):
        first, last = tile_start_range(mask_box[0][a], mask_box[1][a], int(patch[a]))
        out.append(first + (int(rng.integers(0, last - first + 1)) if last > first else 0))
    return tuple(out)  # type: ignore[return-value]


def lasso(box_channel: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """Pseudo-lasso: the box+ channel kept only where the coarse mask is > 0.5."""
    return box_channel * (coarse > 0.5).to(box_channel.dtype)
