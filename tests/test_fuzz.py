"""Property-based fuzzing of the whole ``python -m infer`` path on generated, often broken, cases.

Every generated folder holds one to three case files; ``infer.__main__.main`` runs on it in-process
with a tiny converted model (patch 16 x 32 x 32). For every input the test demands: an output
``segs`` of the image's shape, uint8 (uint16 when K > 255), labels within 0..K, unless not even
the image's shape can be read from the file; exactly one summary log line per case; no log
message spanning several lines; exit status 0. A few subprocess runs check the same through the
real command line and ``predict.sh``.

Profiles: ``ci`` (default, a few hundred examples) and ``long`` (10 000 examples), chosen with
``HYPOTHESIS_PROFILE=long``; see docs/HARDENING.md.
"""
from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from infer.__main__ import main
from tests.tinymodel import make_artifact

ROOT = Path(__file__).resolve().parents[1]

settings.register_profile("ci", max_examples=300, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=10_000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("model"))


# ---------------------------------------------------------------- generated cases
DIMS = st.sampled_from([1, 2, 3, 5, 8, 13, 24, 40])
SHAPES = st.one_of(
    st.tuples(DIMS, DIMS, DIMS),
    # thin, one-voxel axes and cheap but large-extent volumes
    st.sampled_from([(1, 1, 1), (1, 64, 64), (64, 1, 1), (2, 200, 3), (300, 2, 2), (1, 1024, 1024),
                     (4096, 4, 4), (3, 5, 700)]),
)
IMG_DTYPES = st.sampled_from(["uint8", "int16", "uint16", "int8", "int32", "float32", "float64", "bool"])
IMG_FILLS = st.sampled_from(["random", "random", "constant0", "constant", "nan_inf", "huge"])
GARBAGE = st.one_of(
    st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
    st.binary(max_size=5), st.none(), st.booleans(), st.just([1, "x"]), st.just({"fg": "abc"}),
    st.just({"z_min": "3"}), st.just((1, 2)), st.just([[1, 2, 3, 4]]), st.just({"fg": [[1.5, 2, 3]]}),
)


def _coord(draw, n):
    """An index near or outside [0, n)."""
    return draw(st.integers(-6, n + 6))


