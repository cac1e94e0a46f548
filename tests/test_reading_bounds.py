"""Reading a case file within bounds set from what it declares: memory counted in bytes from the
headers, float128 and singleton axes read, members named as ``np.load`` names them, a bounded
search of truncated files, a cap on zip entries, and pickles charged per opcode.

Each test names the guard it proves; with that guard removed the test fails (docs/HARDENING.md).
"""
from __future__ import annotations

import io
import mmap
import pickle
import time
import zipfile

import numpy as np
import pytest
from numpy.lib import format as npformat

import infer.npz
import infer.unpickle
from infer.errors import CaseError
from infer.limits import GB, peak_bytes
from infer.npz import LOCAL_HEADER_SCAN, Limits, imgs_shape, read_case
from tests.test_hostile import BOXES, SHAPE, image, object_member, objects, run, segs_of, summary
from tests.tinymodel import make_artifact


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("model"))


def npy_header(shape, dtype) -> bytes:
    buf = io.BytesIO()
    npformat.write_array_header_1_0(buf, {"descr": npformat.dtype_to_descr(np.dtype(dtype)),
                                          "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def write_zeros_member(path, shape, dtype, others=None):
    """A deflated zip whose imgs.npy holds all its declared zero data (small on disk)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("imgs.npy", "w", force_zip64=True) as fp:
            fp.write(npy_header(shape, dtype))
            zeros = bytes(1 << 20)
            for pos in range(0, nbytes, len(zeros)):
                fp.write(zeros[:min(len(zeros), nbytes - pos)])
        for name, data in (others or {}).items():
            zf.writestr(name, data)
    return path


def gb_for(voxels, imgs_itemsize, prev_itemsize=None):
    """--memory-gb that just admits the model's figure for these itemsizes."""
    return peak_bytes(voxels, imgs_itemsize, prev_itemsize) / GB * 1.0001


# ================================================================ memory in bytes, from the headers
def test_wide_byte_string_imgs_is_refused_from_its_header(tmp_path, bytes_read):
    """Guard: a non-numeric dtype is refused from the header, and the model counts the itemsize.
    Without them this 0.9 MB file (2048 voxels of S100000, 205 MB declared) is read whole under
    0.25 GB before its dtype is refused (32 bytes per voxel admitted 8 M voxels)."""
    path = write_zeros_member(tmp_path / "wide.npz", (2, 32, 32), "S100000")
    assert path.stat().st_size < 1_000_000
    with pytest.raises(CaseError, match=r"imgs: expected a 3D numeric array, got shape \(2, 32, 32\) "
                                        r"dtype \|S100000: refused from its header"):
        read_case(path, limits=Limits.for_memory(0.25))
    assert sum(bytes_read) < 4096
    assert imgs_shape(path, Limits.for_memory(0.25)) is None  # the byte rule: 100000 B per voxel


@pytest.mark.parametrize("dtype", ["<U2", "c8", "|V4", "O"])
def test_non_numeric_volumes_are_refused_before_their_data(tmp_path, dtype, bytes_read):
    """Guard: kind not in "biuf" is refused from the header, for imgs and for prev_pred (which
    is then ignored with a warning). Without it the data (or the pickle) is read first."""
    arr = np.zeros((4, 64, 64), dtype)
    np.savez(tmp_path / "imgs.npz", imgs=arr)
    with pytest.raises(CaseError, match="imgs: expected a 3D numeric array.*refused from its header"):
        read_case(tmp_path / "imgs.npz")
    assert sum(bytes_read) < 4096
    np.savez(tmp_path / "prev.npz", imgs=np.zeros((4, 64, 64), np.uint8), prev_pred=arr)
    bytes_read.clear()
    case = read_case(tmp_path / "prev.npz")
    assert case["prev_pred"] is None and "refused from its header" in case["warnings"][0]
    assert sum(bytes_read) < 4096 + 4 * 64 * 64  # imgs' data and two headers


def test_prev_pred_is_counted_with_both_itemsizes(tmp_path):
    """Guard: prev_pred is checked against the limit with imgs' and its own itemsize. A float64
    image alone fits the limit chosen here, a float64 prev_pred beside it does not: the case is
    read without it (one warning naming the figure); a uint8 prev_pred fits. Under the old rule
    (32 bytes per voxel, prev_pred not counted) both were read."""
    shape = (32, 64, 64)
    voxels = int(np.prod(shape))
    gb = gb_for(voxels, 8, 1)
    assert peak_bytes(voxels, 8, 8) > gb * GB
    imgs = np.random.default_rng(0).normal(size=shape)
    np.savez(tmp_path / "f64.npz", imgs=imgs, prev_pred=np.ones(shape))
    np.savez(tmp_path / "u8.npz", imgs=imgs, prev_pred=np.ones(shape, np.uint8))
    limits = Limits.for_memory(gb)
    case = read_case(tmp_path / "f64.npz", limits=limits)
    assert np.array_equal(case["imgs"], imgs) and case["prev_pred"] is None
    (warning,) = case["warnings"]
    assert (f"for 32x64x64 float64 imgs with a float64 prev_pred (limit {limits.max_bytes / GB:g} GB, "
            f"--memory-gb)") in warning
    assert warning.startswith("prev_pred: needs about ")
    assert read_case(tmp_path / "u8.npz", limits=limits)["prev_pred"].shape == shape
    assert imgs_shape(tmp_path / "f64.npz", limits) == shape


def test_imgs_is_refused_by_the_byte_model_and_imgs_shape_agrees(tmp_path):
    """Guard: imgs' itemsize is in the model, in read_case and in imgs_shape (the zeros
    fallback). A limit that admits a uint8 image refuses the float64 one of the same shape."""
    shape = (16, 64, 64)
    voxels = int(np.prod(shape))
    limits = Limits.for_memory(gb_for(voxels, 1))
    np.savez(tmp_path / "u8.npz", imgs=np.zeros(shape, np.uint8))
    np.savez(tmp_path / "f64.npz", imgs=np.zeros(shape))
    assert read_case(tmp_path / "u8.npz", limits=limits)["imgs"].shape == shape
    assert imgs_shape(tmp_path / "u8.npz", limits) == shape
    with pytest.raises(CaseError, match=r"imgs: needs about .* GB for 16x64x64 float64 imgs \(limit .* GB, "
                                        r"--memory-gb\): refused from its header"):
        read_case(tmp_path / "f64.npz", limits=limits)
    assert imgs_shape(tmp_path / "f64.npz", limits) is None


def test_limits_keep_one_figure_for_the_command_line():
    limits = Limits.for_memory(28)
    assert limits.max_bytes == 28 * GB
    assert limits.max_voxels == 28 * GB // infer.limits.bytes_per_voxel(1)
    assert Limits() == limits


# ================================================================ float128, singleton axes
@pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="longdouble is float64 here")
def test_float128_volumes_are_read_as_float64_and_segmented(tmp_path, weights):
    """Guard: float128 (longdouble) is read as float64, chunk by chunk. Without it the case
    fell back (torch has no float128)."""
    inp = tmp_path / "in"
    inp.mkdir()
    imgs = image().astype(np.longdouble)
    prev = np.zeros(SHAPE, np.longdouble)
    prev[3:6, 5:9, 5:9] = 1
    np.savez(inp / "ld.npz", imgs=imgs, prev_pred=prev, boxes=objects(BOXES[:1]))
    case = read_case(inp / "ld.npz")
    assert case["imgs"].dtype == np.float64 and np.array_equal(case["imgs"], imgs.astype(np.float64))
    assert case["prev_pred"].dtype == np.float64 and np.array_equal(case["prev_pred"], prev.astype(np.float64))
    rc, messages = run(inp, tmp_path / "out", weights)
    assert summary(messages, "ld.npz").startswith("ld.npz: segmented"), messages
    assert rc == 0


@pytest.mark.parametrize("wrap", ["trailing", "both", "leading"])
def test_singleton_axes_beyond_three_are_dropped(tmp_path, weights, wrap):
    """Guard: (D, H, W, 1) and (1, D, H, W, 1) are (D, H, W), for imgs, prev_pred and
    imgs_shape. Without it such an image got no output and a message about its dimensions."""
    index = {"trailing": (..., None), "both": (None, ..., None), "leading": (None, ...)}[wrap]
    inp = tmp_path / "in"
    inp.mkdir()
    imgs = image()
    prev = np.zeros(SHAPE, np.uint8)
    prev[3:6, 5:9, 5:9] = 1
    np.savez(inp / "c.npz", imgs=imgs[index], prev_pred=prev[index], boxes=objects(BOXES[:1]))
    case = read_case(inp / "c.npz")
    assert np.array_equal(case["imgs"], imgs) and np.array_equal(case["prev_pred"], prev)
    assert case["warnings"] == []
    assert imgs_shape(inp / "c.npz") == SHAPE
    rc, messages = run(inp, tmp_path / "out", weights)
    assert summary(messages, "c.npz").startswith("c.npz: segmented") and rc == 0
    assert segs_of(tmp_path / "out" / "c.npz").shape == SHAPE


# ================================================================ members named as np.load names them
def npy(arr) -> bytes:
    buf = io.BytesIO()
    npformat.write_array(buf, arr, allow_pickle=arr.dtype.hasobject)
    return buf.getvalue()


def alias_values(key, which):
    """Two different valid values of ``key``; ``which`` in (0, 1)."""
    vol = np.full(SHAPE, 10 + which, np.uint8)
    return {"imgs": vol, "prev_pred": vol % 2,
            "spacing": np.array([1.0 + which, 1.0, 1.0]),
            "boxes": objects([BOXES[which]]),
            "clicks": objects([{"fg": [[1, 2, 3 + which]], "bg": []}]),
            "clicks_order": objects([["fg"] * (1 + which)])}[key]


@pytest.mark.parametrize("plain_first", [True, False])
@pytest.mark.parametrize("key", ["imgs", "prev_pred", "spacing", "boxes", "clicks", "clicks_order"])
def test_each_key_names_the_member_np_load_reads(tmp_path, key, plain_first):
    """Guard: a member named exactly ``key`` wins over ``key.npy`` (as np.load's NpzFile maps keys),
    whichever comes first in the zip. Without it the member listed last was read."""
    path = tmp_path / "c.npz"
    members = [(key, npy(alias_values(key, 0))), (key + ".npy", npy(alias_values(key, 1)))]
    if key != "imgs":
        members.append(("imgs.npy", npy(alias_values("imgs", 0))))
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in (members if plain_first else members[::-1]):
            zf.writestr(name, data)
    with np.load(path, allow_pickle=True) as z:
        expected = z[key]
    got = read_case(path)[key]
    if key in ("imgs", "prev_pred"):
        assert np.array_equal(got, expected)
    elif key == "spacing":
        assert got == tuple(expected.tolist())
    else:
        assert got == expected.tolist()
    only_plain = tmp_path / "plain.npz"
    with zipfile.ZipFile(only_plain, "w") as zf:
        zf.writestr("imgs", npy(alias_values("imgs", 1)))
    with np.load(only_plain) as z:
        assert np.array_equal(read_case(only_plain)["imgs"], z["imgs"])
    assert imgs_shape(only_plain) == SHAPE


# ================================================================ truncated files, bounded
def test_truncated_file_is_searched_with_plain_reads_within_the_bound(tmp_path, monkeypatch):
    """Guard: the local-header search reads the first LOCAL_HEADER_SCAN bytes (no mmap: a file
    truncated during the scan killed the process with SIGBUS). With mmap unavailable the shape of
    a truncated case is still found; a header placed past the bound in a sparse 4 GiB file is not
    looked for (the mmap scan took 12-19 s and 4.3 GB on such a file)."""
    def no_mmap(*args, **kw):
        raise OSError("mmap is not used")
    monkeypatch.setattr(mmap, "mmap", no_mmap)
    good = tmp_path / "good.npz"
    np.savez(good, spacing=np.ones(3), imgs=np.zeros((20, 30, 40), np.uint8))
    raw = good.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) - 300])  # central directory gone
    assert imgs_shape(tmp_path / "trunc.npz") == (20, 30, 40)
    far = tmp_path / "far.npz"
    with open(far, "wb") as f:
        f.truncate(4 << 30)
        f.seek(LOCAL_HEADER_SCAN + 1000)
        f.write(raw[: len(raw) - 300])
    t0 = time.monotonic()
    assert imgs_shape(far) is None
    assert time.monotonic() - t0 < 2


