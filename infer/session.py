"""An interactive session over :class:`infer.predictor.Predictor`, as nnInteractive's users drive it.

Set the image once, then add a box or clicks to the current object, read the mask, undo the last
interaction, start a new object, or reset. Every interaction builds a case dict in the layout
``infer.npz.read_case`` returns (the organizer's keys) and calls ``Predictor.predict`` on it::

    session = Session(Predictor.from_path("weights/demo", device="cpu"))
    session.set_image(imgs, spacing=(2.0, 0.8, 0.8))        # (D, H, W), (z, y, x) in mm
    session.add_box([[10, 20], [30, 60], [40, 70]])          # half-open (z, y, x) ranges
    session.add_click((15, 44, 52), positive=False)          # background click at (z, y, x)
    mask = session.mask                                      # (D, H, W) labels, 1 = this object
    session.undo()                                           # back to the box's mask
    k = session.new_object()                                 # label 2; later prompts go to it

All coordinates are voxel indices of ``imgs`` in (z, y, x) order. Objects are the case's classes:
object ``k`` is label ``k`` of the mask and entry ``k - 1`` of ``boxes`` / ``clicks`` /
``clicks_order``.

The case of one interaction on object ``k`` (:meth:`Session.case`):

- ``imgs``, ``spacing`` (tuple of 3 floats, or None), ``name`` ("session"), ``warnings`` ([]).
- ``boxes``: present when any object has a box; one organizer box dict per object (inclusive
  ``z_min, z_max, z_mid, z_mid_y_min, z_mid_y_max, z_mid_x_min, z_mid_x_max``), ``{}`` for an
  object without one.
- ``clicks`` (``{"fg": [[z, y, x], ...], "bg": [...]}`` per object) and ``clicks_order`` (per
  object, "fg" / "bg" in click order): present when any object has a click or there is more than
  one object. Every object other than ``k`` gets a trailing None in its ``clicks_order`` (the
  organizer's "already perfect": the predictor keeps its mask without a forward pass), so an
  interaction changes only its own object's prediction; the stored history has no None.
- ``prev_pred``: the current mask, present once a mask has been predicted.

So the first box of a single object gives exactly the organizer's box stage (``imgs``,
``spacing``, ``boxes``), and its clicks its click stages. One box per object, placed before the
object's first click (the organizer's layout has one box per class and no box after a click);
a second box before any click replaces the first. The predictor never sees ground truth.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .case import BOX_KEYS

__all__ = ["Session", "box_to_dict"]


def box_to_dict(box, shape: Optional[Sequence[int]] = None) -> dict:
    """An organizer box dict (inclusive ints) from either such a dict or ``[[z0, z1], [y0, y1],
    [x0, x1]]`` (half-open: ``z1`` excluded). The simple form's ``z_mid`` is its middle slice
    ``(z0 + z1 - 1) // 2``. ``shape`` given: the box must overlap the volume. Raises ValueError
    for an empty box, a missing or unknown key, or a non-integer value."""
    if isinstance(box, dict):
        unknown = sorted(str(k) for k in box if k not in BOX_KEYS)
        missing = [k for k in BOX_KEYS if k not in box]
        if unknown or missing:
            raise ValueError(f"box: unknown key(s) {unknown}" if unknown else f"box: missing key(s) {missing}")
        d = {k: _int(box[k], f"box {k}") for k in BOX_KEYS}
    else:
        try:
            (z0, z1), (y0, y1), (x0, x1) = [[_int(v, "box") for v in pair] for pair in box]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"box: expected [[z0, z1], [y0, y1], [x0, x1]] or a box dict ({exc})") from None
        if z1 <= z0 or y1 <= y0 or x1 <= x0:
            raise ValueError(f"box: empty half-open box {[[z0, z1], [y0, y1], [x0, x1]]}")
        d = {"z_min": z0, "z_max": z1 - 1, "z_mid": (z0 + z1 - 1) // 2, "z_mid_y_min": y0,
             "z_mid_y_max": y1 - 1, "z_mid_x_min": x0, "z_mid_x_max": x1 - 1}
    spans = [(d["z_min"], d["z_max"]), (d["z_mid_y_min"], d["z_mid_y_max"]), (d["z_mid_x_min"], d["z_mid_x_max"])]
    if any(hi < lo for lo, hi in spans):
        raise ValueError(f"box: a maximum below its minimum in {d}")
    if not d["z_min"] <= d["z_mid"] <= d["z_max"]:
        raise ValueError(f"box: z_mid {d['z_mid']} outside z_min..z_max {d['z_min']}..{d['z_max']}")
    if shape is not None and any(hi < 0 or lo >= n for (lo, hi), n in zip(spans, shape)):
        raise ValueError(f"box: {d} lies outside the volume {tuple(shape)}")
    return d


def _int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{what}: expected an integer, got {v!r:.20}")
    return int(v)


@dataclass
class _Object:
    """One object's prompts, as the case stores them."""

    box: Optional[dict] = None
    fg: List[List[int]] = field(default_factory=list)
    bg: List[List[int]] = field(default_factory=list)
    order: List[str] = field(default_factory=list)


