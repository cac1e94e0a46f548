"""Prompts: from a case's ``boxes`` / ``clicks`` / ``clicks_order`` to the 7 prompt channels.

Channel order (after the image channel): [previous mask, box+, box-, point+, point-, scribble+,
scribble-], as nnInteractive v1.0 was trained. Prompts are drawn as nnInteractive draws them, in
volume space, then brought into the patch with the crop:

* a box is a solid block of 1s: on the ``z_mid`` slice only (``box_style="2d"``, how v1.0 was
  trained) or over ``z_min..z_max`` (``"3d"``); which one comes from the model card;
* a click is a soft ball: the Euclidean distance transform of a radius-r ball, divided by its
  maximum (1 at the centre, 1/sqrt(r^2 + 1) at the rim); overlapping balls combine by maximum;
* every new click multiplies the earlier clicks (both point channels) by the decay factor, so the
  click made ``n`` clicks ago weighs ``decay ** n``;
* when the crop is zoomed out (scale > 1), point channels are first dilated by a max filter of
  ``nearest odd(2 * zoom - 1)`` voxels, then every prompt channel is area-averaged onto the patch
  (the image itself is resampled linearly).

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
    """

    box: Optional[Box] = None
    extent: Optional[Box] = None
    clicks: List[Tuple[bool, Vec3]] = field(default_factory=list)
    done: bool = False


class PromptError(ValueError):
    """One class's prompts cannot be used (that class alone keeps its previous mask)."""


BOX_KEYS = ("z_min", "z_max", "z_mid", "z_mid_y_min", "z_mid_y_max", "z_mid_x_min", "z_mid_x_max")
_BOX_REQUIRED = BOX_KEYS[2:]  # z_min / z_max default to z_mid


def num_classes(case: dict) -> int:
    """K = the longest of ``boxes``, ``clicks`` and ``clicks_order`` (0 when none is given).

    The harness writes them equally long (K = len(boxes), or len(clicks) without boxes); taking
    the longest means a short or empty list never drops the later classes (and their previous
    masks): a class missing from one list simply has no prompt of that kind."""
    return max([len(case[key]) for key in ("boxes", "clicks", "clicks_order")
                if case.get(key) is not None] + [0])


def _inside(p: Sequence[int], shape: Sequence[int]) -> bool:
    return len(p) == 3 and all(0 <= int(v) < s for v, s in zip(p, shape))


