"""A case, typed: what a case states, checked and parsed once.

:func:`infer.npz.read_case` reads a case file into plain Python (its members, the organizer's
keys); :meth:`Case.from_mapping` turns that, or a caller's dict in the same layout, into a
:class:`Case`: the image, the previous prediction, and one :class:`ClassEntry` per class with the
class's box extent and chronological clicks already parsed. The predictor reads nothing else, and
a class whose entries cannot be used carries its error, raised when its prompts are asked for
(that class alone keeps its previous mask).

Prompt rules (the organizer's): boxes are dicts of inclusive integers, ``z_min`` / ``z_max`` the
object's slice range and the 2D box drawn on ``z_mid``; ``clicks[k]`` holds ``fg`` and ``bg``
lists of ``[z, y, x]``; ``clicks_order[k]`` says in which order they were made ("fg" / "bg", and
None for a stage in which the class was already perfect and got no click). All coordinates are
(z, y, x) voxel indices of ``imgs``; the boxes made here are half-open ``(lo, hi)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from .entries import to_int
from .prompts import ClassPrompts

Vec3 = Tuple[int, int, int]
Box = Tuple[Vec3, Vec3]
Click = Tuple[bool, Vec3]

PROMPT_KEYS = ("boxes", "clicks", "clicks_order")
BOX_KEYS = ("z_min", "z_max", "z_mid", "z_mid_y_min", "z_mid_y_max", "z_mid_x_min", "z_mid_x_max")
_BOX_REQUIRED = BOX_KEYS[2:]  # z_min / z_max default to z_mid


class PromptError(ValueError):
    """One class's prompts cannot be used (that class alone keeps its previous mask)."""


def num_classes(case: Mapping) -> int:
    """K = the longest of ``boxes``, ``clicks`` and ``clicks_order`` (0 when none is given).

    The harness writes them equally long (K = len(boxes), or len(clicks) without boxes); taking
    the longest means a short or empty list never drops the later classes (and their previous
    masks): a class missing from one list simply has no prompt of that kind."""
    return max([len(case[key]) for key in PROMPT_KEYS if case.get(key) is not None] + [0])


def _inside(p: Sequence[int], shape: Sequence[int]) -> bool:
    return len(p) == 3 and all(0 <= int(v) < s for v, s in zip(p, shape))


def _plain_int(v, what: str) -> int:
    """``v`` as an int when it holds an integer value (``infer.entries.to_int``), else PromptError."""
    return to_int(v, what, PromptError)


def chronological_clicks(clicks: dict, order: Optional[list], shape: Sequence[int]) -> List[Click]:
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
            if type(p[0]) is int and type(p[1]) is int and type(p[2]) is int:  # as infer.npz.read_case gives them
                out.append(tuple(p))
            else:
                out.append(tuple(_plain_int(v, f"{side} click {i}") for v in p))
        return out

    fg, bg = points("fg"), points("bg")
    seq: List[Click] = []
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


def box_extent(d: dict, shape: Sequence[int]) -> Tuple[Optional[Box], int]:
    """Organizer box dict (inclusive integers) -> ``(extent, z_mid)``: the object's extent,
    half-open and clipped to ``shape`` (None when the box is empty, ``{}``, or empty after
    clipping), and the slice the 2D box is drawn on, moved into the extent. Inverted bounds are
    swapped; ``z_min`` / ``z_max`` default to ``z_mid``. Raises PromptError for a missing or
    unknown key or a value that is not an integer."""
    if not d:
        return None, 0
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
        return None, 0
    return extent, zmid


def drawn_box(extent: Box, z_mid: int, style: str) -> Box:
    """The box as drawn into the box channel: the ``z_mid`` slice of ``extent`` (``"2d"``, how
    nnInteractive v1.0 was trained) or all of it (``"3d"``)."""
    if style == "2d":
        (_, y0, x0), (_, y1, x1) = extent
        return (z_mid, y0, x0), (z_mid + 1, y1, x1)
    if style == "3d":
        return extent
    raise ValueError(f"unknown box style {style!r}")


def _holds_something(entry) -> bool:
    if entry is None:
        return False
    if isinstance(entry, dict):  # a box, or a click entry {"fg": [...], "bg": [...]}
        return any(v not in (None, [], ()) for v in entry.values()) if set(entry) <= {"fg", "bg"} else bool(entry)
    if isinstance(entry, (list, tuple)):  # a clicks_order entry
        return len(entry) > 0
    return True  # anything else (an unusable entry among them) is the class's business


