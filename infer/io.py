"""Case files: read one interactive-segmentation case, write one label map.

The only module that touches case files (standard library + numpy). Arrays are in array-index
order of ``imgs``: (D, H, W) = (z, y, x), axis 0 = z.

Reading never runs code from the file: numeric arrays are read with pickling off, and the object
arrays that ``np.savez`` stores as pickles (``boxes``, ``clicks``, ``clicks_order``) go through
:func:`safe_unpickle_loads`, which admits only numpy's array / dtype / scalar reconstructors.
``gts`` is never opened.

Reading is bounded (:class:`Limits`): only regular files are opened (a FIFO, device, socket or
folder is refused without blocking); an array whose declared size exceeds the limits is refused
from its header, before any byte is decompressed (zip members are never read past their declared
size, so a deflate bomb is refused by what it declares); object members are read with a byte
limit and unpickled with a limit on the items they may expand to (memo reuse included).
"""
import contextlib
import dataclasses
import io
import math
import mmap
import os
import pickle
import secrets
import stat
from types import NoneType
import zipfile
import zlib

import numpy as np
from numpy.lib import format as npformat

__all__ = ["CaseError", "Limits", "Malformed", "read_case", "imgs_shape", "write_segs",
           "safe_unpickle_loads", "atomic_write", "label_dtype", "to_labels", "show"]

_CHUNK = 1 << 20  # bytes per read from a zip member: small enough to stay in cache

from .limits import BYTES_PER_VOXEL, DEFAULT_MEMORY_GB  # noqa: E402,F401 (re-exported)


class CaseError(ValueError):
    """A case file that cannot be used as given; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one case may make the reader allocate.

    ``max_voxels``: largest ``imgs`` (and ``prev_pred``) accepted, from the memory the run may use
    (:meth:`for_memory`). ``max_object_bytes``: largest object (pickle) member, as declared
    (60 000 clicks pickle to about 1.5 MB). ``max_pickle_items``: objects one pickle may expand
    to, counting every reuse of a memoised object by its full size.
    """

    max_voxels: int = int(DEFAULT_MEMORY_GB * 2**30) // BYTES_PER_VOXEL
    max_object_bytes: int = 64 << 20
    max_pickle_items: int = 10_000_000

    @classmethod
    def for_memory(cls, gigabytes: float, **kw) -> "Limits":
        """Limits for a run allowed ``gigabytes`` of host memory (BYTES_PER_VOXEL per voxel)."""
        return cls(max_voxels=max(int(gigabytes * 2**30) // BYTES_PER_VOXEL, 1), **kw)


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


def show(value, width: int = 40) -> str:
    """A bounded, one-line ``repr`` for messages: strings and bytes are cut before ``repr`` runs,
    containers and very large ints show only their type (their repr can be unbounded)."""
    if isinstance(value, (str, bytes)):
        text = repr(value[:width + 1])
    elif isinstance(value, bool) or value is None or isinstance(value, (float, np.generic)) \
            and not isinstance(value, (np.str_, np.bytes_, np.void, np.object_)):
        text = repr(value)
    elif isinstance(value, int) and value.bit_length() <= 128:
        text = repr(value)
    else:
        text = f"<{type(value).__name__}>"
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= width else text[:width - 3] + "..."


def label_dtype(k: int) -> np.dtype:
    """The one label dtype rule: uint8 when K <= 255, else uint16; K > 65535 is refused."""
    if k > 65535:
        raise CaseError(f"{k} classes: labels above 65535 cannot be stored (uint16)")
    return np.dtype(np.uint8 if k <= 255 else np.uint16)


def to_labels(arr, k=None) -> np.ndarray:
    """Any numeric (D, H, W) array -> labels in the :func:`label_dtype` of ``k``: NaN and
    negatives become 0, values are rounded, and labels above ``k`` (or above 65535 when ``k`` is
    unknown) become 0, never wrap. Unknown ``k``: uint8 when every label fits, else uint16."""
    a = np.asarray(arr)
    top = 65535 if k is None else min(int(k), 65535)
    if a.dtype.kind == "f":
        a = np.rint(np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0))
        a = np.where((a < 0) | (a > top), 0, a)  # in float: no int64 overflow
    a = a.astype(np.int64, copy=False) if a.dtype.kind in "fb" else a
    a = np.where((a < 0) | (a > top), 0, a)
    dtype = label_dtype(min(int(k), 65535)) if k is not None else \
        label_dtype(int(a.max(initial=0)))
    return a.astype(dtype)


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

    Bounded: without reuse every item costs at least one byte of the (size-limited) stream; each
    reuse of a memoised object (GET) or of the top of the stack (DUP) is charged its full
    :func:`_weight` against ``max_items``, so a small pickle cannot expand to an unbounded
    structure (which hashing or formatting it would then walk)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, max_items: int):
        super().__init__(file)
        self.max_items = int(max_items)
        self.items_left = int(max_items)

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
            raise CaseError(f"refused pickle: expands to more than {self.max_items} items "
                            f"(memoised objects reused)")

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