@st.composite
def box_entry(draw, shape, messy):
    kinds = ["box", "box", "box", "empty", "partial"] + (["garbage", "float"] if messy else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "empty":
        return {}
    if kind == "garbage":
        return draw(GARBAGE)
    d, h, w = shape
    box = {"z_min": _coord(draw, d), "z_max": _coord(draw, d), "z_mid": _coord(draw, d),
           "z_mid_y_min": _coord(draw, h), "z_mid_y_max": _coord(draw, h),
           "z_mid_x_min": _coord(draw, w), "z_mid_x_max": _coord(draw, w)}
    if kind == "partial":
        for key in draw(st.lists(st.sampled_from(sorted(box)), max_size=3)):
            box.pop(key, None)
    if kind == "float":
        box = {key: draw(st.sampled_from([float(v), np.int64(v), np.float32(v) + 0.5, np.uint8(abs(v) % 256)]))
               for key, v in box.items()}
    return box


@st.composite
def point_list(draw, shape):
    pts = draw(st.lists(st.tuples(*(st.integers(-5, n + 5) for n in shape)), max_size=4))
    return [list(p) for p in pts]


@st.composite
def clicks_entry(draw, shape, messy):
    kind = draw(st.sampled_from(["clicks", "clicks", "clicks", "none", "one_side"] + (["garbage"] if messy else [])))
    if kind == "none":
        return None
    if kind == "garbage":
        return draw(GARBAGE)
    entry = {"fg": draw(point_list(shape)), "bg": draw(point_list(shape))}
    if kind == "one_side":
        entry.pop(draw(st.sampled_from(["fg", "bg"])))
    return entry


@st.composite
def case_spec(draw):
    """(members, corruption, k, shape): npz members as arrays / python objects, a file-level
    corruption, the intended number of classes and the (squeezed) image shape."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shape = draw(SHAPES)
    dtype, fill = draw(IMG_DTYPES), draw(IMG_FILLS)
    if dtype == "bool":
        imgs = rng.random(shape) > 0.5 if fill == "random" else np.full(shape, fill == "constant")
    else:
        info = np.finfo(dtype) if dtype.startswith("float") else np.iinfo(dtype)
        lo, hi = (max(info.min, -1000), min(info.max, 1000)) if fill != "huge" else (info.min / 2, info.max / 2)
        imgs = rng.uniform(lo, hi, shape).astype(dtype) if fill in ("random", "huge", "nan_inf") else \
            np.full(shape, 0 if fill == "constant0" else hi, dtype)
        if fill == "nan_inf" and dtype.startswith("float") and imgs.size:
            flat = imgs.reshape(-1)
            flat[rng.integers(0, flat.size, 3)] = [np.nan, np.inf, -np.inf]
    members = {"imgs": imgs}
    if draw(st.booleans()):
        members["imgs"] = imgs[None]  # (1, D, H, W): squeezed by the reader

    k = draw(st.sampled_from([0, 1, 1, 2, 2, 3, 4, 300]))
    messy = draw(st.integers(0, 2)) == 0  # malformed prompt objects (the case then gets a fallback)
    many = k > 8  # hundreds of classes: no prompts (one forward each would be slow, not harder)
    boxes_kind = draw(st.sampled_from(["list", "list", "absent", "empty"] + (["garbage"] if messy else [])))
    if boxes_kind == "list":
        members["boxes"] = [{} for _ in range(k)] if many else [draw(box_entry(shape, messy)) for _ in range(k)]
    elif boxes_kind == "empty":
        members["boxes"] = []
    elif boxes_kind == "garbage":
        members["boxes"] = draw(GARBAGE)
    clicks_kind = draw(st.sampled_from(["list", "list", "absent"] + (["garbage"] if messy else [])))
    if clicks_kind == "list" and not many:
        members["clicks"] = [draw(clicks_entry(shape, messy)) for _ in range(k)]
        order_kind = draw(st.sampled_from(["agree", "random", "absent"] + (["garbage"] if messy else [])))
        if order_kind == "agree":
            members["clicks_order"] = [
                ["fg"] * len(c.get("fg", [])) + ["bg"] * len(c.get("bg", [])) + draw(st.sampled_from([[], [None]]))
                if isinstance(c, dict) and isinstance(c.get("fg", []), list) and isinstance(c.get("bg", []), list)
                else [] for c in members["clicks"]]
        elif order_kind == "random":  # disagrees with clicks: other lengths, other counts
            members["clicks_order"] = draw(st.lists(st.lists(st.sampled_from(["fg", "bg", None]), max_size=5),
                                                    max_size=k + 2))
        elif order_kind == "garbage":
            members["clicks_order"] = draw(st.one_of(GARBAGE, st.just([[1, 2]]), st.just([["up"]])))
    elif clicks_kind == "garbage":
        members["clicks"] = draw(GARBAGE)

    prev_kind = draw(st.sampled_from(["absent", "labels", "labels", "float", "bool", "wrong_shape"]))
    if prev_kind == "labels":
        members["prev_pred"] = rng.integers(0, k + 1, shape).astype(np.uint8 if k < 256 else np.uint16)
    elif prev_kind == "float":
        members["prev_pred"] = rng.integers(0, k + 1, shape).astype(np.float32)
    elif prev_kind == "bool":
        members["prev_pred"] = (rng.integers(0, k + 1, shape) > 0) if k else np.zeros(shape, bool)
    elif prev_kind == "wrong_shape":
        members["prev_pred"] = np.zeros((2, 3, 4), np.uint8)
    spacing = draw(st.sampled_from(["ok", "ok", "absent", "garbage"]))
    if spacing == "ok":
        members["spacing"] = np.array([2.5, 0.7, 0.7])
    elif spacing == "garbage":
        members["spacing"] = np.array([np.nan, -1.0])
    if draw(st.integers(0, 9)) == 0:
        members["gts"] = np.ones(shape, np.uint8)

    corruption = draw(st.sampled_from(["none"] * 20 + ["truncate", "garbage_file", "empty_file",
                                                       "no_imgs", "imgs_2d", "imgs_text"]))
    cut = draw(st.floats(0.0, 1.0))
    return members, (corruption, cut), k, shape


def _as_member(value):
    """Python objects (lists, dicts, ...) become object arrays, as np.savez would store them."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        arr = np.empty(len(value), dtype=object)  # one dict per class, as the harness stores it
        arr[:] = value
        return arr
    arr = np.empty((), dtype=object)
    arr[()] = value
    return arr


def write_case(path: Path, members: dict, corruption) -> None:
    kind, cut = corruption
    members = dict(members)
    if kind == "no_imgs":
        members.pop("imgs")
    elif kind == "imgs_2d":
        members["imgs"] = np.zeros((4, 5), np.uint8)
    elif kind == "imgs_text":
        members["imgs"] = np.full((2, 3, 4), "ab")
    if kind == "garbage_file":
        path.write_bytes(os.urandom(int(cut * 300)))
        return
    if kind == "empty_file":
        path.write_bytes(b"")
        return
    np.savez(path, **{key: _as_member(v) for key, v in members.items()})
    if kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[:int(cut * (len(data) - 1))])


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run_main(argv):
    """main(argv + one CPU thread) with the 'infer' log captured: (exit status, messages).
    One thread: the tiny model's passes are far faster so on a shared 2-core machine."""
    handler = _Records()
    logger = logging.getLogger("infer")
    logger.addHandler(handler)
    threads = torch.get_num_threads()
    try:
        rc = main(list(argv) + ["--threads", "1"])
    finally:
        logger.removeHandler(handler)
        torch.set_num_threads(threads)
    return rc, handler.messages


