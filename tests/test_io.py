"""infer.npz / infer.unpickle / infer.writer: safe case reading (restricted unpickling, gts never opened) and atomic segs writing."""
import io
import os
import pickle
import re
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npformat

from infer.entries import Malformed
from infer.errors import CaseError
from infer.npz import imgs_shape, read_case
from infer.unpickle import safe_unpickle_loads
from infer.writer import write_segs

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers: hand-built npz files
def _npy(arr):
    buf = io.BytesIO()
    npformat.write_array(buf, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


def _object_npy(pickle_bytes, shape=(1,)):
    """An object-dtype .npy member holding the given pickle bytes (laid out as np.save does)."""
    buf = io.BytesIO()
    npformat.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": shape})
    return buf.getvalue() + pickle_bytes


def _write_zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


class _Payload:
    """Pickles as a call to ``func(*args)``: what an attacker puts into an object array."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _payload(kind, marker):
    if kind == "os.system":
        return _Payload(os.system, (f"touch '{marker}'",))
    if kind == "builtins.eval":
        return _Payload(eval, (f"open({str(marker)!r}, 'w').close()",))
    return _Payload(subprocess.call, (["touch", str(marker)],))


PAYLOADS = ["os.system", "builtins.eval", "subprocess.call"]
IMGS = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)


# ---------------------------------------------------------------- reading
def test_round_trip_of_an_organizer_style_case(tmp_path):
    boxes = [{"z_min": np.int64(1), "z_max": np.int64(3), "z_mid": np.int64(2), "z_mid_y_min": 0,
              "z_mid_y_max": np.int64(5), "z_mid_x_min": 1, "z_mid_x_max": 7},
             {"z_min": 0, "z_max": 0, "z_mid": 0, "z_mid_y_min": 2, "z_mid_y_max": 2,
              "z_mid_x_min": 3, "z_mid_x_max": 3}]
    clicks = [{"fg": [[np.int64(1), np.int64(2), np.int64(3)], [1, 2, 3]], "bg": []},
              {"fg": [np.array([0, 1, 2])], "bg": [(np.int32(4), 5, 6)]}]
    clicks_order = [["fg", "fg", None], ["fg", "bg"]]  # ragged -> object array of lists
    imgs = np.random.default_rng(0).integers(-1000, 1000, (5, 6, 7)).astype(np.int16)
    prev = (imgs > 0).astype(np.uint8)
    path = tmp_path / "case_001.npz"
    np.savez(path, imgs=imgs, spacing=np.array([2.5, 0.8, 0.8]), boxes=boxes, clicks=clicks,
             clicks_order=np.array(clicks_order, dtype=object), prev_pred=prev)

    case = read_case(path)
    assert case["name"] == "case_001.npz"
    assert case["imgs"].dtype == np.int16 and np.array_equal(case["imgs"], imgs)
    assert np.array_equal(case["prev_pred"], prev)
    assert case["spacing"] == (2.5, 0.8, 0.8)
    assert case["boxes"] == [{k: int(v) for k, v in b.items()} for b in boxes]
    assert case["clicks"] == [{"fg": [[1, 2, 3], [1, 2, 3]], "bg": []},
                              {"fg": [[0, 1, 2]], "bg": [[4, 5, 6]]}]
    assert case["clicks_order"] == clicks_order
    # plain Python all the way down (json-serialisable, no numpy scalars)
    assert all(type(v) is int for b in case["boxes"] for v in b.values())
    assert all(type(c) is int for k in case["clicks"] for p in k["fg"] + k["bg"] for c in p)
    assert all(type(s) is str for order in case["clicks_order"] for s in order if s is not None)


@pytest.mark.parametrize("order", [
    np.array([["fg", "bg"], ["fg", "fg"]]),                # equal lengths, no None: '<U2'
    np.array([["fg", None], ["bg", "fg"]], dtype=object),  # equal lengths: 2D object array
    np.array([[], []]),                                    # no clicks yet: float64 (2, 0)
])
def test_clicks_order_shapes_the_harness_can_produce(tmp_path, order):
    np.savez(tmp_path / "c.npz", imgs=IMGS, clicks_order=order)
    assert read_case(tmp_path / "c.npz")["clicks_order"] == order.tolist()


def test_zero_d_object_array_holding_a_list_and_absent_keys(tmp_path):
    boxes = np.empty((), dtype=object)
    boxes[()] = [{"z_min": 1, "z_max": 2}]
    np.savez(tmp_path / "c.npz", imgs=IMGS, boxes=boxes)
    case = read_case(tmp_path / "c.npz")
    assert case["boxes"] == [{"z_min": 1, "z_max": 2}]
    assert case["clicks"] is None and case["clicks_order"] is None
    assert case["prev_pred"] is None and case["spacing"] is None


@pytest.mark.parametrize("spelling", [b"numpy.core.multiarray", b"numpy._core.multiarray"])
@pytest.mark.parametrize("protocol", [2, 3])
def test_numpy1_and_numpy2_pickle_names_are_accepted(tmp_path, spelling, protocol):
    """numpy 1.x pickles name numpy.core.multiarray, numpy 2 numpy._core.multiarray (whichever
    numpy runs the test); protocol 2 adds _codecs.encode for bytes."""
    value = np.array([{"z_min": np.int64(4), "z_max": np.int64(9)}], dtype=object)
    data = pickle.dumps(value, protocol=protocol)  # GLOBAL opcodes: no length prefix to fix up
    data, count = re.subn(rb"numpy\.(_)?core\.multiarray\n", spelling + b"\n", data)
    assert count >= 2 and (protocol == 3 or b"_codecs\nencode" in data)
    path = _write_zip(tmp_path / "c.npz", {"imgs.npy": _npy(IMGS), "boxes.npy": _object_npy(data)})
    assert read_case(path)["boxes"] == [{"z_min": 4, "z_max": 9}]


def test_imgs_variants(tmp_path):
    vol = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    np.savez(tmp_path / "f.npz", imgs=np.asfortranarray(vol), prev_pred=vol[None].astype(np.uint8))
    case = read_case(tmp_path / "f.npz")
    assert np.array_equal(case["imgs"], vol) and case["prev_pred"].shape == (3, 4, 5)
    np.savez(tmp_path / "b.npz", imgs=vol.astype(">f4"))
    got = read_case(tmp_path / "b.npz")["imgs"]
    assert got.dtype.isnative and np.array_equal(got, vol)
    np.savez(tmp_path / "s.npz", imgs=vol[None])  # leading singleton axis is dropped
    assert read_case(tmp_path / "s.npz")["imgs"].shape == (3, 4, 5)


@pytest.mark.parametrize("spacing", [np.array([1.0, 2.0]), np.array([1.0, np.nan, 1.0]),
                                     np.array([0.0, 1.0, 1.0]), np.array(["a", "b", "c"])])
def test_bad_spacing_becomes_none(tmp_path, spacing):
    np.savez(tmp_path / "c.npz", imgs=IMGS, spacing=spacing)
    assert read_case(tmp_path / "c.npz")["spacing"] is None


@pytest.mark.parametrize("extra, match", [
    ({"imgs": IMGS[0]}, "imgs: expected a 3D"),
    ({"imgs": IMGS.astype(np.complex64)}, "imgs: expected a 3D numeric"),
    ({"boxes": np.array("box", dtype=object)}, "boxes: expected a list"),
    ({"clicks": np.array(7, dtype=object)}, "clicks: expected a list"),
])
def test_unusable_images_and_prompt_keys_raise_one_line_case_error(tmp_path, extra, match):
    np.savez(tmp_path / "c.npz", **{"imgs": IMGS, **extra})
    with pytest.raises(CaseError, match=match) as err:
        read_case(tmp_path / "c.npz")
    assert str(err.value).startswith("c.npz: ") and "\n" not in str(err.value)


GOOD_BOX = {"z_min": 0, "z_max": 1, "z_mid": 0, "z_mid_y_min": 0, "z_mid_y_max": 2,
            "z_mid_x_min": 0, "z_mid_x_max": 3}


@pytest.mark.parametrize("key, bad, match", [
    ("boxes", "box", r"boxes\[1\]: expected a dict"),
    ("boxes", dict(GOOD_BOX, z_min=True), "bool"),
    ("boxes", dict(GOOD_BOX, z_min=15.5), "expected an integer, got 15.5"),
    ("boxes", dict(GOOD_BOX, z_min=None), "expected an integer, got None"),
    ("boxes", dict(GOOD_BOX, z_min="3"), "expected an integer, got '3'"),
    ("clicks", {"fg": [[1, 2]], "bg": []}, r"expected \[z, y, x\]"),
    ("clicks", {"fg": "abc"}, "expected a list"),
    ("clicks", {"fg": [], "up": []}, "unexpected key 'up'"),
    ("clicks_order", ["fg", "left"], "unexpected entry 'left'"),
    ("clicks_order", ["fg", 1], "unexpected entry 1"),
])
def test_a_malformed_entry_is_marked_for_its_class_alone(tmp_path, key, bad, match):
    good = {"boxes": GOOD_BOX, "clicks": {"fg": [[0, 1, 1]], "bg": []}, "clicks_order": ["fg"]}[key]
    arr = np.empty(3, dtype=object)
    arr[:] = [good, bad, good]
    np.savez(tmp_path / "c.npz", imgs=IMGS, **{key: arr})
    entries = read_case(tmp_path / "c.npz")[key]
    assert len(entries) == 3 and isinstance(entries[1], Malformed)
    assert re.search(match, entries[1].why) and "\n" not in entries[1].why
    assert entries[1].why.startswith(f"{key}[1]")
    assert not isinstance(entries[0], Malformed) and entries[0] == entries[2]


@pytest.mark.parametrize("prev", [IMGS[:, :2], np.zeros((2, 3, 4), np.complex64), np.zeros((5, 5), np.uint8)])
def test_unusable_prev_pred_is_ignored_with_a_warning(tmp_path, prev):
    np.savez(tmp_path / "c.npz", imgs=IMGS, prev_pred=prev)
    case = read_case(tmp_path / "c.npz")
    assert case["prev_pred"] is None and case["imgs"].shape == (2, 3, 4)
    (warning,) = case["warnings"]
    assert warning.startswith("prev_pred: ") and warning.endswith("ignored")


def test_truncated_non_npz_missing_imgs_and_short_data(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, imgs=np.zeros((20, 30, 40), np.uint8), spacing=np.ones(3))
    raw = good.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.npz").write_text("not a zip file\n")
    (tmp_path / "empty.npz").write_bytes(b"")
    np.savez(tmp_path / "noimgs.npz", spacing=np.ones(3))
    header_only = _npy(np.zeros((10, 10, 10), np.uint8))[:-500]  # header promises 1000 bytes
    _write_zip(tmp_path / "short.npz", {"imgs.npy": header_only})
    for name, match in [("trunc.npz", "not a readable npz"), ("text.npz", "not a readable npz"),
                        ("empty.npz", "not a readable npz"), ("noimgs.npz", "imgs: missing"),
                        ("short.npz", "imgs: data size"), ("absent.npz", "not a readable npz")]:
        with pytest.raises(CaseError, match=match):
            read_case(tmp_path / name)
    assert read_case(good)["imgs"].shape == (20, 30, 40)


def test_imgs_shape_reads_only_the_header(tmp_path):
    """The fallback shape survives cases read_case refuses: bad prompts, short imgs data."""
    evil = _object_npy(pickle.dumps(_payload("os.system", tmp_path / "pwned")))
    short = _npy(np.zeros((6, 7, 8), np.uint8))[:-100]
    _write_zip(tmp_path / "evil.npz", {"imgs.npy": _npy(IMGS[None]), "boxes.npy": evil})
    _write_zip(tmp_path / "short.npz", {"imgs.npy": short})
    for name in ("evil.npz", "short.npz"):
        with pytest.raises(CaseError):
            read_case(tmp_path / name)
    assert imgs_shape(tmp_path / "evil.npz") == (2, 3, 4)
    assert imgs_shape(tmp_path / "short.npz") == (6, 7, 8)
    np.savez(tmp_path / "noimgs.npz", spacing=np.ones(3))
    np.savez(tmp_path / "flat.npz", imgs=np.zeros(5))
    (tmp_path / "text.npz").write_text("no zip")
    for name in ("noimgs.npz", "flat.npz", "text.npz", "absent.npz"):
        assert imgs_shape(tmp_path / name) is None
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- untrusted pickles
@pytest.mark.parametrize("kind", PAYLOADS)
def test_payloads_are_live_with_plain_pickle(tmp_path, kind):
    """Control: the payloads used below really run under an unrestricted unpickler."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(np.array([_payload(kind, marker)], dtype=object)))
    assert marker.exists()


@pytest.mark.parametrize("key", ["boxes", "clicks", "clicks_order"])
@pytest.mark.parametrize("kind", PAYLOADS)
@pytest.mark.parametrize("wrap", ["in_array", "in_dict_in_array", "bare"])
def test_malicious_object_arrays_are_refused_and_never_run(tmp_path, key, kind, wrap):
    marker = tmp_path / "pwned"
    evil = _payload(kind, marker)
    if wrap == "in_array":
        evil = np.array([evil], dtype=object)
    elif wrap == "in_dict_in_array":
        evil = np.array([{"fg": evil, "z_min": evil}], dtype=object)
    path = _write_zip(tmp_path / "evil.npz", {"imgs.npy": _npy(IMGS),
                                              f"{key}.npy": _object_npy(pickle.dumps(evil))})
    with pytest.raises(CaseError, match=f"evil.npz: {key}: refused pickle global "):
        read_case(path)
    assert not marker.exists()


@pytest.mark.parametrize("obj", [os.system, zipfile.ZipFile, {"a": np.random.default_rng}])
def test_safe_unpickle_refuses_other_globals(obj):
    with pytest.raises(CaseError, match="refused pickle global"):
        safe_unpickle_loads(pickle.dumps(obj))


def test_build_on_admitted_functions_is_refused():
    """BUILD may only restore ndarray / dtype state: it must not reach the admitted helpers
    (here: rewriting the defaults of the _codecs.encode stand-in)."""
    import infer.unpickle as io_module
    defaults = io_module._latin1_encode.__defaults__
    state = pickle.dumps((None, {"__defaults__": ("rot13",)}), protocol=2)[2:-1]  # no PROTO/STOP
    data = b"\x80\x02c_codecs\nencode\n" + state + b"b."  # GLOBAL, state, BUILD, STOP
    with pytest.raises(CaseError, match="refused pickle BUILD on function"):
        safe_unpickle_loads(data)
    assert io_module._latin1_encode.__defaults__ == defaults


def test_safe_unpickle_accepts_plain_values():
    value = [{"a": 1, "b": [1.5, None, "x", (1, 2)], "c": np.float64(2.0)}, np.arange(3), True]
    out = safe_unpickle_loads(pickle.dumps(value))
    assert out[0] == value[0] and np.array_equal(out[1], value[1]) and out[2] is True


def test_forged_numpy_objects_are_refused(tmp_path):
    """numpy's own reconstructors can be abused without any foreign global: numpy.ndarray called
    on a bytes buffer with dtype object yields fake object pointers (reading them crashes the
    process), a dtype BUILD state can forge the has-object flags. Run in a child process so that
    a missing guard shows up as a failed test, not as a crashed test run."""
    fake_pointers = _Payload(np.ndarray, ((2,), np.dtype(object), b"\x01" * 16))
    forged_dtype = _Payload(np.dtype, ("i8", False, True), (3, "<", None, None, None, -1, -1, 63))
    cases = {"pointers": pickle.dumps(np.array([fake_pointers], dtype=object)),
             "dtype": pickle.dumps(forged_dtype),
             "structured": pickle.dumps(np.zeros(2, [("a", "O"), ("b", "i8")]))}
    expected = {"pointers": "not callable", "dtype": "refused pickle dtype state",
                "structured": "refused pickle dtype 'V16'"}
    child = (
        "import sys, pickle\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from infer.unpickle import safe_unpickle_loads, CaseError\n"
        "try:\n"
        "    print(repr(safe_unpickle_loads(open(sys.argv[1], 'rb').read()).tolist()))\n"
        "except CaseError as exc:\n"
        "    print('CaseError', exc)\n"
    )
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        run = subprocess.run([sys.executable, "-c", child, str(tmp_path / name)],
                             capture_output=True, text=True, timeout=60)
        outcome = (name, run.stdout, run.stderr)
        assert run.returncode == 0 and run.stdout.startswith("CaseError"), outcome
        assert expected[name] in run.stdout


@pytest.mark.parametrize("gts_kind", ["malicious_pickle", "corrupt"])
def test_gts_is_never_opened(tmp_path, monkeypatch, gts_kind):
    marker = tmp_path / "pwned"
    if gts_kind == "malicious_pickle":
        gts = _object_npy(pickle.dumps(np.array([_payload("os.system", marker)], dtype=object)))
    else:
        gts = b"\x93NUMPY garbage that is not an npy header" * 10
    members = {"imgs.npy": _npy(IMGS), "gts.npy": gts, "spacing.npy": _npy(np.ones(3)),
               "boxes.npy": _object_npy(pickle.dumps(np.array([{"z_min": 0}], dtype=object)))}
    path = _write_zip(tmp_path / "train.npz", members)
    opened = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(getattr(name, "filename", name))
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    case = read_case(path)
    assert case["boxes"] == [{"z_min": 0}] and "gts" not in case
    assert "imgs.npy" in opened and "gts.npy" not in opened
    assert not marker.exists()


# ---------------------------------------------------------------- writing
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_write_segs_round_trip_uncompressed(tmp_path, dtype):
    high = 300 if dtype == np.uint16 else 5
    segs = np.random.default_rng(1).integers(0, high, (4, 5, 6)).astype(dtype)
    out = tmp_path / "case.npz"
    write_segs(out, np.asfortranarray(segs))
    with np.load(out, allow_pickle=False) as f:
        assert list(f.keys()) == ["segs"]
        assert f["segs"].dtype == dtype and np.array_equal(f["segs"], segs)
    with zipfile.ZipFile(out) as zf:
        members = [(i.filename, i.compress_type) for i in zf.infolist()]
        assert members == [("segs.npy", zipfile.ZIP_STORED)]
    assert sorted(os.listdir(tmp_path)) == ["case.npz"]


@pytest.mark.parametrize("bad", [np.zeros((4, 5, 6), np.int32), np.zeros((4, 5), np.uint8),
                                 np.zeros((1, 4, 5, 6), np.uint8), np.zeros((4, 5, 6), ">u2"),
                                 [[[0]]]])
def test_write_segs_validates(tmp_path, bad):
    with pytest.raises(ValueError):
        write_segs(tmp_path / "x.npz", bad)
    assert os.listdir(tmp_path) == []


def test_write_segs_uses_hidden_temp_in_same_folder(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    def spy(src, dst):
        seen.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_segs(tmp_path / "a.npz", np.zeros((2, 2, 2), np.uint8))
    (src, dst), = seen
    assert Path(src).parent == tmp_path and Path(dst) == tmp_path / "a.npz"
    assert not src.endswith(".npz") and Path(src).name.startswith(".")


def test_failed_write_leaves_nothing_and_keeps_old_file(tmp_path, monkeypatch):
    """A write that dies after part of the data (disk full) leaves no file under the final name,
    no temporary file, and an older file under that name untouched."""
    real_open = zipfile.ZipFile.open

    class HalfWriter:
        def __init__(self, member):
            self.member = member

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.member.__exit__(*exc)

        def write(self, data):
            data = memoryview(data).cast("B")
            if len(data) > 100:
                self.member.write(data[: len(data) // 2])
                raise OSError(28, "No space left on device")
            return self.member.write(data)

    def failing_open(self, name, mode="r", *args, **kwargs):
        member = real_open(self, name, mode, *args, **kwargs)
        return HalfWriter(member) if mode == "w" else member

    monkeypatch.setattr(zipfile.ZipFile, "open", failing_open)
    segs = np.ones((10, 20, 30), np.uint8)
    with pytest.raises(OSError, match="No space"):
        write_segs(tmp_path / "new.npz", segs)
    assert os.listdir(tmp_path) == []

    old = tmp_path / "old.npz"
    old.write_bytes(b"previous stage output")
    with pytest.raises(OSError):
        write_segs(old, segs)
    assert os.listdir(tmp_path) == ["old.npz"] and old.read_bytes() == b"previous stage output"


def test_rename_failure_leaves_no_file(tmp_path, monkeypatch):
    def broken_replace(src, dst):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="I/O error"):
        write_segs(tmp_path / "c.npz", np.ones((3, 4, 5), np.uint8))
    assert os.listdir(tmp_path) == []


def test_process_killed_mid_write_leaves_no_npz(tmp_path):
    """SIGKILL after the data is written but before the rename: a harness globbing *.npz sees
    nothing (the leftover temporary file does not end in .npz)."""
    child = (
        "import os, sys, time, numpy as np\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import infer.writer as m\n"
        "def hang(src, dst):\n"
        "    print('READY', flush=True); time.sleep(60)\n"
        "os.replace = hang\n"
        "m.write_segs(sys.argv[1], np.ones((8, 64, 64), np.uint8))\n"
    )
    out = tmp_path / "case.npz"
    proc = subprocess.Popen([sys.executable, "-c", child, str(out)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists()
    assert list(tmp_path.glob("*.npz")) == []
    leftovers = os.listdir(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-")