def safe_unpickle_loads(data: bytes, max_items: int = Limits.max_pickle_items):
    """``pickle.loads`` restricted to plain Python containers and numpy arrays / scalars.

    Raises CaseError("refused pickle global module.name") for any other global (nothing runs),
    and CaseError when the pickle would expand to more than ``max_items`` items.
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(data), max_items).load()
    except CaseError:
        raise
    except RecursionError:
        raise CaseError("bad pickle (nested too deeply)") from None
    except Exception as exc:  # truncated or malformed pickle stream
        raise CaseError(f"bad pickle ({type(exc).__name__}: {_exc_text(exc)})") from None


def _exc_text(exc: BaseException, width: int = 200) -> str:
    """An exception's message on one line, at most ``width`` characters (never formats more
    than the exception already holds)."""
    try:
        text = str(exc)
    except Exception:
        text = ""
    text = " ".join(text[:4 * width].split())
    return text if len(text) <= width else text[:width - 3] + "..."


_HEADER_READERS = {(1, 0): npformat.read_array_header_1_0, (2, 0): npformat.read_array_header_2_0}


def _open_regular(path):
    """Open ``path`` for binary reading if it is a regular file (a link to one is fine). A FIFO,
    device, socket or folder is refused from ``stat`` and, after a non-blocking open, ``fstat``
    (so a file swapped in between is caught too); nothing blocks."""
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))

    def check(mode):
        if not stat.S_ISREG(mode):
            what = next((w for test, w in kinds if test(mode)), "not a regular file")
            raise CaseError(f"not a regular file ({what}): refused")

    try:
        check(os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CaseError(f"not a readable npz ({type(exc).__name__}: {exc.strerror})") from None
    try:
        check(os.fstat(fd).st_mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _members(zf):
    """Key -> ZipInfo; np.savez names members "<key>.npy"."""
    return {i.filename[:-4] if i.filename.endswith(".npy") else i.filename: i
            for i in zf.infolist()}


def _header(fp):
    """(shape, fortran_order, dtype) from an open .npy stream, leaving it at the data."""
    version = npformat.read_magic(fp)
    if version not in _HEADER_READERS:
        raise CaseError(f"unsupported npy format version {version}")
    return _HEADER_READERS[version](fp)


def _squeezed(shape):
    """A volume shape as :func:`_volume` will see it (leading singleton axis of 4 dropped)."""
    return tuple(shape[1:]) if len(shape) == 4 and shape[0] == 1 else tuple(shape)


def _check_size(shape, limits: "Limits"):
    """Refuse, from the header alone, a volume of more voxels than ``limits`` allow."""
    voxels = math.prod(int(n) for n in shape)
    if voxels > limits.max_voxels:
        raise CaseError(f"declared shape {tuple(shape)} ({voxels} voxels) exceeds the memory limit "
                        f"of {limits.max_voxels} voxels (--memory-gb): refused without reading")


def _read_member(zf, info, limits: "Limits" = None, expect_shape=None):
    """One ``.npy`` member -> ndarray. Numeric data is read in chunks straight into the result
    (no full-size intermediate) once the header's size is found within ``limits``; object arrays
    are read with a byte limit and go through :func:`safe_unpickle_loads`. ``expect_shape``: a
    numeric member of another (squeezed) shape is refused before its data is read."""
    limits = limits or Limits()
    with zf.open(info) as fp:
        shape, fortran, dtype = _header(fp)
        if dtype.hasobject:
            if info.file_size > limits.max_object_bytes:
                raise CaseError(f"object member of {info.file_size} bytes exceeds the limit of "
                                f"{limits.max_object_bytes} bytes: refused without reading")
            arr = safe_unpickle_loads(fp.read(limits.max_object_bytes + 1), limits.max_pickle_items)
            if not isinstance(arr, np.ndarray):
                raise CaseError(f"object member holds {type(arr).__name__}, not an array")
            return arr
        if expect_shape is not None and _squeezed(shape) != tuple(expect_shape):
            raise CaseError(f"shape {tuple(shape)} != imgs {tuple(expect_shape)}")
        if len(shape) >= 3:
            _check_size(shape, limits)
        nbytes, stored = math.prod(shape) * dtype.itemsize, info.file_size - fp.tell()
        if stored != nbytes:
            raise CaseError(f"data size {stored} != {nbytes} for {shape} {dtype}")
        if len(shape) < 3 and nbytes > limits.max_object_bytes:
            raise CaseError(f"{nbytes} bytes for a {len(shape)}-D member exceed the limit of "
                            f"{limits.max_object_bytes} bytes: refused without reading")
        arr = np.empty(shape, dtype, order="F" if fortran else "C")
        flat = memoryview(arr.reshape(-1, order="A").view(np.uint8)) if nbytes else b""
        pos = 0
        while pos < nbytes:
            chunk = fp.read(min(_CHUNK, nbytes - pos))
            if not chunk:
                raise CaseError(f"truncated data: {pos} of {nbytes} bytes")
            flat[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
    return arr if dtype.isnative else arr.astype(dtype.newbyteorder("="))


def _volume(arr):
    """(D, H, W) numeric volume; a leading singleton axis of a 4D array is dropped."""
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3 or arr.dtype.kind not in "biuf":
        raise CaseError(f"expected a 3D numeric array, got shape {arr.shape} dtype {arr.dtype}")
    return arr


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


def _int(value, what):
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)):
        raise CaseError(f"{what}: expected an integer, got a bool")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and value == int(value):
        return int(value)
    raise CaseError(f"{what}: expected an integer, got {show(value)}")


def _entries(value, what, parse):
    """``parse`` applied to each class's entry; an entry it refuses becomes :class:`Malformed`
    (that class alone is lost), a key that is not a list of entries raises CaseError."""
    out = []
    for k, entry in enumerate(_per_class(value, what)):
        try:
            out.append(parse(entry, f"{what}[{k}]"))
        except CaseError as exc:
            out.append(Malformed(str(exc)))
        except (TypeError, ValueError, OverflowError) as exc:
            out.append(Malformed(f"{what}[{k}]: {type(exc).__name__}: {_exc_text(exc)}"))
    return out


def _box(box, what):
    if not isinstance(box, dict):
        raise CaseError(f"{what}: expected a dict, got {type(box).__name__}")
    out = {}
    for key, v in box.items():
        if not isinstance(key, str):
            raise CaseError(f"{what}: key {show(key)} is not a string")
        out[key] = _int(v, f"{what}[{show(key)}]")
    return out


def _points(value, what):
    points = []
    for i, p in enumerate(_as_list(value, what)):
        p = _as_list(p, f"{what}[{i}]")
        if len(p) != 3:
            raise CaseError(f"{what}[{i}]: expected [z, y, x], got {len(p)} values")
        points.append([_int(c, f"{what}[{i}]") for c in p])
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


def _spacing(arr):
    """3 positive finite floats, else None (a bad spacing only affects scoring, not prediction)."""
    try:
        values = tuple(float(v) for v in np.asarray(arr).reshape(-1)[:4].tolist())
    except (TypeError, ValueError):
        return None
    ok = len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values)
    return values if ok else None


_PROMPTS = {"boxes": _box, "clicks": _click, "clicks_order": _order}


def read_case(path, keys=None, limits: "Limits" = None) -> dict:
    """Read one case ``.npz`` without ever opening its ``gts`` member.

    ``keys``: which of the optional keys to read besides ``imgs`` (default: all); the others are
    None. ``read_case(path, keys=("prev_pred",))`` still gives a case whose prompts are malformed
    its image and previous prediction (the fallback output of ``python -m infer``).
    ``limits``: what the file may make the reader allocate (default :class:`Limits`).

    Returns a dict:
      - ``imgs``: ndarray (D, H, W) = (z, y, x), dtype as stored (native byte order; a 4D array
        with a leading singleton axis is squeezed to 3D; non-numeric dtypes are refused).
      - ``spacing``: tuple of 3 floats (z, y, x); None when absent or not 3 positive finite values.
      - ``boxes``: list (class k+1 at index k) of dicts of plain ints, or None when absent.
      - ``clicks``: list of ``{"fg": [[z, y, x], ...], "bg": [...]}`` (plain ints; a None entry or a
        missing side is empty) or None when absent.
      - ``clicks_order``: list (per class) of lists of "fg" / "bg" / None, or None when absent.
        In these three lists an entry that cannot be used is a :class:`Malformed` (that class
        alone is lost); a bare dict (also in a 0-d object array) is a list of one class.
      - ``prev_pred``: ndarray (D, H, W), same shape as ``imgs``, or None when absent or unusable.
      - ``warnings``: one-line messages about what was ignored (a ``prev_pred`` of the wrong
        shape, dtype or size).
      - ``name``: the file name (base name of ``path``).
    Raises CaseError (one line, "<file>: <key>: why") for a file that is not a regular file, a
    non-zip / truncated file, a missing, non-3D or too large ``imgs``, a refused pickle, a prompt
    key that is not a list of entries or an object member over the limits. Semantics of box keys
    and click coordinates (e.g. inside the volume) are not checked here.
    """
    limits = limits or Limits()
    base = os.path.basename(os.fspath(path))
    name = base if base.isprintable() else ascii(base)  # as python -m infer logs it
    try:
        f = _open_regular(path)
    except CaseError as exc:
        raise CaseError(f"{name}: {exc}") from None
    try:
        try:
            zf = zipfile.ZipFile(f)
        except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
            raise CaseError(f"{name}: not a readable npz ({type(exc).__name__}: {_exc_text(exc)})") from None
        case = {"name": base, "warnings": []}
        with zf:
            members = _members(zf)
            if "imgs" not in members:
                raise CaseError(f"{name}: imgs: missing")
            for key in ("imgs", "prev_pred", "spacing", "boxes", "clicks", "clicks_order"):
                if keys is not None and key != "imgs" and key not in keys:
                    case[key] = None
                    continue
                try:
                    shape = case["imgs"].shape if key == "prev_pred" else None
                    arr = _read_member(zf, members[key], limits, shape) if key in members else None
                    if key in ("imgs", "prev_pred"):
                        arr = None if arr is None else _volume(arr)
                    elif key == "spacing":
                        arr = None if arr is None else _spacing(arr)
                    elif arr is not None:
                        arr = _entries(arr, key, _PROMPTS[key])
                except CaseError as exc:
                    if key != "prev_pred":
                        raise CaseError(f"{name}: {key}: {exc}") from None
                    case["warnings"].append(f"prev_pred: {exc}: ignored")
                    arr = None
                except Exception as exc:  # corrupt member: zip CRC, header, memory, recursion
                    raise CaseError(f"{name}: {key}: {type(exc).__name__}: {_exc_text(exc)}") from None
                case[key] = arr
    finally:
        f.close()
    return case


def imgs_shape(path, limits: "Limits" = None):
    """(D, H, W) of a case's ``imgs`` from its npy header alone (no data read, nothing
    unpickled; a leading singleton axis dropped), or None when even that is unreadable, or when
    it exceeds ``limits`` (then no all-zero output of that shape is written either).
    For writing an all-zero fallback output when :func:`read_case` fails. A zip whose central
    directory is gone (a truncated file) is searched for the local header of ``imgs.npy``.
    Only regular files are opened."""
    limits = limits or Limits()
    try:
        f = _open_regular(path)
    except CaseError:
        return None
    with f:
        try:
            with zipfile.ZipFile(f) as zf, zf.open(_members(zf)["imgs"]) as fp:
                shape = _header(fp)[0]
        except Exception:
            shape = _imgs_shape_from_local_header(f)
            if shape is None:
                return None
    shape = _squeezed(shape)
    if len(shape) != 3 or math.prod(shape) > limits.max_voxels:
        return None
    return tuple(int(n) for n in shape)


def _imgs_shape_from_local_header(f, limit=1 << 16):
    """The ``imgs.npy`` npy header's shape found through its zip local file header (stored or
    deflated member), for files cut short before their central directory; None if not found.
    ``f``: the open file."""
    try:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos = mm.find(b"imgs.npy")
            while pos >= 30:
                head = mm[pos - 30:pos]
                sig, method, name_len, extra_len = head[:4], head[8:10], head[26:28], head[28:30]
                if sig == b"PK\x03\x04" and int.from_bytes(name_len, "little") == 8:
                    start = pos + 8 + int.from_bytes(extra_len, "little")
                    data = mm[start:start + limit]
                    method = int.from_bytes(method, "little")
                    if method == zipfile.ZIP_DEFLATED:
                        data = zlib.decompressobj(-15).decompress(data, limit)
                    elif method != zipfile.ZIP_STORED:
                        return None
                    return _header(io.BytesIO(data))[0]
                pos = mm.find(b"imgs.npy", pos + 1)
    except Exception:
        return None
    return None


def _temp_name(folder: str) -> str:
    """A new hidden name in ``folder``: short whatever the final name, never ``*.npz``."""
    return os.path.join(folder, f".tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", encoding=None, folder: bool = False):
    """``with atomic_write(path) as f: f.write(...)``: the one way this project replaces a file
    (or, ``folder=True``, a folder: the block gets the temporary folder's path and fills it).

    The data go to a new hidden ``.tmp-<pid>-<random>`` beside ``path`` (short whatever the final
    name, never matching ``*.npz``), created exclusively and without following links
    (``O_CREAT | O_EXCL | O_NOFOLLOW``, or ``mkdir``: a link or file planted at that name is an
    error, never written through), then renamed onto ``path`` (the rename replaces a link at
    ``path`` itself, never its target; an existing folder is moved aside first and removed after).
    A reader sees the old content or the whole new one. On any error, or a BaseException inside
    the block, the temporary is removed and ``path`` is left as it was.
    No fsync: outputs are read by the next process through the same page cache (an fsync cost
    10-300 ms per 78 MB here, docs/PERFORMANCE.md); it guards only against the host losing power.
    """
    import shutil
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    tmp = _temp_name(parent)
    if folder:
        os.mkdir(tmp)
    else:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(tmp, flags, 0o666)
    try:
        if folder:
            yield tmp
            old = None
            if os.path.isdir(path) and not os.path.islink(path):
                old = _temp_name(parent)
                os.rename(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                if old is not None:
                    os.rename(old, path)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            with os.fdopen(fd, mode, encoding=encoding) as f:
                yield f
            os.replace(tmp, path)
    except BaseException:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def write_segs(path, segs) -> None:
    """Write ``segs`` (D, H, W) uint8/uint16 as an uncompressed npz holding only the key ``segs``,
    through :func:`atomic_write` (hidden short temporary in the same folder, then a rename).
    On any error the temporary file is removed and ``path`` is left as it was. Raises
    ValueError for a wrong dtype or shape.
    """
    if not isinstance(segs, np.ndarray) or segs.dtype not in (np.dtype("u1"), np.dtype("u2")):
        got = getattr(segs, "dtype", type(segs).__name__)
        raise ValueError(f"segs must be a native uint8 or uint16 ndarray, got {got}")
    if segs.ndim != 3:
        raise ValueError(f"segs must be 3D (D, H, W), got shape {segs.shape}")
    arr = np.ascontiguousarray(segs)
    header = io.BytesIO()
    npformat.write_array_header_1_0(header, npformat.header_data_from_array_1_0(arr))
    header = header.getvalue()
    info = zipfile.ZipInfo("segs.npy", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = len(header) + arr.nbytes  # known size: zipfile switches to zip64 when needed
    with atomic_write(path) as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf, zf.open(info, "w") as member:
            member.write(header)
            if arr.nbytes:
                member.write(arr)  # buffer protocol: no copy of the array bytes