def summary_pattern(name):
    return re.compile(rf"^{re.escape(name)}: (segmented, K=|fallback \(previous mask or zeros\), K=|no output: )")


def check_status(rc: int, messages: list) -> None:
    """The run's summary counts what its per-case lines say, and the exit status follows it:
    4 when a case fell back or got no output or a class kept its previous mask, else 0."""
    (done,) = [m for m in messages if m.startswith("done: ")]
    problems, kept = map(int, re.match(r"done: \d+ case\(s\), (\d+) problem\(s\), (\d+) class\(es\) kept", done).groups())
    cases = [m for m in messages if re.match(r"^\S+: (segmented, K=|fallback|no output: )", m)]
    assert problems == sum(not m.split(": ", 1)[1].startswith("segmented") for m in cases), messages
    assert kept == sum(int(x) for x in re.findall(r"; (\d+) of \d+ class\(es\) kept", "\n".join(cases))), messages
    assert rc == (4 if problems or kept else 0), (rc, messages)


def check_outputs(out_dir: Path, specs: dict, messages: list) -> None:
    """specs: file name -> (members, corruption, k, shape)."""
    for message in messages:
        assert "\n" not in message, message
    for name, (members, (kind, _), k, shape) in specs.items():
        summaries = [m for m in messages if summary_pattern(name).match(m)]
        assert len(summaries) == 1, (name, messages)
        out = out_dir / name
        if not out.exists():
            # only a file that does not even say its image shape may go without an output
            assert kind in ("truncate", "garbage_file", "empty_file", "no_imgs", "imgs_2d"), (name, messages)
            assert summaries[0].startswith(f"{name}: no output"), summaries[0]
            continue
        with np.load(out) as z:
            assert list(z.keys()) == ["segs"]
            segs = z["segs"]
        expect_shape = (4, 5) if kind == "imgs_2d" else (2, 3, 4) if kind == "imgs_text" else shape
        assert segs.shape == expect_shape
        assert segs.dtype == np.uint8 if k <= 255 else segs.dtype in (np.uint8, np.uint16)
        assert int(segs.max(initial=0)) <= k
        if kind == "none" and "boxes" not in members and "clicks" not in members:
            assert not segs.any()  # K = 0: nothing to label
        assert not list(out_dir.glob(".*tmp*"))  # no temporary left behind