# ================================================================ zip entries
def zip_with_entries(path, n, comment_bytes=0):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("imgs.npy", npy(image()))
        for i in range(n - 1):
            info = zipfile.ZipInfo(f"x{i}")
            info.comment = b"c" * comment_bytes
            zf.writestr(info, b"")
    return path


@pytest.fixture
def zipfile_opened(monkeypatch):
    """A list that gets one entry per zipfile.ZipFile construction."""
    opened = []
    real = zipfile.ZipFile.__init__

    def spy(self, *args, **kw):
        opened.append(args[0] if args else None)
        real(self, *args, **kw)

    monkeypatch.setattr(zipfile.ZipFile, "__init__", spy)
    return opened


def test_zip_entries_are_capped_before_zipfile_parses(tmp_path, zipfile_opened, monkeypatch):
    """Guard: the end-of-central-directory record (zip64 too) is read first, and a case of more
    than Limits.max_entries entries, or a central directory over MAX_CENTRAL_DIRECTORY bytes, is
    refused before zipfile.ZipFile is made (it parses the whole directory: 1.5 M entries took
    15-20 s). Without it these cases are read."""
    zip_with_entries(tmp_path / "many.npz", 100)
    zip_with_entries(tmp_path / "wide.npz", 20, comment_bytes=60_000)
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 5)  # zip64 end records from 5 entries
    zip_with_entries(tmp_path / "many64.npz", 100)
    zip_with_entries(tmp_path / "few64.npz", 8)
    assert b"PK\x06\x06" in (tmp_path / "many64.npz").read_bytes()[-200:]
    zipfile_opened.clear()
    for name, match in [("many.npz", "zip declares 100 entries"), ("wide.npz", "zip declares 20 entries"),
                        ("many64.npz", "zip declares 100 entries")]:
        with pytest.raises(CaseError, match=f"{name}: {match} .*refused before parsing it"):
            read_case(tmp_path / name)
    assert zipfile_opened == []
    assert read_case(tmp_path / "few64.npz")["imgs"].shape == SHAPE
    assert imgs_shape(tmp_path / "many.npz") == SHAPE  # fallback: the bounded local-header search


