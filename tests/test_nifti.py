"""scripts/nifti.py: NIfTI -> organizer case -> segs -> NIfTI, checked against hand-computed values
on tiny files made here (a non-trivial affine: different voxel sizes per axis, x flipped)."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from scripts import nifti  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# x flipped (negative step), voxel sizes 0.8 (x), 1.5 (y), 3.0 (z), an offset
AFFINE = np.array([[-0.8, 0.0, 0.0, 40.0],
                   [0.0, 1.5, 0.0, -12.0],
                   [0.0, 0.0, 3.0, 7.5],
                   [0.0, 0.0, 0.0, 1.0]])


def _save(path, data_xyz, affine=AFFINE):
    nib.save(nib.Nifti1Image(data_xyz, affine), str(path))
    return path


def _labels_xyz():
    """(x, y, z) = (6, 5, 4) label map: value 7 on z=0 at (x1, y1); on z=1 x 1..3, y 1..2; on z=2
    x 2..4, y 2..3. Value 3 at (x0, y4, z3). Value 9 at (x5, y0, z0) (not chosen below)."""
    lab = np.zeros((6, 5, 4), np.int16)
    lab[1, 1, 0] = 7
    lab[1:4, 1:3, 1] = 7
    lab[2:5, 2:4, 2] = 7
    lab[0, 4, 3] = 3
    lab[5, 0, 0] = 9
    return lab


def test_axis_order_spacing_and_affine_are_read_as_the_organizer_lays_them_out(tmp_path):
    x, y, z = np.meshgrid(np.arange(4), np.arange(3), np.arange(2), indexing="ij")
    vol = nifti.read_nifti(_save(tmp_path / "v.nii.gz", (100 * x + 10 * y + z).astype(np.int16)))
    assert vol["array"].shape == (2, 3, 4)  # (z, y, x)
    assert vol["array"][1, 2, 3] == 321 and vol["array"][0, 1, 2] == 210
    assert vol["spacing"] == pytest.approx((3.0, 1.5, 0.8))  # header (float32) zooms (0.8, 1.5, 3.0) reversed
    assert vol["shape_xyz"] == (4, 3, 2)
    np.testing.assert_allclose(vol["affine"], AFFINE, rtol=1e-6)


def test_ct_window_values():
    hu = np.array([-1000, -160, 0, 40, 240, 1000])
    # window 40,400: lo = -160, (HU + 160) / 400 * 255, truncated: 0, 0, 102, 127 (127.5), 255, 255
    assert nifti.ct_to_uint8(hu).tolist() == [0, 0, 102, 127, 255, 255]
    # window 50,100: lo = 0: 40 -> 102, 75 -> 191 (191.25), 100 -> 255
    assert nifti.ct_to_uint8(np.array([-5, 40, 75, 100]), 50, 100).tolist() == [0, 102, 191, 255]
    assert nifti.parse_window("50,100") == (50.0, 100.0)
    with pytest.raises(ValueError):
        nifti.parse_window("50")


def test_percentile_rule_for_other_modalities():
    values = np.concatenate([[0.0], np.arange(1, 202, dtype=float)])  # 0 and 1..201
    out = nifti.percentile_to_uint8(values)
    # percentiles of 1..201 (201 values, linear): 0.5 % -> 2, 99.5 % -> 200; (v - 2) / 198 * 255
    assert out[0] == 0  # zero stays zero
    assert out[1] == 0 and out[2] == 0  # 1 clipped to 2
    assert out[50] == 61  # 48 / 198 * 255 = 61.8
    assert out[101] == 127  # 99 / 198 * 255 = 127.5
    assert out[200] == 255 and out[201] == 255


def test_to_case_writes_the_layout_classes_boxes_and_meta(tmp_path):
    scan = np.full((6, 5, 4), -1000, np.int16)
    scan[2, 3, 1] = 40
    _save(tmp_path / "scan.nii.gz", scan)
    _save(tmp_path / "seg.nii.gz", _labels_xyz())
    (tmp_path / "names.json").write_text(json.dumps({"7": {"name": "liver"}, "3": {"name": "spleen"},
                                                     "9": {"name": "other"}}))
    rc = nifti.main(["to-case", "--scan", str(tmp_path / "scan.nii.gz"), "--labels", str(tmp_path / "seg.nii.gz"),
                     "--label-names", str(tmp_path / "names.json"), "--classes", "liver,3",
                     "--out", str(tmp_path / "out"), "--name", "CT_tiny"])
    assert rc == 0
    with np.load(tmp_path / "out" / "images" / "CT_tiny.npz", allow_pickle=False) as f:
        assert sorted(f.files) == ["boxes", "imgs", "spacing"]
        assert f["imgs"].dtype == np.uint8 and f["imgs"].shape == (4, 5, 6)
        assert f["imgs"][1, 3, 2] == 127 and f["imgs"][0, 0, 0] == 0
        np.testing.assert_allclose(f["spacing"], [3.0, 1.5, 0.8])
    from infer.npz import read_case
    boxes = read_case(tmp_path / "out" / "images" / "CT_tiny.npz")["boxes"]
    # class 1 = label 7: 13 voxels in C order (z, y, x): 1 on z=0, 6 on z=1, 6 on z=2; the middle
    # one (index 6) is on z=1, where y spans 1..2 and x 1..3; H, W < 52: the jitter int(s*H/256) is 0
    assert boxes[0] == {"z_min": 0, "z_max": 2, "z_mid": 1, "z_mid_y_min": 1, "z_mid_y_max": 2,
                        "z_mid_x_min": 1, "z_mid_x_max": 3}
    assert boxes[1] == {"z_min": 3, "z_max": 3, "z_mid": 3, "z_mid_y_min": 4, "z_mid_y_max": 4,
                        "z_mid_x_min": 0, "z_mid_x_max": 0}
    with np.load(tmp_path / "out" / "gts" / "CT_tiny.npz", allow_pickle=False) as f:
        gts = f["gts"]
    assert gts[3, 4, 0] == 2 and gts[1, 2, 3] == 1 and gts[0, 0, 5] == 0  # label 9 not chosen
    assert np.bincount(gts.ravel()).tolist() == [4 * 5 * 6 - 14, 13, 1]
    meta = json.loads((tmp_path / "out" / "meta" / "CT_tiny.json").read_text())
    assert meta["classes"] == [{"class": 1, "value": 7, "name": "liver"}, {"class": 2, "value": 3, "name": "spleen"}]
    assert meta["shape_xyz"] == [6, 5, 4]
    np.testing.assert_allclose(meta["affine"], AFFINE)


def test_no_boxes_and_unknown_classes(tmp_path):
    _save(tmp_path / "scan.nii.gz", np.zeros((6, 5, 4), np.int16))
    _save(tmp_path / "seg.nii.gz", _labels_xyz())
    nifti.main(["to-case", "--scan", str(tmp_path / "scan.nii.gz"), "--labels", str(tmp_path / "seg.nii.gz"),
                "--no-boxes", "--out", str(tmp_path / "o")])
    with np.load(tmp_path / "o" / "images" / "CT_scan.npz", allow_pickle=False) as f:
        assert "boxes" not in f.files
    with np.load(tmp_path / "o" / "gts" / "CT_scan.npz", allow_pickle=False) as f:
        assert sorted(np.unique(f["gts"]).tolist()) == [0, 1, 2, 3]  # values 3, 7, 9 ascending
    with pytest.raises(SystemExit):
        nifti.main(["to-case", "--scan", str(tmp_path / "scan.nii.gz"), "--labels", str(tmp_path / "seg.nii.gz"),
                    "--classes", "4", "--out", str(tmp_path / "o")])


def test_segs_go_back_to_the_source_grid_with_original_values_or_per_class(tmp_path):
    _save(tmp_path / "scan.nii.gz", np.zeros((6, 5, 4), np.int16))
    lab = _labels_xyz()
    _save(tmp_path / "seg.nii.gz", lab)
    nifti.main(["to-case", "--scan", str(tmp_path / "scan.nii.gz"), "--labels", str(tmp_path / "seg.nii.gz"),
                "--classes", "7,3", "--out", str(tmp_path / "o"), "--name", "c"])
    with np.load(tmp_path / "o" / "gts" / "c.npz", allow_pickle=False) as f:
        np.savez(tmp_path / "out.npz", segs=f["gts"])  # a perfect prediction
    meta = tmp_path / "o" / "meta" / "c.json"
    nifti.main(["to-nifti", "--segs", str(tmp_path / "out.npz"), "--meta", str(meta),
                "--original-values", "--out", str(tmp_path / "back.nii.gz")])
    back = nib.load(str(tmp_path / "back.nii.gz"))
    np.testing.assert_allclose(back.affine, AFFINE)
    expected = np.where(lab == 9, 0, lab)
    np.testing.assert_array_equal(np.asarray(back.dataobj), expected)
    nifti.main(["to-nifti", "--segs", str(tmp_path / "out.npz"), "--like", str(tmp_path / "scan.nii.gz"),
                "--out", str(tmp_path / "classes.nii.gz")])
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "classes.nii.gz")).dataobj),
                                  (lab == 7) * 1 + (lab == 3) * 2)
    nifti.main(["to-nifti", "--segs", str(tmp_path / "out.npz"), "--meta", str(meta), "--per-class",
                "--out", str(tmp_path / "per")])
    assert sorted(p.name for p in (tmp_path / "per").iterdir()) == ["1_label_7.nii.gz", "2_label_3.nii.gz"]  # no names given
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "per" / "2_label_3.nii.gz")).dataobj), lab == 3)
    with pytest.raises(ValueError):  # wrong grid
        nifti.segs_to_nifti(np.zeros((6, 5, 4), np.uint8), str(meta), tmp_path / "x.nii.gz")


def test_prompt_case_converts_nifti_coordinates(tmp_path):
    _save(tmp_path / "scan.nii.gz", np.zeros((6, 5, 4), np.int16))
    case = nifti.prompt_case(tmp_path / "scan.nii.gz", boxes=[((1, 2, 0), (4, 3, 3))],
                             clicks=[{"fg": [(2, 3, 1)], "bg": [(0, 0, 3), (5, 4, 0)]}])
    assert case["imgs"].shape == (4, 5, 6) and case["spacing"] == pytest.approx((3.0, 1.5, 0.8))
    assert case["boxes"] == [{"z_min": 0, "z_max": 3, "z_mid": 1, "z_mid_y_min": 2, "z_mid_y_max": 3,
                              "z_mid_x_min": 1, "z_mid_x_max": 4}]
    assert case["clicks"] == [{"fg": [[1, 3, 2]], "bg": [[3, 0, 0], [0, 4, 5]]}]
    assert case["clicks_order"] == [["fg", "bg", "bg"]]
    with pytest.raises(ValueError):
        nifti.prompt_case(tmp_path / "scan.nii.gz", boxes=[((0, 0, 0), (1, 1, 1))], clicks=[])


def test_infer_names_the_files_it_skips_in_one_line(tmp_path, caplog):
    from infer.__main__ import main
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "scan.nii.gz").write_bytes(b"x")
    (tmp_path / "in" / "notes.txt").write_text("x")
    (tmp_path / "in" / "sub").mkdir()
    with caplog.at_level(logging.INFO, logger="infer"):
        assert main(["--inputs", str(tmp_path / "in"), "--outputs", str(tmp_path / "out")]) == 0
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "notes.txt" in lines[0] and "scan.nii.gz" in lines[0] and "sub" not in lines[0].split(":")[1]
    assert "python -m scripts.nifti to-case" in lines[0]


def test_an_upper_case_npz_name_is_a_case_and_keeps_its_name(tmp_path):
    from infer.__main__ import _case_names
    for n in ("CASE.NPZ", "b.Npz", "c.npz", "d.npz.txt"):
        (tmp_path / n).write_bytes(b"x")
    assert _case_names(str(tmp_path)) == ["CASE.NPZ", "b.Npz", "c.npz"]


def test_skipped_line_without_nifti_has_no_conversion_hint_and_stays_short():
    from infer.__main__ import _skipped_line
    line = _skipped_line([f"f{i}.txt" for i in range(8)])
    assert line == "skipped 8 file(s) that are not .npz cases: f0.txt, f1.txt, f2.txt, f3.txt, f4.txt and 3 more"


@pytest.mark.slow
def test_round_trip_scan_to_predict_sh_to_nifti(tmp_path):
    """A bright off-centre block in a CT-like scan: to-case, sh predict.sh with the demo model,
    to-nifti; the prediction on the source grid overlaps the block (a transposition or flip
    anywhere would put it elsewhere)."""
    scan = np.full((48, 40, 24), -100, np.int16)  # (x, y, z), fat-like background
    lab = np.zeros(scan.shape, np.uint8)
    lab[8:20, 22:34, 6:14] = 1
    scan[lab == 1] = 120
    _save(tmp_path / "scan.nii.gz", scan)
    _save(tmp_path / "seg.nii.gz", lab)
    nifti.main(["to-case", "--scan", str(tmp_path / "scan.nii.gz"), "--labels", str(tmp_path / "seg.nii.gz"),
                "--out", str(tmp_path / "case"), "--name", "CT_block"])
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(["sh", "predict.sh", "--inputs", str(tmp_path / "case" / "images"), "--outputs",
                          str(tmp_path / "pred"), "--weights", "weights/demo", "--device", "cpu"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    nifti.main(["to-nifti", "--segs", str(tmp_path / "pred" / "CT_block.npz"), "--like",
                str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "pred.nii.gz")])
    out = nib.load(str(tmp_path / "pred.nii.gz"))
    np.testing.assert_allclose(out.affine, AFFINE)
    pred = np.asarray(out.dataobj) == 1
    truth = lab == 1
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert dice > 0.8, dice


@pytest.mark.slow
def test_own_prompts_through_the_predictor_back_to_nifti(tmp_path):
    """prompt_case with a box (NIfTI corners) and a click on a bright block, Predictor.predict,
    segs_to_nifti on the scan's grid: the block is found where it is in the scan."""
    from infer.predictor import Predictor
    scan = np.full((48, 40, 24), -100, np.int16)
    scan[8:20, 22:34, 6:14] = 120
    _save(tmp_path / "scan.nii.gz", scan)
    case = nifti.prompt_case(tmp_path / "scan.nii.gz", boxes=[((8, 22, 6), (19, 33, 13))],
                             clicks=[{"fg": [(13, 27, 9)], "bg": []}])
    segs = Predictor.from_path(ROOT / "weights" / "demo", device="cpu").predict(case)
    nifti.segs_to_nifti(segs, tmp_path / "scan.nii.gz", tmp_path / "pred.nii.gz")
    pred = np.asarray(nib.load(str(tmp_path / "pred.nii.gz")).dataobj) == 1
    truth = scan == 120
    assert 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.8


def test_help_runs_without_writing(tmp_path):
    res = subprocess.run([sys.executable, "-m", "scripts.nifti", "to-case", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--window" in res.stdout and "--no-boxes" in res.stdout


def test_the_image_package_never_imports_nibabel():
    assert [p.name for p in (ROOT / "infer").rglob("*.py") if "nibabel" in p.read_text()] == []
    assert "nibabel" not in (ROOT / "requirements-image.txt").read_text()