class Session:
    """One image, several objects, one interaction at a time (see the module docstring).

    ``predictor``: anything with ``predict(case) -> (D, H, W) label map`` (an
    ``infer.predictor.Predictor``)."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.imgs: Optional[np.ndarray] = None
        self.spacing: Optional[Tuple[float, float, float]] = None
        self._objects: List[_Object] = []
        self._current = 0
        self._mask: Optional[np.ndarray] = None  # None until the first prediction
        self._history: list = []  # (objects, current, mask) before each interaction

    # ------------------------------------------------------------------ image and objects
    def set_image(self, imgs: np.ndarray, spacing: Optional[Sequence[float]] = None) -> None:
        """Set the (D, H, W) image (any numeric dtype; the organizer's is uint8 0..255) and its
        (z, y, x) spacing in mm. Starts afresh: one object (label 1), no prompts, empty mask."""
        imgs = np.asarray(imgs)
        if imgs.ndim != 3 or 0 in imgs.shape:
            raise ValueError(f"imgs: expected a non-empty (D, H, W) array, got shape {imgs.shape}")
        if spacing is not None:
            spacing = tuple(float(s) for s in spacing)
            if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
                raise ValueError(f"spacing: expected 3 positive numbers, got {spacing}")
        self.imgs, self.spacing = imgs, spacing
        self.reset()

    def reset(self) -> None:
        """Drop every object, prompt and mask (and the undo history); keep the image."""
        self._need_image()
        self._objects, self._current, self._mask, self._history = [_Object()], 0, None, []

    def new_object(self) -> int:
        """Start a new object; later prompts go to it. Returns its label (2, 3, ...). Not an
        interaction: nothing is predicted and undo does not go back over it."""
        self._need_image()
        self._objects.append(_Object())
        self._current = len(self._objects) - 1
        return self._current + 1

    def select_object(self, label: int) -> None:
        """Send later prompts to the existing object ``label`` (1-based)."""
        if not 1 <= int(label) <= len(self._objects):
            raise ValueError(f"no object {label}: objects are 1..{len(self._objects)}")
        self._current = int(label) - 1

    @property
    def object_id(self) -> int:
        """The label of the object that prompts go to."""
        return self._current + 1

    @property
    def n_objects(self) -> int:
        return len(self._objects)

    # ------------------------------------------------------------------ interactions
    def add_box(self, box) -> np.ndarray:
        """Box prompt for the current object: an organizer box dict (inclusive) or ``[[z0, z1],
        [y0, y1], [x0, x1]]`` (half-open). Only before the object's first click; replaces an
        earlier box. Predicts and returns the new mask."""
        self._need_image()
        d = box_to_dict(box, self.imgs.shape)
        obj = self._objects[self._current]
        if obj.order:
            raise ValueError("a box must come before the object's first click (one box per object, "
                             "as in the organizer's layout)")
        return self._interact(lambda o: setattr(o, "box", d))

    def add_click(self, zyx: Sequence[int], positive: bool = True) -> np.ndarray:
        """Foreground (``positive``) or background click at voxel ``(z, y, x)`` for the current
        object. Predicts and returns the new mask."""
        self._need_image()
        p = [_int(v, "click") for v in zyx] if len(zyx) == 3 else None
        if p is None or not all(0 <= v < n for v, n in zip(p, self.imgs.shape)):
            raise ValueError(f"click {tuple(zyx)} is not a voxel of the volume {self.imgs.shape}")
        kind = "fg" if positive else "bg"

        def add(o: _Object):
            getattr(o, kind).append(p)
            o.order.append(kind)
        return self._interact(add)

    def undo(self) -> np.ndarray:
        """Take back the last interaction: prompts, current object and mask as they were before it
        (the mask exactly, not predicted again). Returns the mask. ValueError when there is none."""
        if not self._history:
            raise ValueError("nothing to undo")
        self._objects, self._current, self._mask = self._history.pop()
        return self.mask

    # ------------------------------------------------------------------ results
    @property
    def mask(self) -> np.ndarray:
        """The current (D, H, W) label map (a copy): 0 background, k object k; zeros before the
        first prediction."""
        self._need_image()
        if self._mask is None:
            return np.zeros(self.imgs.shape, np.uint8)
        return self._mask.copy()

    def object_mask(self, label: Optional[int] = None) -> np.ndarray:
        """(D, H, W) bool mask of object ``label`` (default: the current object)."""
        return self.mask == (self.object_id if label is None else int(label))

    def case(self, label: Optional[int] = None) -> dict:
        """The case dict an interaction on object ``label`` (default: the current one) sends to
        the predictor, with the prompts as they are now (layout: module docstring)."""
        self._need_image()
        active = self._current if label is None else int(label) - 1
        objs = self._objects
        case = {"name": "session", "warnings": [], "imgs": self.imgs, "spacing": self.spacing}
        if any(o.box for o in objs):
            case["boxes"] = [dict(o.box) if o.box else {} for o in objs]
        if len(objs) > 1 or any(o.order for o in objs):
            case["clicks"] = [{"fg": [list(p) for p in o.fg], "bg": [list(p) for p in o.bg]} for o in objs]
            case["clicks_order"] = [list(o.order) + ([] if i == active else [None]) for i, o in enumerate(objs)]
        if self._mask is not None:
            case["prev_pred"] = self._mask.copy()
        return case

    # ------------------------------------------------------------------ internals
    def _interact(self, change) -> np.ndarray:
        before = (copy.deepcopy(self._objects), self._current, self._mask)
        change(self._objects[self._current])
        try:
            segs = np.asarray(self.predictor.predict(self.case()))
        except BaseException:
            self._objects, self._current, self._mask = before
            raise
        if segs.shape != self.imgs.shape:
            self._objects, self._current, self._mask = before
            raise ValueError(f"the predictor returned shape {segs.shape} for an image of {self.imgs.shape}")
        self._history.append(before)
        self._mask = segs
        return self.mask

    def _need_image(self) -> None:
        if self.imgs is None:
            raise ValueError("no image: call set_image first")
