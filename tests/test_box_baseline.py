"""scripts/box_baseline.py: Dice of a filled box, against hand-computed values."""
import numpy as np

from scripts.box_baseline import case_scores, fill_box, main


BOX = {"z_min": 0, "z_max": 2, "z_mid": 1, "z_mid_y_min": 1, "z_mid_y_max": 3, "z_mid_x_min": 1, "z_mid_x_max": 2}


def _gts():
    gts = np.zeros((4, 5, 5), np.uint8)
    gts[1:3, 1:3, 1:3] = 1  # 8 voxels
    return gts


def test_fill_box_is_inclusive():
    assert fill_box((4, 5, 5), BOX).sum() == 3 * 3 * 2
    assert fill_box((4, 5, 5), BOX, three_d=False).sum() == 3 * 2
    assert fill_box((4, 5, 5), BOX, three_d=False)[1].sum() == 6


def test_case_scores_by_hand():
    # 3D block 18 voxels, 8 shared: 2*8/(8+18); 2D box on z=1: 6 voxels, 4 shared: 2*4/(8+6)
    d3, d2 = case_scores([BOX], _gts())
    assert abs(d3 - 16 / 26) < 1e-12 and abs(d2 - 8 / 14) < 1e-12


def test_main_skips_cases_without_boxes(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "gts").mkdir()
    boxes = np.empty(1, dtype=object)
    boxes[0] = BOX
    img = np.zeros((4, 5, 5), np.uint8)
    np.savez(tmp_path / "images" / "a.npz", imgs=img, spacing=np.ones(3), boxes=boxes)
    np.savez(tmp_path / "images" / "b.npz", imgs=img, spacing=np.ones(3))
    for n in ("a", "b"):
        np.savez(tmp_path / "gts" / f"{n}.npz", gts=_gts())
    assert main(["--images", str(tmp_path / "images"), "--gts", str(tmp_path / "gts"),
                 "--csv", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out
    assert "b.npz: no boxes: skipped" in out and "mean over 1 box cases: 3D block 0.6154" in out
    assert (tmp_path / "s.csv").read_text().splitlines()[0] == "CaseName,num_class,DSC_box3d,DSC_box2d"
