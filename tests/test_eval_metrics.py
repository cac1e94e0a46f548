"""DSC / NSD / AUC (evaluation.metrics) against hand-computed and brute-force values."""
import itertools
import math

import numpy as np
import pytest
from surface_distance.lookup_tables import create_table_neighbour_code_to_surface_area

from evaluation.metrics import (dice, interaction_auc, multi_class_dsc, multi_class_nsd,
                                stage_scores, surface_dice, surface_distances)


def box(shape, lo, hi, value=1, dtype=np.uint8):
    out = np.zeros(shape, dtype)
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    return out


def brute_force_nsd(gt, pred, spacing, tol=2.0):
    """Independent surface Dice: surfels = corner points whose 2x2x2 neighbourhood is mixed, the
    area of each from DeepMind's table for its 8-bit code (bit 128 = voxel (-1,-1,-1) ... bit 1 =
    voxel (0,0,0) relative to the corner), distances by exhaustive search in mm."""
    table = create_table_neighbour_code_to_surface_area(spacing)
    bits = {(a, b, c): 1 << (7 - (4 * a + 2 * b + c)) for a, b, c in itertools.product((0, 1), repeat=3)}

    def surfels(mask):
        padded = np.pad(mask.astype(bool), 1)
        pts, areas = [], []
        for p in itertools.product(*(range(n + 1) for n in mask.shape)):
            # corner p sits between voxels p-1 and p of each axis (padded index p and p+1)
            code = sum(bit for (a, b, c), bit in bits.items() if padded[p[0] + a, p[1] + b, p[2] + c])
            if code not in (0, 255):
                pts.append(p)
                areas.append(table[code])
        return np.array(pts, float) * np.asarray(spacing, float), np.array(areas)

    pg, ag = surfels(gt)
    pp, ap = surfels(pred)
    if len(pp) == 0 or len(pg) == 0:
        return 0.0
    d = np.sqrt(((pg[:, None, :] - pp[None, :, :]) ** 2).sum(-1))
    return (ag[d.min(1) <= tol].sum() + ap[d.min(0) <= tol].sum()) / (ag.sum() + ap.sum())


def test_identical_masks_score_one():
    gts = box((10, 12, 12), (2, 3, 3), (7, 9, 10))
    gts[1, 1, 1] = 2
    assert multi_class_dsc(gts, gts) == 1.0
    assert multi_class_nsd(gts, gts, (2.5, 0.8, 0.8)) == 1.0
    assert stage_scores(gts, gts, (1.0, 1.0, 1.0)) == (1.0, 1.0)


def test_empty_prediction_scores_zero():
    gts = box((10, 10, 10), (2, 2, 2), (6, 6, 6))
    empty = np.zeros_like(gts)
    assert multi_class_dsc(gts, empty) == 0.0
    assert multi_class_nsd(gts, empty, (1.0, 1.0, 1.0)) == 0.0  # every gt surfel at distance inf
    assert stage_scores(gts, empty, (1.0, 1.0, 1.0)) == (0.0, 0.0)


def test_dice_conventions():
    a = np.zeros((3, 3, 3), bool)
    assert math.isnan(dice(a, a))  # both empty: NaN, as SurfaceDice.compute_dice_coefficient
    assert math.isnan(multi_class_dsc(np.zeros((3, 3, 3), np.uint8), box((3, 3, 3), (0, 0, 0), (1, 1, 1))))
    # labels of the prediction that are not in gts are not scored
    gts = box((6, 6, 6), (1, 1, 1), (3, 3, 3))
    segs = gts.copy()
    segs[5, 5, 5] = 7
    assert multi_class_dsc(gts, segs) == 1.0


def test_no_foreground_gts_gives_nan_dsc_and_zero_nsd():
    dsc, nsd = stage_scores(np.zeros((4, 4, 4), np.uint8), np.ones((4, 4, 4), np.uint8), (1, 1, 1))
    assert math.isnan(dsc) and nsd == 0.0


