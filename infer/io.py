"""Case files: read one interactive-segmentation case, write one label map.

The only module that touches case files (standard library + numpy). Arrays are in array-index
order of ``imgs``: (D, H, W) = (z, y, x), axis 0 = z.

Reading never runs code from the file: numeric arrays are read with pickling off, and the object
arrays that ``np.savez`` stores as pickles (``boxes``, ``clicks``, ``clicks_order``) go through
:func:`safe_unpickle_loads`, which admits only numpy's array / dtype / scalar reconstructors.
``gts`` is never opened.
"""
import contextlib
import io
import math
import mmap
import os
import pickle
import zipfile
import zlib

import numpy as np
from numpy.lib import format as npformat

__all__ = ["CaseError", "read_case", "imgs_shape", "write_segs", "safe_unpickle_loads"]

_CHUNK = 1 << 20  # bytes per read from a zip member: small enough to stay in cache


class CaseError(ValueError):
    """A case file that cannot be used as given; the message is one line."""


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
        raise CaseError(f"refused pickle dtype {spec!r:.40}")
    return dtype


_ALLOWED = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _dtype,
            ("_codecs", "encode"): _latin1_encode}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 and 2 spellings
    _ALLOWED[(_module, "_reconstruct")] = _reconstruct
    _ALLOWED[(_module, "scalar")] = _SCALAR


class _RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler (so BUILD can be checked) that resolves only the globals ``np.save``
    of dicts / lists / str / int / float / None / numpy arrays and scalars produces."""

    dispatch = dict(pickle._Unpickler.dispatch)

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
                raise CaseError(f"refused pickle dtype state {state!r:.60}")
        elif type(inst) is not np.ndarray:
            raise CaseError(f"refused pickle BUILD on {type(inst).__name__}")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build


def safe_unpickle_loads(data: bytes):
    """``pickle.loads`` restricted to plain Python containers and numpy arrays / scalars.

    Raises CaseError("refused pickle global module.name") for any other global; nothing runs.
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except CaseError:
        raise
    except Exception as exc:  # truncated or malformed pickle stream
        raise CaseError(f"bad pickle ({type(exc).__name__}: {exc})") from None


_HEADER_READERS = {(1, 0): npformat.read_array_header_1_0, (2, 0): npformat.read_array_header_2_0}


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


def _read_member(zf, info):
    """One ``.npy`` member -> ndarray. Numeric data is read in chunks straight into the result
    (no full-size intermediate); object arrays go through :func:`safe_unpickle_loads`."""
    with zf.open(info) as fp:
        shape, fortran, dtype = _header(fp)
        if dtype.hasobject:
            arr = safe_unpickle_loads(fp.read())
            if not isinstance(arr, np.ndarray):
                raise CaseError(f"object member holds {type(arr).__name__}, not an array")
            return arr
        nbytes, stored = math.prod(shape) * dtype.itemsize, info.file_size - fp.tell()
        if stored != nbytes:
            raise CaseError(f"data size {stored} != {nbytes} for {shape} {dtype}")
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


def _int(value, what):
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)):
        raise CaseError(f"{what}: expected an integer, got a bool")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and value == int(value):
        return int(value)
    raise CaseError(f"{what}: expected an integer, got {value!r:.40}")


def _boxes(value):
    value = [value] if isinstance(value, dict) else _as_list(value, "boxes")
    out = []
    for k, box in enumerate(value):
        if not isinstance(box, dict):
            raise CaseError(f"boxes[{k}]: expected a dict, got {type(box).__name__}")
        out.append({str(key): _int(v, f"boxes[{k}][{key!r}]") for key, v in box.items()})
    return out


def _points(value, what):
    points = []
    for i, p in enumerate(_as_list(value, what)):
        p = _as_list(p, f"{what}[{i}]")
        if len(p) != 3:
            raise CaseError(f"{what}[{i}]: expected [z, y, x], got {len(p)} values")
        points.append([_int(c, f"{what}[{i}]") for c in p])
    return points


def _clicks(value):
    value = [value] if isinstance(value, dict) else _as_list(value, "clicks")
    out = []
    for k, entry in enumerate(value):
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise CaseError(f"clicks[{k}]: expected a dict, got {type(entry).__name__}")
        out.append({s: _points(entry.get(s, []), f"clicks[{k}][{s!r}]") for s in ("fg", "bg")})
    return out


def _clicks_order(value):
    out = []
    for k, steps in enumerate(_as_list(value, "clicks_order")):
        steps = _as_list(steps, f"clicks_order[{k}]")
        for s in steps:
            if s is not None and not (isinstance(s, str) and s in ("fg", "bg")):
                raise CaseError(f"clicks_order[{k}]: unexpected entry {s!r:.40}")
        out.append([None if s is None else str(s) for s in steps])
    return out


def _spacing(arr):
    """3 positive finite floats, else None (a bad spacing only affects scoring, not prediction)."""
    try:
        values = tuple(float(v) for v in np.asarray(arr).reshape(-1).tolist())
    except (TypeError, ValueError):
        return None
    ok = len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values)
    return values if ok else None


