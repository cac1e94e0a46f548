"""Reading case files: one interactive-segmentation case from an ``.npz``, bounded and safe.

Arrays are in array-index order of ``imgs``: (D, H, W) = (z, y, x), axis 0 = z. Reading never
runs code from the file: numeric arrays are read with pickling off, and the object arrays
(``boxes``, ``clicks``, ``clicks_order``) go through ``infer.unpickle.safe_unpickle_loads`` and
``infer.entries``. ``gts`` is never opened. A key names the member ``np.load`` would give for it:
a member of exactly that name, else ``<key>.npy``.

Reading is bounded (:class:`Limits`), always from what the file declares, before anything is
allocated: only regular files are opened (a FIFO, device, socket or folder is refused without
blocking); a zip whose end-of-central-directory record declares more than ``max_entries``
entries or a central directory over ``MAX_CENTRAL_DIRECTORY`` bytes is refused before
``zipfile`` parses it; ``imgs`` and ``prev_pred`` must declare a numeric dtype, and the case's
modelled peak memory (``infer.limits``: bytes per voxel from both itemsizes) must fit the limit;
zip members are never read past their declared size, so a deflate bomb is refused by what it
declares; object members are read with a byte limit and unpickled with a limit on the opcodes
run and the items reused.
"""
import dataclasses
import io
import math
import os
import stat
import zipfile
import zlib

import numpy as np
from numpy.lib import format as npformat

from .entries import PARSERS, Malformed, entries  # noqa: F401 - Malformed: what read_case may hold
from .errors import CaseError, exc_text
from .limits import DEFAULT_MEMORY_GB, GB, bytes_per_voxel, peak_bytes
from .unpickle import MAX_PICKLE_ITEMS, safe_unpickle_loads