def test_one_voxel_shift_of_a_single_voxel():
    # one voxel vs its neighbour along z: each has 8 surfel corners with one-bit codes, all of the
    # same area; they share the 4 corners of the common face (distance 0) and the other 4 are one
    # z step away. spacing z = 3 mm > 2 mm: half the surface agrees; 1.5 mm: all of it.
    gt = box((5, 5, 5), (2, 2, 2), (3, 3, 3))
    pred = box((5, 5, 5), (3, 2, 2), (4, 3, 3))
    assert multi_class_nsd(gt, pred, (3.0, 1.0, 1.0)) == pytest.approx(0.5, abs=1e-12)
    assert multi_class_nsd(gt, pred, (1.5, 1.0, 1.0)) == 1.0
    assert multi_class_dsc(gt, pred) == 0.0
    assert stage_scores(gt, pred, (1.5, 1.0, 1.0)) == (0.0, 0.0)  # DSC 0 <= 0.2: NSD not computed


@pytest.mark.parametrize("spacing, expected", [((1.5, 1.0, 1.0), 1.0), ((2.0, 0.7, 0.7), 1.0),
                                               ((3.0, 3.0, 3.0), None), ((2.5, 0.6, 1.3), None)])
def test_one_voxel_shift_of_a_box(spacing, expected):
    # 4x4x4 box shifted by one voxel along z: DSC = 2*48/128 = 0.75 by hand. Every surface point
    # is at most one z step from the other surface, so with z spacing <= 2 mm NSD = 1 exactly
    # (2.0 tests that the tolerance is inclusive); otherwise compare with the brute force.
    gt = box((8, 7, 7), (1, 1, 2), (5, 5, 6))
    pred = box((8, 7, 7), (2, 1, 2), (6, 5, 6))
    assert multi_class_dsc(gt, pred) == 0.75
    got = multi_class_nsd(gt, pred, spacing)
    want = brute_force_nsd(gt, pred, spacing) if expected is None else expected
    assert got == pytest.approx(want, abs=1e-12)
    if expected is None:
        assert 0.0 < got < 1.0
    assert stage_scores(gt, pred, spacing) == (0.75, got)


def test_nsd_is_gated_at_dice_0_2():
    # two rows of 10 voxels overlapping in 2: DSC = 2*2/20 = 0.2 exactly -> NSD forced to 0;
    # overlapping in 3: DSC 0.3 -> NSD computed (positive)
    gt = box((3, 3, 30), (1, 1, 0), (2, 2, 10))
    pred_02 = box((3, 3, 30), (1, 1, 8), (2, 2, 18))
    pred_03 = box((3, 3, 30), (1, 1, 7), (2, 2, 17))
    assert multi_class_dsc(gt, pred_02) == 0.2
    assert multi_class_nsd(gt, pred_02, (1, 1, 1)) > 0.0
    assert stage_scores(gt, pred_02, (1, 1, 1)) == (0.2, 0.0)
    dsc, nsd = stage_scores(gt, pred_03, (1, 1, 1))
    assert dsc == pytest.approx(0.3) and nsd == multi_class_nsd(gt, pred_03, (1, 1, 1)) > 0.0


def test_surface_distances_of_empty_masks():
    e = np.zeros((4, 4, 4), bool)
    d = surface_distances(e, e, (1, 1, 1))
    assert all(len(v) == 0 for v in d.values())
    assert math.isnan(surface_dice(d, 2.0))


def test_multi_class_mean_and_missing_background_label():
    gts = np.zeros((6, 6, 12), np.uint8)
    gts[1:5, 1:5, 1:5] = 1
    gts[1:5, 1:5, 7:11] = 2
    segs = gts.copy()
    segs[segs == 2] = 0  # class 1 perfect, class 2 missed: mean DSC 0.5
    assert multi_class_dsc(gts, segs) == 0.5
    # organizer quirk: without any 0 in gts, the smallest label is taken as background
    full = np.where(gts == 0, 3, gts).astype(np.uint8)
    assert multi_class_dsc(full, np.where(full == 1, 1, 0)) == 0.0  # only labels 2 and 3 scored


def test_auc_is_the_trapezoid_over_the_five_click_stages():
    values = [0.123, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert interaction_auc(values) == pytest.approx((0.5 + 0.9) / 2 + 0.6 + 0.7 + 0.8)  # 2.8
    assert interaction_auc([0.99] + values[1:]) == interaction_auc(values)  # box stage left out
    assert interaction_auc([0, 1, 1, 1, 1, 1]) == 4.0
    assert math.isnan(interaction_auc([0, 1, float("nan"), 1, 1, 1]))
