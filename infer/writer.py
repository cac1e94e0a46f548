"""Writing: the one atomic file replacement of the project, the ``segs`` writer, and the label
dtype rule (stdlib + numpy)."""
import contextlib
import io
import os
import secrets
import shutil
import time
import zipfile
from typing import Optional

import numpy as np
from numpy.lib import format as npformat

from .errors import CaseError


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


TEMP_PREFIX = ".tmp-"
STALE_SECONDS = 120  # a temporary untouched this long belongs to a run that died


def temp_name(folder: str) -> str:
    """A new hidden name in ``folder``: short whatever the final name, never ``*.npz``."""
    return os.path.join(folder, f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")


def remove_stale_temporaries(folder: str, older_than: float = STALE_SECONDS, now: Optional[float] = None) -> int:
    """Remove the temporaries (``.tmp-*`` files and folders) in ``folder`` that nothing has
    written to for ``older_than`` seconds: left by a run that was killed while writing. A
    writer fills its temporary within seconds, so a live one is never that old. Returns how
    many were removed; ones that cannot be removed are left alone."""
    now = time.time() if now is None else now
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < older_than:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError:
            continue
    return removed


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
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    tmp = temp_name(parent)
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
                old = temp_name(parent)
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