_CHUNK = 1 << 20  # bytes per read from a zip member: small enough to stay in cache
_KEYS = ("imgs", "prev_pred", "spacing", "boxes", "clicks", "clicks_order")  # never "gts"
_VOLUMES = ("imgs", "prev_pred")
MAX_ZIP_ENTRIES = 64  # a case holds at most 7 members (8 with gts)
MAX_CENTRAL_DIRECTORY = 1 << 20  # bytes; 64 entries with names of a few kB each fit
LOCAL_HEADER_SCAN = 4 << 20  # bytes of a truncated file searched for the imgs local header
# Object members: 1000 classes with a box and 6 clicks each, pickled by np.save as the organizer's
# files hold them, take at most 382 kB and 182 k opcodes (clicks with numpy int64 coordinates;
# plain ints: 90 kB, 56 k); these limits are 5.5x that (docs/HARDENING.md).
MAX_OBJECT_BYTES = 2 << 20


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one case may make the reader allocate.

    ``max_bytes``: the modelled peak memory of a case (``infer.limits.peak_bytes`` from the
    headers of ``imgs`` and ``prev_pred``) may not exceed it; :meth:`for_memory` sets it from
    ``--memory-gb``. ``max_object_bytes``: largest object (pickle) member or 1-D / 2-D numeric
    member, as declared (1000 classes x 6 clicks pickle to at most 382 kB). ``max_pickle_items``:
    opcodes one pickle may run plus the items its memo reuses stand for. ``max_entries``: zip
    entries a case file may declare.
    """

    max_bytes: int = int(DEFAULT_MEMORY_GB * GB)
    max_object_bytes: int = MAX_OBJECT_BYTES
    max_pickle_items: int = MAX_PICKLE_ITEMS
    max_entries: int = MAX_ZIP_ENTRIES

    @property
    def max_voxels(self) -> int:
        """The largest uint8 ``imgs`` without ``prev_pred`` the byte model admits (a single figure
        to quote; the check itself is :attr:`max_bytes` against the model)."""
        return max(self.max_bytes // bytes_per_voxel(1), 1)

    @classmethod
    def for_memory(cls, gigabytes: float, **kw) -> "Limits":
        """Limits for a run allowed ``gigabytes`` (2^30 bytes each) of host memory."""
        return cls(max_bytes=max(int(gigabytes * GB), 1), **kw)


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


def _declared_entries(f):
    """(entries, central directory bytes) as the end-of-central-directory record of the open
    file ``f`` declares them (its zip64 record when a zip64 locator precedes it, as ``zipfile``
    reads them), or None when there is no such record (not a zip: ``zipfile`` says so). Reads
    at most the last 64 kB + 22 bytes and the 56-byte zip64 record."""
    size = os.fstat(f.fileno()).st_size
    n = min(size, 22 + 0xFFFF)
    f.seek(size - n)
    tail = f.read(n)
    if len(tail) >= 22 and tail[-22:-18] == b"PK\x05\x06" and tail[-2:] == b"\0\0":
        pos = len(tail) - 22  # no comment: zipfile takes the last 22 bytes first
    else:
        pos = tail.rfind(b"PK\x05\x06")
        if pos < 0 or len(tail) - pos < 22:
            return None
    entries = int.from_bytes(tail[pos + 10:pos + 12], "little")
    cd_size = int.from_bytes(tail[pos + 12:pos + 16], "little")
    loc = size - n + pos - 20  # zip64 locator, then the zip64 record just before it
    if loc >= 56:
        f.seek(loc - 56)
        rec = f.read(76)
        if rec[56:60] == b"PK\x06\x07" and rec[:4] == b"PK\x06\x06":
            entries = int.from_bytes(rec[32:40], "little")
            cd_size = int.from_bytes(rec[40:48], "little")
    return entries, cd_size


def _open_zip(f, limits: "Limits"):
    """``zipfile.ZipFile(f)`` once the end-of-central-directory record declares at most
    ``limits.max_entries`` entries and a central directory of at most MAX_CENTRAL_DIRECTORY bytes
    (``zipfile`` parses the whole central directory when it opens: 1.5 M entries took 15-20 s)."""
    declared = _declared_entries(f)
    if declared is not None:
        entries, cd_size = declared
        if entries > limits.max_entries or cd_size > MAX_CENTRAL_DIRECTORY:
            raise CaseError(f"zip declares {entries} entries in a central directory of {cd_size} bytes "
                            f"(a case file holds at most {limits.max_entries} entries in "
                            f"{MAX_CENTRAL_DIRECTORY} bytes): refused before parsing it")
    f.seek(0)
    return zipfile.ZipFile(f)


def _members(zf):
    """Key -> ZipInfo of the member ``np.load(path)[key]`` reads: a member named exactly ``key``,
    else ``key + ".npy"`` (as ``np.load``'s NpzFile maps keys; of two members of one name, the
    last, as ``zipfile`` gives). ``gts`` is left out."""
    by_name = {i.filename: i for i in zf.infolist()}
    found = {}
    for key in _KEYS:
        for name in (key, key + ".npy"):
            if name in by_name:
                found[key] = by_name[name]
                break
    return found


def _header(fp):
    """(shape, fortran_order, dtype) from an open .npy stream, leaving it at the data."""
    version = npformat.read_magic(fp)
    if version not in _HEADER_READERS:
        raise CaseError(f"unsupported npy format version {version}")
    return _HEADER_READERS[version](fp)


def _dropped_axes(shape):
    """(leading, trailing) singleton axes a volume of ``shape`` drops beyond three: leading ones
    first, so (1, D, H, W), (D, H, W, 1) and (1, D, H, W, 1) are all (D, H, W)."""
    shape = tuple(shape)
    lead = 0
    while len(shape) - lead > 3 and shape[lead] == 1:
        lead += 1
    trail = 0
    while len(shape) - lead - trail > 3 and shape[len(shape) - 1 - trail] == 1:
        trail += 1
    return lead, trail


def _squeezed(shape):
    """A volume shape as :func:`read_case` gives it (see :func:`_dropped_axes`)."""
    lead, trail = _dropped_axes(shape)
    return tuple(int(n) for n in shape[lead:len(shape) - trail])


def _text(dtype) -> str:
    text = str(dtype)
    return text if len(text) <= 40 else text[:37] + "..."


def _shape_text(shape) -> str:
    return "x".join(str(int(n)) for n in shape)


def _check_memory(shape, imgs_dtype, prev_dtype, limits: "Limits"):
    """Refuse, from the headers alone, a case whose modelled peak memory exceeds ``limits``."""
    need = peak_bytes(math.prod(shape), imgs_dtype.itemsize,
                      None if prev_dtype is None else prev_dtype.itemsize)
    if need > limits.max_bytes:
        prev = "" if prev_dtype is None else f" with a {_text(prev_dtype)} prev_pred"
        raise CaseError(f"needs about {need / GB:.3g} GB for {_shape_text(shape)} {_text(imgs_dtype)} "
                        f"imgs{prev} (limit {limits.max_bytes / GB:g} GB, --memory-gb): refused from "
                        f"its header")


def _check_volume_header(key, shape, dtype, limits, imgs_dtype=None, imgs_shape=None):
    """Refuse from the header: a non-numeric dtype, a shape that is not 3-D once singleton axes
    are dropped, a ``prev_pred`` of another shape than ``imgs``, a case over the memory limit
    (``prev_pred``: counted with ``imgs_dtype``)."""
    vol = _squeezed(shape)
    if dtype.kind not in "biuf" or len(vol) != 3:
        raise CaseError(f"expected a 3D numeric array, got shape {tuple(shape)} dtype {_text(dtype)}: "
                        f"refused from its header")
    if key == "prev_pred":
        if vol != tuple(imgs_shape):
            raise CaseError(f"shape {tuple(shape)} != imgs {tuple(imgs_shape)}")
        _check_memory(vol, imgs_dtype, dtype, limits)
    else:
        _check_memory(vol, dtype, None, limits)


def _target_dtype(dtype):
    """The dtype a numeric member is read as: native byte order; float128 (longdouble) as float64."""
    if dtype.kind == "f" and dtype.itemsize > 8:
        return np.dtype(np.float64)
    return dtype.newbyteorder("=")


def _fill(fp, arr, dtype, nbytes):
    """Read ``nbytes`` of ``dtype`` data from ``fp`` into ``arr`` (its memory order), in chunks
    of about _CHUNK bytes: no full-size intermediate, also when converting (byte order, float128)."""
    flat = arr.reshape(-1, order="A")
    if arr.dtype == dtype:
        view, pos = memoryview(flat.view(np.uint8)) if nbytes else b"", 0
        while pos < nbytes:
            chunk = fp.read(min(_CHUNK, nbytes - pos))
            if not chunk:
                raise CaseError(f"truncated data: {pos} of {nbytes} bytes")
            view[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
        return
    step, done, count = max(_CHUNK // dtype.itemsize, 1), 0, flat.size
    while done < count:
        want = min(step, count - done) * dtype.itemsize
        chunk = fp.read(want)
        while len(chunk) < want:
            more = fp.read(want - len(chunk))
            if not more:
                raise CaseError(f"truncated data: {done * dtype.itemsize + len(chunk)} of {nbytes} bytes")
            chunk += more
        values = np.frombuffer(chunk, dtype)
        flat[done:done + len(values)] = values
        done += len(values)


def _read_member(zf, info, limits: "Limits" = None, key=None, imgs=None):
    """One ``.npy`` member -> (ndarray, declared dtype). ``key`` in ("imgs", "prev_pred"): the
    header is checked first (:func:`_check_volume_header`; ``imgs``: (array, declared dtype) of
    the case's imgs, for prev_pred's shape and memory) and singleton axes beyond three are
    dropped. Numeric data is read in chunks straight into the result (float128 as float64,
    native byte order); object arrays are read with a byte limit and go through
    :func:`safe_unpickle_loads`."""
    limits = limits or Limits()
    with zf.open(info) as fp:
        shape, fortran, dtype = _header(fp)
        if key in _VOLUMES:
            _check_volume_header(key, shape, dtype, limits, *((imgs[1], imgs[0].shape) if imgs else ()))
        elif dtype.hasobject:
            if info.file_size > limits.max_object_bytes:
                raise CaseError(f"object member of {info.file_size} bytes exceeds the limit of "
                                f"{limits.max_object_bytes} bytes: refused without reading")
            arr = safe_unpickle_loads(fp.read(limits.max_object_bytes + 1), limits.max_pickle_items)
            if not isinstance(arr, np.ndarray):
                raise CaseError(f"object member holds {type(arr).__name__}, not an array")
            return arr, dtype
        nbytes, stored = math.prod(shape) * dtype.itemsize, info.file_size - fp.tell()
        if stored != nbytes:
            raise CaseError(f"data size {stored} != {nbytes} for {shape} {_text(dtype)}")
        if key not in _VOLUMES and nbytes > limits.max_object_bytes:
            raise CaseError(f"{nbytes} bytes for a {len(shape)}-D member exceed the limit of "
                            f"{limits.max_object_bytes} bytes: refused without reading")
        arr = np.empty(shape, _target_dtype(dtype), order="F" if fortran else "C")
        _fill(fp, arr, dtype, nbytes)
    if key in _VOLUMES:
        lead, trail = _dropped_axes(shape)
        arr = arr[(0,) * lead + (Ellipsis,) + (0,) * trail]  # a view
    return arr, dtype


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
    Each key is read from the member ``np.load(path)[key]`` reads (exactly ``key``, else
    ``key.npy``).

    Returns a dict:
      - ``imgs``: ndarray (D, H, W) = (z, y, x), dtype as stored (native byte order; float128 read
        as float64; singleton axes beyond three dropped: (1, D, H, W), (D, H, W, 1) and
        (1, D, H, W, 1) are (D, H, W); non-numeric dtypes are refused from the header).
      - ``spacing``: tuple of 3 floats (z, y, x); None when absent or not 3 positive finite values.
      - ``boxes``: list (class k+1 at index k) of dicts of plain ints, or None when absent.
      - ``clicks``: list of ``{"fg": [[z, y, x], ...], "bg": [...]}`` (plain ints; a None entry or a
        missing side is empty) or None when absent.
      - ``clicks_order``: list (per class) of lists of "fg" / "bg" / None, or None when absent.
        In these three lists an entry that cannot be used is a :class:`Malformed` (that class
        alone is lost); a bare dict (also in a 0-d object array) is a list of one class.
      - ``prev_pred``: ndarray (D, H, W), same shape as ``imgs`` (read as ``imgs`` is), or None
        when absent or unusable.
      - ``warnings``: one-line messages about what was ignored (a ``prev_pred`` of the wrong
        shape, dtype or size, or one that would take the case over the memory limit).
      - ``name``: the file name (base name of ``path``).
    Raises CaseError (one line, "<file>: <key>: why") for a file that is not a regular file, a
    non-zip / truncated file, a zip of too many entries, a missing, non-3D, non-numeric or too
    large ``imgs``, a refused pickle, a prompt key that is not a list of entries or an object
    member over the limits. Semantics of box keys and click coordinates (e.g. inside the volume)
    are not checked here.
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
            zf = _open_zip(f, limits)
        except CaseError as exc:
            raise CaseError(f"{name}: {exc}") from None
        except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
            raise CaseError(f"{name}: not a readable npz ({type(exc).__name__}: {exc_text(exc)})") from None
        case = {"name": base, "warnings": []}
        with zf:
            members = _members(zf)
            if "imgs" not in members:
                raise CaseError(f"{name}: imgs: missing")
            imgs = None  # (array, declared dtype)
            for key in _KEYS:
                wanted = keys is None or key == "imgs" or key in keys
                got = _read_key(zf, members, key, case, limits, imgs) if wanted else None
                if key == "imgs":
                    imgs = got
                case[key] = got[0] if key in _VOLUMES and got is not None else got
    finally:
        f.close()
    return case


def imgs_shape(path, limits: "Limits" = None):
    """(D, H, W) of a case's ``imgs`` from its npy header alone (no data read, nothing
    unpickled; singleton axes beyond three dropped as :func:`read_case` drops them), or None
    when even that is unreadable, or when the case's modelled memory exceeds ``limits`` (the
    rule of :func:`read_case`, from the header's itemsize; then no all-zero output of that shape
    is written either). For writing an all-zero fallback output when :func:`read_case` fails. A
    zip whose central directory is gone (a truncated file) or refused (too many entries) is
    searched for the local header of ``imgs`` (or ``imgs.npy``) in its first LOCAL_HEADER_SCAN
    bytes. Only regular files are opened."""
    limits = limits or Limits()
    try:
        f = _open_regular(path)
    except CaseError:
        return None
    with f:
        try:
            with _open_zip(f, limits) as zf, zf.open(_members(zf)["imgs"]) as fp:
                shape, _, dtype = _header(fp)
        except Exception:
            found = _imgs_header_from_local_header(f)
            if found is None:
                return None
            shape, _, dtype = found
    shape = _squeezed(shape)
    if len(shape) != 3 or peak_bytes(math.prod(shape), dtype.itemsize) > limits.max_bytes:
        return None
    return shape


def _imgs_header_from_local_header(f, bound=LOCAL_HEADER_SCAN, limit=1 << 16):
    """The npy header (shape, fortran_order, dtype) of ``imgs`` found through its zip local file
    header (stored or deflated member; a member named ``imgs`` before one named ``imgs.npy``),
    for files cut short before their central directory; None if not found. Only the first
    ``bound`` bytes of the open file ``f`` are searched, with plain reads (a file truncated
    meanwhile reads short; nothing is mapped), then ``limit`` bytes of the member."""
    try:
        f.seek(0)
        data = f.read(bound)
        found = {}
        pos = data.find(b"PK\x03\x04")
        while 0 <= pos <= len(data) - 30:
            name_len = int.from_bytes(data[pos + 26:pos + 28], "little")
            name = data[pos + 30:pos + 30 + name_len]
            if name in (b"imgs", b"imgs.npy") and name not in found:
                found[name] = pos
            pos = data.find(b"PK\x03\x04", pos + 1)
        pos = found.get(b"imgs", found.get(b"imgs.npy"))
        if pos is None:
            return None
        head = data[pos:pos + 30]
        method = int.from_bytes(head[8:10], "little")
        start = pos + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")
        f.seek(start)
        member = f.read(limit)
        if method == zipfile.ZIP_DEFLATED:
            member = zlib.decompressobj(-15).decompress(member, limit)
        elif method != zipfile.ZIP_STORED:
            return None
        return _header(io.BytesIO(member))
    except Exception:
        return None


def _shown(base: str) -> str:
    """A file name as messages show it (as python -m infer logs it)."""
    return base if base.isprintable() else ascii(base)


def _read_key(zf, members, key: str, case: dict, limits: Limits, imgs=None):
    """One key of a case (``case`` holds the keys read so far: ``imgs`` first; ``imgs``: its
    (array, declared dtype)), or None when absent; ``imgs`` and ``prev_pred`` as (array,
    declared dtype). A bad ``prev_pred`` is a warning in ``case["warnings"]``; any other bad key
    raises CaseError ("<file>: <key>: why")."""
    name = _shown(case["name"])
    try:
        if key not in members:
            return None
        arr, dtype = _read_member(zf, members[key], limits, key, imgs)
        if key in _VOLUMES:
            return arr, dtype
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
