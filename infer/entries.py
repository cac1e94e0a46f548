"""The prompt keys of a case file (``boxes``, ``clicks``, ``clicks_order``) validated into plain
Python, class by class: an entry that cannot be used becomes a :class:`Malformed` (that class
alone is lost). ``infer.case`` parses the result, and shares :func:`to_int` for its own checks.
"""
import math
import operator

import numpy as np

from .errors import CaseError, exc_text, show


class Malformed:
    """Stands in for one class's prompt entry (``boxes[k]``, ``clicks[k]``, ``clicks_order[k]``)
    that cannot be used: that class alone keeps its previous mask. ``why``: one line."""

    __slots__ = ("why",)

    def __init__(self, why: str):
        self.why = why

    def __repr__(self):
        return f"Malformed({self.why!r})"

    def __eq__(self, other):
        return isinstance(other, Malformed) and other.why == self.why

    __hash__ = None


def to_int(value, what: str, error=CaseError) -> int:
    """``value`` as an int when it holds an integer (an int, a numpy integer, an integral finite
    float, or a 0-d array of one; a bool is refused), else ``error`` with a one-line message."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)):
        raise error(f"{what}: expected an integer, got a bool")
    if isinstance(value, (float, np.floating)):
        if math.isfinite(value) and value == int(value):
            return int(value)
    elif hasattr(value, "__index__"):
        return operator.index(value)
    raise error(f"{what}: expected an integer, got {show(value)} ({type(value).__name__})")


def _as_list(value, what):
    if isinstance(value, np.ndarray):
        value = value.tolist()  # a 0-d object array gives back the object it holds
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise CaseError(f"{what}: expected a list, got {type(value).__name__}")
    return value


def _per_class(value, what):
    """The per-class list of a prompt key: a list (or array) of entries; a dict alone (also in
    a 0-d object array, as ``np.savez`` stores a bare dict) is one class."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    return [value] if isinstance(value, dict) else _as_list(value, what)


def entries(value, what, parse):
    """``parse`` applied to each class's entry; an entry it refuses becomes :class:`Malformed`
    (that class alone is lost), a key that is not a list of entries raises CaseError."""
    out = []
    for k, entry in enumerate(_per_class(value, what)):
        try:
            out.append(parse(entry, f"{what}[{k}]"))
        except CaseError as exc:
            out.append(Malformed(str(exc)))
        except (TypeError, ValueError, OverflowError) as exc:
            out.append(Malformed(f"{what}[{k}]: {type(exc).__name__}: {exc_text(exc)}"))
    return out


def _box(box, what):
    if box is None:  # no box for this class (its clicks, if any, still count)
        return {}
    if not isinstance(box, dict):
        raise CaseError(f"{what}: expected a dict, got {type(box).__name__}")
    out = {}
    for key, v in box.items():
        if not isinstance(key, str):
            raise CaseError(f"{what}: key {show(key)} is not a string")
        out[key] = to_int(v, f"{what}[{show(key)}]")
    return out


def _points(value, what):
    points = []
    for i, p in enumerate(_as_list(value, what)):
        p = _as_list(p, f"{what}[{i}]")
        if len(p) != 3:
            raise CaseError(f"{what}[{i}]: expected [z, y, x], got {len(p)} values")
        points.append([to_int(c, f"{what}[{i}]") for c in p])
    return points


def _click(entry, what):
    if entry is None:
        entry = {}
    if not isinstance(entry, dict):
        raise CaseError(f"{what}: expected a dict, got {type(entry).__name__}")
    extra = [key for key in entry if key not in ("fg", "bg")]
    if extra:
        raise CaseError(f"{what}: unexpected key {show(extra[0])}")
    return {s: _points(entry.get(s, []), f"{what}[{s!r}]") for s in ("fg", "bg")}


def _order(steps, what):
    steps = _as_list(steps, what)
    for s in steps:
        if s is not None and not (isinstance(s, str) and s in ("fg", "bg")):
            raise CaseError(f"{what}: unexpected entry {show(s)}")
    return [None if s is None else str(s) for s in steps]


PARSERS = {"boxes": _box, "clicks": _click, "clicks_order": _order}