@dataclass(frozen=True)
class ClassEntry:
    """One class of a case, parsed: ``extent`` (half-open, clipped; None without a usable box)
    and ``z_mid``, the chronological ``clicks`` ``(positive, (z, y, x))`` inside the volume,
    ``done`` (this stage's ``clicks_order`` entry is None: the class is already perfect) and
    ``stage`` (how many ``clicks_order`` entries the class has, None ones too; without
    ``clicks_order``, its number of clicks; 0 in the box stage). ``given``: the case holds
    something for the class (a box, a click, an order step, or an entry that cannot be used); a
    class without has nothing to predict. ``failure``: why its entries cannot be used (raised by
    :meth:`prompts`), or None."""

    extent: Optional[Box] = None
    z_mid: int = 0
    clicks: Tuple[Click, ...] = ()
    done: bool = False
    stage: int = 0
    given: bool = False
    failure: Optional[Exception] = field(default=None, compare=False)

    @classmethod
    def parse(cls, box: Any, clicks: Any, order: Any, shape: Sequence[int]) -> "ClassEntry":
        """The class's ``boxes``, ``clicks`` and ``clicks_order`` entries (each None when the case
        has none) parsed against the volume's ``shape``. Never raises for an entry that cannot be
        used: the entry carries the error (an ``infer.entries.Malformed`` entry's ``why`` as a
        PromptError)."""
        given = any(_holds_something(e) for e in (box, clicks, order))
        try:
            return cls(given=given, **_parsed(box, clicks, order, shape))
        except Exception as exc:  # the class's own failure, raised when its prompts are asked for
            return cls(given=given, failure=exc.with_traceback(None))

    def prompts(self, box_style: str) -> ClassPrompts:
        """The class's prompts with its box drawn in ``box_style`` (the model card's). Raises the
        class's failure, when its entries cannot be used."""
        if self.failure is not None:
            raise self.failure.with_traceback(None)
        box = None if self.extent is None else drawn_box(self.extent, self.z_mid, box_style)
        return ClassPrompts(box=box, extent=self.extent, clicks=list(self.clicks), done=self.done,
                            stage=self.stage)


def _parsed(box, clicks, order, shape) -> dict:
    """:class:`ClassEntry`'s fields from the class's three entries (PromptError when one cannot
    be used: an unusable entry first, then the box, then the clicks)."""
    for entry in (box, clicks, order):
        if hasattr(entry, "why"):  # infer.entries.Malformed: marked unusable when read
            raise PromptError(str(entry.why))
    out: dict = {}
    if box:
        out["extent"], out["z_mid"] = box_extent(box, shape)
    if clicks is not None and not isinstance(clicks, dict):
        raise PromptError(f"clicks: expected a dict, got {type(clicks).__name__}")
    if clicks is not None or order:
        seq = chronological_clicks(clicks or {}, order, shape)
        out["clicks"] = tuple(seq)
        out["done"] = bool(order) and order[-1] is None
        out["stage"] = len(order) if order else len(seq)
    return out


@dataclass(frozen=True)
class Case:
    """One case: ``imgs`` (D, H, W) as stored (any numeric dtype), one :class:`ClassEntry` per
    class 1..K in ``classes``, the previous prediction ``prev_pred`` (D, H, W) or None, the
    ``spacing`` (z, y, x) or None, the case's ``name`` and the reader's ``warnings`` (what it
    ignored)."""

    imgs: np.ndarray
    classes: Tuple[ClassEntry, ...] = ()
    prev_pred: Optional[np.ndarray] = None
    spacing: Optional[Tuple[float, float, float]] = None
    name: str = "case"
    warnings: Tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, d: Mapping, name: Optional[str] = None) -> "Case":
        """A case from a dict in the layout :func:`infer.npz.read_case` returns (the organizer's
        keys: ``imgs``, ``boxes``, ``clicks``, ``clicks_order``, ``prev_pred``, ``spacing``; also
        ``name`` and ``warnings``); ``name`` overrides the dict's."""
        if not isinstance(d, Mapping):
            raise TypeError(f"a case is an infer.case.Case or a dict, not {type(d).__name__}")
        imgs = d["imgs"]
        shape = tuple(imgs.shape)
        warnings = d.get("warnings")
        return cls(imgs=imgs, classes=tuple(_classes(d, shape)), prev_pred=d.get("prev_pred"),
                   spacing=d.get("spacing"), name=name if name is not None else d.get("name", "case"),
                   warnings=tuple(warnings) if isinstance(warnings, (list, tuple)) else ())

    @property
    def num_classes(self) -> int:
        """K: the classes the case's prompt lists name (:func:`num_classes`)."""
        return len(self.classes)

    def prompts(self, k: int, box_style: str) -> ClassPrompts:
        """Class ``k``'s (1-based) prompts, its box drawn in ``box_style``
        (:meth:`ClassEntry.prompts`: raises the class's failure)."""
        return self.classes[k - 1].prompts(box_style)

    def asked(self) -> List[int]:
        """The classes (1-based) the case holds something for (:attr:`ClassEntry.given`)."""
        return [k for k, c in enumerate(self.classes, 1) if c.given]


def _classes(d: Mapping, shape: Sequence[int]):
    """One :class:`ClassEntry` per class 1..K of the case dict ``d``; a class whose entries
    cannot even be looked up (a prompt list of an odd type) carries that error alone."""
    for j in range(num_classes(d)):
        try:
            entries = [d[key][j] if d.get(key) is not None and j < len(d[key]) else None
                       for key in PROMPT_KEYS]
        except Exception as exc:
            yield ClassEntry(given=True, failure=exc.with_traceback(None))
            continue
        yield ClassEntry.parse(*entries, shape)


def as_case(case: "Case | Mapping") -> Case:
    """``case`` itself when it is a :class:`Case`, else :meth:`Case.from_mapping` of it."""
    return case if isinstance(case, Case) else Case.from_mapping(case)