_PROMPTS = {"boxes": _boxes, "clicks": _clicks, "clicks_order": _clicks_order}


def read_case(path, keys=None) -> dict:
    """Read one case ``.npz`` without ever opening its ``gts`` member.

    ``keys``: which of the optional keys to read besides ``imgs`` (default: all); the others are
    None. ``read_case(path, keys=("prev_pred",))`` still gives a case whose prompts are malformed
    its image and previous prediction (the fallback output of ``python -m infer``).

    Returns a dict:
      - ``imgs``: ndarray (D, H, W) = (z, y, x), dtype as stored (native byte order; a 4D array
        with a leading singleton axis is squeezed to 3D; non-numeric dtypes are refused).
      - ``spacing``: tuple of 3 floats (z, y, x); None when absent or not 3 positive finite values.
      - ``boxes``: list of dicts of plain ints (class k+1 at index k) or None when absent.
      - ``clicks``: list of ``{"fg": [[z, y, x], ...], "bg": [...]}`` (plain ints; a None entry or a
        missing side is empty) or None when absent.
      - ``clicks_order``: list (per class) of lists of "fg" / "bg" / None, or None when absent.
      - ``prev_pred``: ndarray (D, H, W), same shape as ``imgs``, or None when absent.
      - ``name``: the file name (base name of ``path``).
    Raises CaseError (one line, "<file>: <key>: why") for a non-zip / truncated file, a missing or
    non-3D ``imgs``, a refused pickle global, a malformed prompt entry or a ``prev_pred`` whose
    shape differs from ``imgs``. Semantics of box keys and click coordinates (e.g. inside the
    volume) are not checked here.
    """
    name = os.path.basename(os.fspath(path))
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise CaseError(f"{name}: not a readable npz ({type(exc).__name__}: {exc})") from None
    case = {"name": name}
    with zf:
        members = _members(zf)
        if "imgs" not in members:
            raise CaseError(f"{name}: imgs: missing")
        for key in ("imgs", "prev_pred", "spacing", "boxes", "clicks", "clicks_order"):
            if keys is not None and key != "imgs" and key not in keys:
                case[key] = None
                continue
            try:
                arr = _read_member(zf, members[key]) if key in members else None
                if key in ("imgs", "prev_pred"):
                    arr = None if arr is None else _volume(arr)
                    if key == "prev_pred" and arr is not None and arr.shape != case["imgs"].shape:
                        raise CaseError(f"shape {arr.shape} != imgs {case['imgs'].shape}")
                elif key == "spacing":
                    arr = None if arr is None else _spacing(arr)
                elif arr is not None:
                    arr = _PROMPTS[key](arr)
            except CaseError as exc:
                raise CaseError(f"{name}: {key}: {exc}") from None
            except Exception as exc:  # corrupt member: zip CRC, header, memory, recursion
                msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")
                raise CaseError(f"{name}: {key}: {msg}") from None
            case[key] = arr
    return case


def imgs_shape(path):
    """(D, H, W) of a case's ``imgs`` from its npy header alone (no data read, nothing
    unpickled; a leading singleton axis dropped), or None when even that is unreadable.
    For writing an all-zero fallback output when :func:`read_case` fails. A zip whose central
    directory is gone (a truncated file) is searched for the local header of ``imgs.npy``."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(_members(zf)["imgs"]) as fp:
            shape = _header(fp)[0]
    except Exception:
        shape = _imgs_shape_from_local_header(path)
        if shape is None:
            return None
    shape = shape[1:] if len(shape) == 4 and shape[0] == 1 else shape
    return tuple(int(n) for n in shape) if len(shape) == 3 else None


def _imgs_shape_from_local_header(path, limit=1 << 16):
    """The ``imgs.npy`` npy header's shape found through its zip local file header (stored or
    deflated member), for files cut short before their central directory; None if not found."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
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


def write_segs(path, segs) -> None:
    """Write ``segs`` (D, H, W) uint8/uint16 as an uncompressed npz holding only the key ``segs``.

    Atomic: the bytes go to ``.<name>.tmp-<pid>`` in the same folder (never matches ``*.npz``),
    then are renamed over ``path``: a reader sees the old file or the whole new one, never a part.
    No fsync: the harness reads the file after this process exits, through the same page cache;
    fsync guards only against the host losing power and cost 10-300 ms per 78 MB here
    (docs/PERFORMANCE.md). On any error the temporary file is removed and ``path`` is left as it
    was. Raises ValueError for a wrong dtype or shape.
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
    path = os.path.abspath(os.fspath(path))
    folder, base = os.path.split(path)
    tmp = os.path.join(folder, f".{base}.tmp-{os.getpid()}")
    info = zipfile.ZipInfo("segs.npy", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = len(header) + arr.nbytes  # known size: zipfile switches to zip64 when needed
    try:
        with open(tmp, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf, zf.open(info, "w") as member:
                member.write(header)
                if arr.nbytes:
                    member.write(arr)  # buffer protocol: no copy of the array bytes
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