@pytest.mark.slow
@given(cases=st.lists(case_spec(), min_size=1, max_size=3))
def test_every_case_gets_a_valid_output_and_one_summary_line(weights, cases):
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp, "in"), Path(tmp, "out")
        inp.mkdir()
        specs = {}
        for i, spec in enumerate(cases):
            name = f"case_{i:02d}.npz"
            write_case(inp / name, spec[0], spec[1])
            specs[name] = spec
        rc, messages = run_main(["--inputs", str(inp), "--outputs", str(out), "--weights", str(weights),
                                 "--device", "cpu", "--seconds-per-class", "1000"])
        check_status(rc, messages)
        check_outputs(out, specs, messages)
        for m in messages:  # shown by --hypothesis-show-statistics
            if re.match(r"^case_\d\d\.npz: (segmented|fallback|no output)", m):
                event(m.split(": ")[1].split(",")[0].split(" (")[0])


@pytest.mark.slow
def test_large_sparse_volume_with_prompts_far_apart(weights, tmp_path):
    """64 x 1024 x 1024 (64 M voxels, compressed to a few hundred kB on disk): a box in one
    corner and a click in the other; the output has the full shape and labels 0..2."""
    shape = (64, 1024, 1024)
    imgs = np.zeros(shape, np.uint8)
    imgs[2:10, 5:40, 5:40] = 200
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    boxes = [{"z_min": 2, "z_max": 9, "z_mid": 5, "z_mid_y_min": 5, "z_mid_y_max": 39,
              "z_mid_x_min": 5, "z_mid_x_max": 39},
             {"z_min": 60, "z_max": 63, "z_mid": 62, "z_mid_y_min": 1000, "z_mid_y_max": 1023,
              "z_mid_x_min": 1000, "z_mid_x_max": 1023}]
    np.savez_compressed(inp / "big.npz", imgs=imgs, spacing=np.ones(3), boxes=_as_member(boxes),
                        clicks=_as_member([{"fg": [[5, 20, 20]], "bg": []}, {"fg": [[62, 1010, 1010]], "bg": []}]),
                        clicks_order=_as_member([["fg"], ["fg"]]))
    del imgs
    rc, messages = run_main(["--inputs", str(inp), "--outputs", str(out), "--weights", str(weights),
                             "--device", "cpu", "--seconds-per-class", "1000"])
    assert rc == 0
    spec = {"big.npz": ({"boxes": boxes}, ("none", 0), 2, shape)}
    check_outputs(out, spec, messages)
    assert any(m.startswith("big.npz: segmented") for m in messages)