def _plain_int(v, what: str) -> int:
    """``v`` as an int when it is an integer value (bool refused), else PromptError."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__index__"):
        raise PromptError(f"{what}: expected an integer, got {type(v).__name__}")
    if isinstance(v, float) and not (math.isfinite(v) and v == int(v)):
        raise PromptError(f"{what}: expected an integer, got {v!r:.20}")
    return int(v)


def chronological_clicks(clicks: dict, order: Optional[list], shape: Sequence[int]) -> List[Tuple[bool, Vec3]]:
    """Rebuild the click sequence of one class by walking ``order`` with one pointer per list.

    ``None`` entries consume nothing. Clicks that ``order`` does not account for (the two disagree)
    are appended after the ordered ones, foreground first. Clicks outside the volume are dropped.
    Raises PromptError for a click that is not three integers or an order entry that is not
    "fg" / "bg" / None.
    """
    def points(side):
        out = []
        for i, p in enumerate((clicks or {}).get(side, []) or []):
            if not isinstance(p, (list, tuple)) or len(p) != 3:
                raise PromptError(f"{side} click {i}: expected [z, y, x]")
            if type(p[0]) is int and type(p[1]) is int and type(p[2]) is int:  # as infer.io gives them
                out.append(tuple(p))
            else:
                out.append(tuple(_plain_int(v, f"{side} click {i}") for v in p))
        return out

    fg, bg = points("fg"), points("bg")
    seq: List[Tuple[bool, Vec3]] = []
    i = j = 0
    for kind in order or []:
        if kind not in ("fg", "bg", None):
            raise PromptError(f"clicks_order entry {kind!r:.20} is not 'fg', 'bg' or None")
        if kind == "fg" and i < len(fg):
            seq.append((True, fg[i]))
            i += 1
        elif kind == "bg" and j < len(bg):
            seq.append((False, bg[j]))
            j += 1
    seq += [(True, p) for p in fg[i:]] + [(False, p) for p in bg[j:]]
    return [(pos, p) for pos, p in seq if _inside(p, shape)]  # type: ignore[misc]


def box_from_dict(d: dict, shape: Sequence[int], style: str) -> Tuple[Optional[Box], Optional[Box]]:
    """Organizer box dict (inclusive integers) -> (drawn box, object extent), both half-open and
    clipped to ``shape``; (None, None) when the box is empty (``{}``) or empty after clipping.
    Inverted bounds are swapped; ``z_min`` / ``z_max`` default to ``z_mid``. Raises PromptError
    for a missing or unknown key or a value that is not an integer."""
    if not d:
        return None, None
    if not isinstance(d, dict):
        raise PromptError(f"box: expected a dict, got {type(d).__name__}")
    unknown = [key for key in d if key not in BOX_KEYS]
    missing = [key for key in _BOX_REQUIRED if key not in d]
    if unknown or missing:
        raise PromptError(f"box: unknown key(s) {[str(u)[:20] for u in unknown[:3]]}" if unknown
                          else f"box: missing key(s) {missing}")
    v = {key: _plain_int(d[key], f"box {key}") for key in d}

    def span(a, b, n):
        a, b = sorted((a, b))
        return max(a, 0), min(b + 1, n)

    zmid = v["z_mid"]
    y = span(v["z_mid_y_min"], v["z_mid_y_max"], shape[1])
    x = span(v["z_mid_x_min"], v["z_mid_x_max"], shape[2])
    z = span(v.get("z_min", zmid), v.get("z_max", zmid), shape[0])
    zmid = min(max(zmid, z[0]), max(z[1] - 1, z[0]))
    extent = ((z[0], y[0], x[0]), (z[1], y[1], x[1]))
    if any(h <= l for l, h in zip(*extent)):
        return None, None
    if style == "2d":
        return ((zmid, y[0], x[0]), (zmid + 1, y[1], x[1])), extent
    if style == "3d":
        return extent, extent
    raise ValueError(f"unknown box style {style!r}")


def _entry(case: dict, key: str, k: int):
    """Class ``k``'s entry of ``case[key]`` (None when absent); PromptError for one that
    ``infer.io`` marked unusable (any object with a ``why`` attribute)."""
    items = case.get(key)
    entry = items[k - 1] if items is not None and k - 1 < len(items) else None
    if hasattr(entry, "why"):
        raise PromptError(str(entry.why))
    return entry


def class_prompts(case: dict, k: int, box_style: str) -> ClassPrompts:
    """The prompts of class ``k`` (1-based) in ``case`` (a dict as ``infer.io.read_case`` returns).

    Raises PromptError when any of the class's entries cannot be used: the caller keeps that
    class's previous mask, the other classes are unaffected."""
    shape = case["imgs"].shape
    out = ClassPrompts()
    box, clicks, order = (_entry(case, key, k) for key in ("boxes", "clicks", "clicks_order"))
    if box:
        out.box, out.extent = box_from_dict(box, shape, box_style)
    if clicks is not None and not isinstance(clicks, dict):
        raise PromptError(f"clicks: expected a dict, got {type(clicks).__name__}")
    if clicks is not None or order:
        out.clicks = chronological_clicks(clicks or {}, order, shape)
        out.done = bool(order) and order[-1] is None
    return out


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
    """nnInteractive's dilation kernel for point channels at a zoom: nearest odd of 2*zoom - 1."""
    return int(math.floor((2 * zoom - 1 - 1) / 2 + 0.5)) * 2 + 1


def encode(prompts: ClassPrompts, crop: Crop, prev_mask: Optional[torch.Tensor], radius: int,
           decay: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 7 prompt channels in patch space: (7, *crop.patch) float32 on ``device``.

    ``prev_mask``: (D, H, W) tensor (bool or float) of the class's previous mask, or None.
    """
    dev = torch.device(device)
    zoom = max(crop.scale)
    mode = "area" if zoom > 1 else "linear"
    out = torch.zeros((7,) + tuple(crop.patch), dtype=torch.float32, device=dev)
    if prev_mask is not None:
        out[0] = crop_to_patch(prev_mask.to(dev), crop, mode=mode)
    if prompts.box is not None:
        lo, hi = prompts.box
        block = torch.ones(tuple(h - l for l, h in zip(lo, hi)), device=dev)
        out[1] = crop_to_patch(block, crop, origin=lo, mode=mode)
    n = len(prompts.clicks)
    if n:
        ball = soft_ball(radius).to(dev)
        kern = _odd_kernel(zoom) if zoom > 1 else 1
        if kern > 1:
            ball = F.max_pool3d(F.pad(ball[None, None], (kern // 2,) * 6), kern, stride=1)[0, 0]
        half = ball.shape[0] // 2
        for i, (positive, p) in enumerate(prompts.clicks):
            origin = tuple(int(v) - half for v in p)
            drawn = crop_to_patch(ball, crop, origin=origin, mode=mode) * (decay ** (n - 1 - i))
            ch = 3 if positive else 4
            torch.maximum(out[ch], drawn, out=out[ch])
    return out