# ================================================================ pickles: every opcode charged
def test_every_opcode_is_charged(tmp_path):
    """Guard: each opcode costs one item. Without it a stream of one-byte opcodes under the byte
    limit ran in full whatever max_items said (12 MiB of them: 15-26 s and 3.1 GB before)."""
    cheap = b"\x80\x02" + b"N" * 5000 + b"."
    with pytest.raises(CaseError, match="refused pickle: expands to more than 1000 items"):
        infer.unpickle.safe_unpickle_loads(cheap, max_items=1000)
    path = tmp_path / "c.npz"
    body = b"\x80\x02" + b"]" * (Limits().max_pickle_items + 10) + b"."
    assert len(body) < Limits().max_object_bytes
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("imgs.npy", npy(image()))
        zf.writestr("clicks.npy", object_member(body))
    t0 = time.monotonic()
    with pytest.raises(CaseError, match="clicks: refused pickle: expands to more than 1000000 items"):
        read_case(path)
    assert time.monotonic() - t0 < 30  # 2.5 s on 2 shared cores


def test_object_members_are_limited_to_the_largest_real_prompt_set(tmp_path, bytes_read):
    """Guard: Limits.max_object_bytes is 2 MiB, 5.5x the 382 kB of 1000 classes x 6 clicks (numpy
    int64 coordinates). A clicks member of 2.4 MB (200 000 clicks) is refused from its declared
    size, before a byte of it is read (64 MiB admitted 2.5 M clicks: 24-53 s to read); 1000
    classes x 6 clicks are read."""
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 1000, (200_000, 3)).tolist()
    np.savez(tmp_path / "dense.npz", imgs=image(), clicks=objects([{"fg": pts, "bg": []}]))
    bytes_read.clear()
    with pytest.raises(CaseError, match="clicks: object member of .* bytes exceeds the limit of 2097152 bytes"):
        read_case(tmp_path / "dense.npz")
    assert sum(bytes_read) < np.prod(SHAPE) + 4096
    big = objects([{"fg": [[np.int64(v) for v in p] for p in rng.integers(0, 1000, (3, 3))],
                    "bg": [[np.int64(v) for v in p] for p in rng.integers(0, 1000, (3, 3))]}
                   for _ in range(1000)])
    boxes = objects([{k: np.int64(v) for k, v in BOXES[0].items()}] * 1000)
    np.savez(tmp_path / "k1000.npz", imgs=image(), clicks=big, boxes=boxes,
             clicks_order=objects([["fg", "bg"] * 3] * 1000))
    case = read_case(tmp_path / "k1000.npz")
    assert len(case["clicks"]) == len(case["boxes"]) == 1000 and len(case["clicks"][999]["bg"]) == 3