# ---------------------------------------------------------------- through the real command line
def _mixed_folder(folder: Path) -> dict:
    """One case of each kind of trouble next to a good one; returns name -> spec."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    good = {"imgs": rng.integers(0, 255, (12, 30, 30)).astype(np.uint8), "spacing": np.ones(3),
            "boxes": [{"z_min": 2, "z_max": 8, "z_mid": 5, "z_mid_y_min": 4, "z_mid_y_max": 20,
                       "z_mid_x_min": 4, "z_mid_x_max": 20}]}
    specs = {
        "a_good.npz": (good, ("none", 0), 1, (12, 30, 30)),
        "b_truncated.npz": (good, ("truncate", 0.6), 1, (12, 30, 30)),
        "c_garbage.npz": (good, ("garbage_file", 0.5), 1, (12, 30, 30)),
        "d_bad_boxes.npz": (dict(good, boxes=[{"z_min": "x"}], prev_pred=np.ones((12, 30, 30), np.uint8)),
                            ("none", 0), 1, (12, 30, 30)),
        "e_float_nan.npz": (dict(good, imgs=np.full((1, 7, 9), np.nan, np.float32)), ("none", 0), 1, (1, 7, 9)),
        "f_no_prompts.npz": ({"imgs": good["imgs"]}, ("none", 0), 0, (12, 30, 30)),
        # K = 0 (empty boxes) but a previous mask labelled 3: nothing above K survives
        "g_prev_above_k.npz": ({"imgs": good["imgs"], "boxes": [], "prev_pred": np.full((12, 30, 30), 3, np.uint8)},
                               ("none", 0), 0, (12, 30, 30)),
        # malformed clicks and a float previous mask holding NaN, -1 and 2: labels 0 and 2
        "h_float_prev_bad_clicks.npz": (
            {"imgs": good["imgs"], "clicks": "abc",
             "prev_pred": np.resize(np.array([np.nan, -1.0, 2.0, 0.0], np.float32), (12, 30, 30))},
            ("none", 0), 2, (12, 30, 30)),
    }
    for name, (members, corruption, _, _) in specs.items():
        write_case(folder / name, members, corruption)
    return specs


def _parse_log(stderr: str) -> list:
    return [line[len("infer: "):] for line in stderr.splitlines() if line.startswith("infer: ")]


@pytest.mark.slow
def test_command_line_on_a_folder_of_mixed_trouble(weights, tmp_path):
    specs = _mixed_folder(tmp_path / "in")
    proc = subprocess.run([sys.executable, "-m", "infer", "--inputs", str(tmp_path / "in"), "--outputs",
                           str(tmp_path / "out"), "--weights", str(weights), "--device", "cpu", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    messages = _parse_log(proc.stderr)
    check_status(proc.returncode, messages)  # some cases and classes fell back: the status says so
    assert proc.returncode == 4, proc.stderr
    check_outputs(tmp_path / "out", specs, messages)
    assert (tmp_path / "out" / "b_truncated.npz").exists()  # shape from the local zip header
    with np.load(tmp_path / "out" / "d_bad_boxes.npz") as z:  # malformed prompt: previous mask kept
        assert (z["segs"] == 1).all()
    with np.load(tmp_path / "out" / "h_float_prev_bad_clicks.npz") as z:
        assert np.array_equal(z["segs"], np.resize(np.array([0, 0, 2, 0], np.uint8), (12, 30, 30)))
    assert not (tmp_path / "out" / "c_garbage.npz").exists()


def test_predict_sh_on_a_folder_of_mixed_trouble(weights, tmp_path):
    specs = _mixed_folder(tmp_path / "in")
    env = dict(os.environ, INFER_INPUTS=str(tmp_path / "in"), INFER_OUTPUTS=str(tmp_path / "out"),
               INFER_WEIGHTS=str(weights), INFER_DEVICE="cpu", PYTHON=sys.executable)
    proc = subprocess.run(["sh", str(ROOT / "predict.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    check_status(proc.returncode, _parse_log(proc.stderr))
    assert proc.returncode == 4, proc.stderr  # some cases and classes fell back: the status says so
    check_outputs(tmp_path / "out", specs, _parse_log(proc.stderr))


def test_unloadable_weights_still_give_every_readable_case_an_output(tmp_path):
    specs = _mixed_folder(tmp_path / "in")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model_card.json").write_text("{not json")
    rc, messages = run_main(["--inputs", str(tmp_path / "in"), "--outputs", str(tmp_path / "out"),
                             "--weights", str(tmp_path / "w"), "--device", "cpu"])
    assert rc == 3  # every readable case has its fallback, and the exit status says the model failed
    check_outputs(tmp_path / "out", specs, messages)
    assert any(m.startswith("cannot load weights") for m in messages)
