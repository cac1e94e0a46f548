"""The restricted unpickler for the object arrays of case files (``boxes``, ``clicks``,
``clicks_order``, which ``np.savez`` stores as pickles).

:func:`safe_unpickle_loads` admits only dict, list, tuple, str, int, float, bool, None and
numpy's array / dtype / scalar reconstructors; any other global is refused by name and nothing
runs. The work a pickle may make is bounded: every opcode run is charged one item and every
reuse of a memoised object its full size, against ``max_items`` (MAX_PICKLE_ITEMS: 1000 classes
with a box and 6 clicks each, the largest prompt set budgeted for, take at most 182 k opcodes as
``np.save`` pickles them; docs/HARDENING.md).
"""
import gc
import io
import pickle
from types import NoneType

import numpy as np

from .errors import CaseError, exc_text, show

MAX_PICKLE_ITEMS = 1_000_000


def _latin1_encode(text, encoding="latin1"):
    """The only use of ``_codecs.encode`` in protocol-2 pickles: bytes stored as latin-1 text."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CaseError("refused pickle call _codecs.encode with unexpected arguments")
    return text.encode("latin1")


# Calling numpy.ndarray(shape, object, buffer) or giving a dtype forged flags via BUILD makes
# arrays of fake object pointers (a crash, or worse). So the pickle only ever sees wrappers:
# ``numpy.ndarray`` is an inert token accepted as _reconstruct's first argument, dtypes are
# built from a plain type code, and BUILD must restore exactly the state numpy itself writes.
_NDARRAY = object()
_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct
_SCALAR = np.int64(0).__reduce__()[0]  # numpy.(_)core.multiarray.scalar


def _reconstruct(subtype, shape, typecode):
    if subtype is not _NDARRAY or typecode not in (b"b", "b"):
        raise CaseError("refused pickle call _reconstruct with unexpected arguments")
    return _RECONSTRUCT(np.ndarray, (0,), b"b")  # shape, dtype and data come from BUILD


def _dtype(spec, align=False, copy=False):
    dtype = np.dtype(spec, False, True) if isinstance(spec, str) else None  # a fresh copy
    simple = dtype is not None and dtype.fields is None and dtype.subdtype is None
    if not simple or dtype.kind not in "biufcOUS":
        raise CaseError(f"refused pickle dtype {show(spec)}")
    return dtype


_ALLOWED = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _dtype,
            ("_codecs", "encode"): _latin1_encode}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 and 2 spellings
    _ALLOWED[(_module, "_reconstruct")] = _reconstruct
    _ALLOWED[(_module, "scalar")] = _SCALAR


def _weight(obj, cap: int) -> int:
    """How many items ``obj`` stands for, every shared sub-object counted each time it occurs
    (what hashing, comparing, printing or walking it costs), stopping early once above ``cap``.
    Work is bounded by the distinct objects reachable, not by the count."""
    seen = {}
    stack = [(obj, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in seen and not done:
            continue
        if isinstance(node, dict):
            children = [c for kv in node.items() for c in kv]
        elif isinstance(node, (list, tuple, set, frozenset)):
            children = list(node)
        elif isinstance(node, np.ndarray) and node.dtype.hasobject:
            children = list(node.reshape(-1))
        else:
            children = []
        if not done:
            todo = [c for c in children if id(c) not in seen]
            if todo:
                stack.append((node, True))
                stack.extend((c, False) for c in todo)
                continue
        if isinstance(node, (str, bytes, bytearray)):
            own = 1 + len(node) // 8
        elif isinstance(node, int):
            own = 1 + node.bit_length() // 64
        elif isinstance(node, np.ndarray):
            own = 1 + node.nbytes // 8
        else:
            own = 1
        seen[key] = min(own + sum(seen.get(id(c), 0) for c in children), cap + 1)
        if seen[key] > cap and node is obj:
            break
    return seen.get(id(obj), cap + 1)


class _RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler (so BUILD can be checked) that resolves only the globals ``np.save``
    of dicts / lists / str / int / float / None / numpy arrays and scalars produces.

    Bounded: every opcode is charged one item against ``max_items`` (so a stream of cheap
    one-byte opcodes stops after ``max_items`` of them, whatever the byte limit); each reuse of
    a memoised object (GET) or of the top of the stack (DUP) is charged its full :func:`_weight`
    besides, so a small pickle cannot expand to an unbounded structure (which hashing or
    formatting it would then walk)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, max_items: int):
        super().__init__(file)
        self.max_items = int(max_items)
        self.items_left = int(max_items)

    def _refuse(self):
        raise CaseError(f"refused pickle: expands to more than {self.max_items} items "
                        f"(opcodes run and memoised objects reused)")

    def _charge(self):
        obj = self.stack[-1]
        kind = type(obj)
        if kind is str or kind is bytes:  # dict keys ("fg", "z_min") are reused most
            self.items_left -= 1 + len(obj) // 8
        elif kind is NoneType or kind is bool or kind is float:
            self.items_left -= 1
        else:
            self.items_left -= _weight(obj, self.items_left)
        if self.items_left < 0:
            self._refuse()

    def _reuse(op):  # noqa: N805 (a decorator used in the class body)
        base = pickle._Unpickler.dispatch[op[0]]

        def load(self):
            base(self)
            self._charge()
        return load

    for _op in (pickle.GET, pickle.BINGET, pickle.LONG_BINGET, pickle.DUP):
        dispatch[_op[0]] = _reuse(_op)
    del _op, _reuse

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise CaseError(f"refused pickle global {module}.{name}") from None

    def persistent_load(self, pid):
        raise CaseError("refused pickle persistent id")

    def load_build(self):
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.dtype):
            canonical = [inst.newbyteorder(e).__reduce__()[2] for e in "<>"]
            if not any(state == c for c in canonical):
                raise CaseError(f"refused pickle dtype state {show(state)}")
        elif type(inst) is not np.ndarray:
            raise CaseError(f"refused pickle BUILD on {type(inst).__name__}")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build

    def _counted(base):  # noqa: N805 (a decorator used in the class body)
        def load(self):
            self.items_left -= 1
            if self.items_left < 0:
                self._refuse()
            base(self)
        return load

    for _code, _load in list(dispatch.items()):
        dispatch[_code] = _counted(_load)
    del _code, _load, _counted


def safe_unpickle_loads(data: bytes, max_items: int = MAX_PICKLE_ITEMS):
    """``pickle.loads`` restricted to plain Python containers and numpy arrays / scalars.

    Raises CaseError("refused pickle global module.name") for any other global (nothing runs),
    and CaseError when the pickle would expand to more than ``max_items`` items.
    """
    collecting = gc.isenabled()
    gc.disable()  # up to max_items new containers: collections while they pile up tripled the time
    try:
        return _RestrictedUnpickler(io.BytesIO(data), max_items).load()
    except CaseError:
        raise
    except RecursionError:
        raise CaseError("bad pickle (nested too deeply)") from None
    except Exception as exc:  # truncated or malformed pickle stream
        raise CaseError(f"bad pickle ({type(exc).__name__}: {exc_text(exc)})") from None
    finally:
        if collecting:
            gc.enable()