def test_time_spent_reading_a_case_is_charged_to_its_budget(tmp_path):
    """Reading and parsing count against the case's time budget (``--seconds-per-class`` x K from
    just before the case is read; the first case from process start): a case whose reading takes
    30 s of a 20 s budget runs no class and says so (exit status 4, its classes kept their
    previous masks), and the next case, read quickly, is segmented."""
    import infer.npz
    from tests.test_hostile import BOXES, image, objects, run
    from tests.tinymodel import make_artifact

    class Clock:
        t = 0.0

        def __call__(self):
            return self.t

    clock = Clock()
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("a_slow.npz", "b_quick.npz"):
        np.savez(inp / name, imgs=image(), boxes=objects(BOXES[:2]))
    real = infer.npz.read_case

    def slow_read(path, *a, **kw):
        if str(path).endswith("a_slow.npz"):
            clock.t += 30.0  # a slow disk or a costly parse, on the budget's clock
        return real(path, *a, **kw)

    weights = make_artifact(tmp_path / "model")
    mp = pytest.MonkeyPatch()
    mp.setattr(infer.npz, "read_case", slow_read)
    try:
        rc, messages = run(inp, tmp_path / "out", weights, "--seconds-per-class", "10",
                           "--reserve-seconds", "0", clock=clock)
    finally:
        mp.undo()
    assert rc == 4
    slow = [m for m in messages if m.startswith("a_slow.npz: segmented")]
    assert slow and slow[0].endswith("2 of 2 class(es) kept their previous mask (see above)")
    quick = [m for m in messages if m.startswith("b_quick.npz: segmented")]
    assert quick and "kept their previous mask" not in quick[0]
