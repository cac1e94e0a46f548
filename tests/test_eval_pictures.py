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
