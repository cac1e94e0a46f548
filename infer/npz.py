"""Reading case files: one interactive-segmentation case from an ``.npz``, bounded and safe.

Arrays are in array-index order of ``imgs``: (D, H, W) = (z, y, x), axis 0 = z. Reading never
runs code from the file: numeric arrays are read with pickling off, and the object arrays
(``boxes``, ``clicks``, ``clicks_order``) go through ``infer.unpickle.safe_unpickle_loads`` and
``infer.entries``. ``gts`` is never opened.

Reading is bounded (:class:`Limits`): only regular files are opened (a FIFO, device, socket or
folder is refused without blocking); an array whose declared size exceeds the limits is refused
from its header, before any byte is decompressed (zip members are never read past their declared
size, so a deflate bomb is refused by what it declares); object members are read with a byte
limit and unpickled with a limit on the items they may expand to (memo reuse included).
"""
import dataclasses
import io
import math
import mmap
import os
import stat
import zipfile
import zlib

import numpy as np
from numpy.lib import format as npformat

from .entries import PARSERS, Malformed, entries  # noqa: F401 - Malformed: what read_case may hold
from .errors import CaseError, exc_text
from .limits import BYTES_PER_VOXEL, DEFAULT_MEMORY_GB
from .unpickle import MAX_PICKLE_ITEMS, safe_unpickle_loads

_CHUNK = 1 << 20  # bytes per read from a zip member: small enough to stay in cache


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
    max_pickle_items: int = MAX_PICKLE_ITEMS

    @classmethod
    def for_memory(cls, gigabytes: float, **kw) -> "Limits":
        """Limits for a run allowed ``gigabytes`` of host memory (BYTES_PER_VOXEL per voxel)."""
        return cls(max_voxels=max(int(gigabytes * 2**30) // BYTES_PER_VOXEL, 1), **kw)


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


def _spacing(arr):
    """3 positive finite floats, else None (a bad spacing only affects scoring, not prediction)."""
    try:
        values = tuple(float(v) for v in np.asarray(arr).reshape(-1)[:4].tolist())
    except (TypeError, ValueError):
        return None
    ok = len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values)
    return values if ok else None


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
    name = _shown(base)
    try:
        f = _open_regular(path)
    except CaseError as exc:
        raise CaseError(f"{name}: {exc}") from None
    try:
        try:
            zf = zipfile.ZipFile(f)
        except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
            raise CaseError(f"{name}: not a readable npz ({type(exc).__name__}: {exc_text(exc)})") from None
        case = {"name": base, "warnings": []}
        with zf:
            members = _members(zf)
            if "imgs" not in members:
                raise CaseError(f"{name}: imgs: missing")
            for key in ("imgs", "prev_pred", "spacing", "boxes", "clicks", "clicks_order"):
                wanted = keys is None or key == "imgs" or key in keys
                case[key] = _read_key(zf, members, key, case, limits) if wanted else None
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


def _shown(base: str) -> str:
    """A file name as messages show it (as python -m infer logs it)."""
    return base if base.isprintable() else ascii(base)


def _read_key(zf, members, key: str, case: dict, limits: Limits):
    """One key of a case (``case`` holds the keys read so far: ``imgs`` first), or None when
    absent. A bad ``prev_pred`` is a warning in ``case["warnings"]``; any other bad key raises
    CaseError ("<file>: <key>: why")."""
    name = _shown(case["name"])
    try:
        shape = case["imgs"].shape if key == "prev_pred" else None
        arr = _read_member(zf, members[key], limits, shape) if key in members else None
        if arr is None:
            return None
        if key in ("imgs", "prev_pred"):
            return _volume(arr)
        if key == "spacing":
            return _spacing(arr)
        return entries(arr, key, PARSERS[key])
    except CaseError as exc:
        if key != "prev_pred":
            raise CaseError(f"{name}: {key}: {exc}") from None
        case["warnings"].append(f"prev_pred: {exc}: ignored")
        return None
    except Exception as exc:  # corrupt member: zip CRC, header, memory, recursion
        raise CaseError(f"{name}: {key}: {type(exc).__name__}: {exc_text(exc)}") from None
