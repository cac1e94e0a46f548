"""Per-case pictures (evaluation.pictures)."""
import numpy as np

from evaluation.clicks import Click
from evaluation.pictures import centre_slice, draw_case, stage_slices
from evaluation.runner import CaseResult
from scripts.synthetic import box_for_mask


def test_box_slice_is_the_organizers_z_mid():
    rng = np.random.default_rng(3)
    mask = np.zeros((30, 20, 20), bool)
    mask[4:9, 2:6, 2:6] = True
    mask[20:22, 10:12, 10:12] = True  # a second, smaller part: z_mid is the C-order middle voxel
    # 80 + 8 voxels; the 44th in C order is in slice 4 + 44 // 16 = 6
    assert centre_slice(mask) == 6 == box_for_mask(mask, rng)["z_mid"]


def test_each_click_stage_shows_the_slice_of_its_click_and_keeps_it_without_one():
    clicks = [Click("fg", (7, 1, 1)), None, Click("bg", (3, 2, 2)), None, None]
    assert stage_slices(12, clicks) == [12, 7, 7, 3, 3, 3]


def test_picture_is_written_for_a_case_without_box_stage(tmp_path):
    gts = np.zeros((10, 16, 16), np.uint8)
    gts[2:6, 3:9, 3:9] = 1
    gts[5:8, 9:14, 9:14] = 2
    imgs = (gts * 80).astype(np.uint8)
    segs = [None] + [gts.copy() for _ in range(5)]
    r = CaseResult(name="x.npz", n_classes=2, has_boxes=False, ran=[False] + [True] * 5,
                   dsc=[0.0] + [1.0] * 5, class_dsc=[[]] + [[1.0, 1.0]] * 5,
                   clicks=[[Click("fg", (3, 5, 5)), Click("fg", (6, 11, 11))]] + [[None, None]] * 4)
    path = draw_case(r, imgs, gts, (2.0, 1.0, 1.0), segs, tmp_path / "cases" / "x.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_pictures_and_harm_columns_and_line(tmp_path, capsys):
    """Cold mode with a predict.sh that alternates a perfect output and one without class 1:
    class 1 drops 1 -> 0 at steps 1->2, 3->4, 5->6, class 2 never: 3 harmful steps of 10."""
    import csv
    from evaluation.__main__ import main
    gts = np.zeros((12, 16, 16), np.uint8)
    gts[2:6, 3:9, 3:9] = 1
    gts[6:10, 9:14, 9:14] = 2
    box = {"z_min": 2, "z_max": 5, "z_mid": 4, "z_mid_y_min": 3, "z_mid_y_max": 8,
           "z_mid_x_min": 3, "z_mid_x_max": 8}
    for d in ("images", "gts"):
        (tmp_path / d).mkdir()
    np.savez(tmp_path / "images" / "c.npz", imgs=(gts * 60).astype(np.uint8),
             spacing=np.array([2.0, 1.0, 1.0]), boxes=[box, {**box, "z_min": 6, "z_max": 9, "z_mid": 8}])
    np.savez(tmp_path / "gts" / "c.npz", gts=gts)
    np.savez(tmp_path / "out0.npz", segs=gts)
    np.savez(tmp_path / "out1.npz", segs=np.where(gts == 1, 0, gts).astype(np.uint8))
    (tmp_path / "predict.sh").write_text(
        f'd="{tmp_path}"; n=$(cat "$d/count" 2>/dev/null || echo 0); echo $((n + 1)) > "$d/count"\n'
        'for f in "$INFER_INPUTS"/*.npz; do cp "$d/out$((n % 2)).npz" "$INFER_OUTPUTS/$(basename "$f")"; done\n')
    out = tmp_path / "out"
    assert main(["--images", str(tmp_path / "images"), "--gts", str(tmp_path / "gts"), "--out",
                 str(out), "--predict-sh", str(tmp_path / "predict.sh")]) == 0
    (row,) = csv.DictReader(open(out / "metrics.csv"))
    assert [float(row[f"DSC_{k}"]) for k in range(1, 7)] == [1.0, 0.5, 1.0, 0.5, 1.0, 0.5]
    assert (row["HarmfulSteps"], row["ClickSteps"]) == ("3", "10") and float(row["ClickHarmRate"]) == 0.3
    assert float(row["FinalDropFromBest"]) == 0.5
    assert "click harm: 3/10 class steps" in capsys.readouterr().out
    assert (out / "cases" / "c.png").read_bytes()[:4] == b"\x89PNG"
