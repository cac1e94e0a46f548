"""Click simulation (evaluation.clicks) on volumes where the organizer's click is known by hand."""
import numpy as np
import pytest

from evaluation.clicks import Click, ClickState, class_labels, next_click, pick_max_voxel, simulate_round


def cube(mask, lo, size, value=True):
    z, y, x = lo
    mask[z:z + size, y:y + size, x:x + size] = value
    return mask


def test_click_goes_to_the_centre_of_the_larger_of_two_missed_blobs():
    gt = np.zeros((30, 30, 30), bool)
    cube(gt, (2, 2, 2), 3)  # small blob first in scan order
    cube(gt, (15, 10, 12), 7)  # 7^3 cube: its centre (18, 13, 15) is the only voxel at EDT 4
    click = next_click(np.zeros_like(gt), gt)
    assert click == Click("fg", (18, 13, 15))


def test_perfect_class_gives_no_click_and_none_in_clicks_order():
    gts = np.zeros((12, 12, 12), np.uint8)
    cube(gts, (1, 1, 1), 4, 1)
    cube(gts, (6, 6, 6), 5, 2)
    segs = gts.copy()
    segs[7:10, 7:10, 7:10] = 0  # class 2 misses a 3^3 core: fg click at its centre (8, 8, 8)
    state = ClickState.empty(2)
    out = simulate_round(segs, gts, state)
    assert out == [None, Click("fg", (8, 8, 8))]
    assert state.clicks_order == [[None], ["fg"]]
    assert state.clicks == [{"fg": [], "bg": []}, {"fg": [[8, 8, 8]], "bg": []}]
    assert next_click(gts == 1, gts == 1) is None


def test_false_positive_blob_gives_a_background_click():
    gt = np.zeros((20, 20, 20), bool)
    cube(gt, (2, 2, 2), 4)
    pred = gt.copy()
    cube(pred, (10, 11, 12), 5)  # 5^3 false positive, centre (12, 13, 14)
    pred[2, 2, 2] = False  # one missed voxel: a smaller error
    assert next_click(pred, gt) == Click("bg", (12, 13, 14))


def test_error_touching_the_volume_border_counts_outside_as_background():
    # organizer pads the component's box with zeros, so a 5^3 cube in the corner peaks at its
    # centre (2, 2, 2) with EDT 3; without that, the corner voxel (0, 0, 0) would be farthest
    gt = np.zeros((12, 12, 12), bool)
    cube(gt, (0, 0, 0), 5)
    assert next_click(np.zeros_like(gt), gt) == Click("fg", (2, 2, 2))


def test_edt_ignores_spacing_ties_broken_by_seed_42():
    # A 3 x 9 x 9 slab (z, y, x). The organizer's EDT has no `sampling`: in voxels the maximum 2
    # is reached on the middle slice z = 1 for y, x in 1..7 (49 voxels); with spacing (5, 1, 1)
    # mm the slab's centre (1, 4, 4) would be the unique maximum instead.
    gt = np.zeros((10, 20, 20), bool)
    z0, y0, x0 = 3, 5, 6
    gt[z0:z0 + 3, y0:y0 + 9, x0:x0 + 9] = True
    i = np.random.RandomState(42).choice(49)  # the organizer's np.random.seed(42); choice(49)
    assert i == 38  # so the tie-break is not the centre by accident
    expected = (z0 + 1, y0 + 1 + i // 7, x0 + 1 + i % 7)  # C order over (y, x) in 1..7
    assert next_click(np.zeros_like(gt), gt) == Click("fg", expected)
    assert expected != (z0 + 1, y0 + 4, x0 + 4)


def test_tie_break_inside_a_cube_is_deterministic():
    gt = np.zeros((8, 8, 8), bool)
    cube(gt, (3, 2, 4), 2)  # all 8 voxels at EDT 1; C-order index 6 = offset (1, 1, 0)
    assert np.random.RandomState(42).choice(8) == 6
    first = next_click(np.zeros_like(gt), gt)
    assert first == Click("fg", (4, 3, 4))
    assert next_click(np.zeros_like(gt), gt) == first


def test_equal_components_go_to_the_first_labelled():
    # two identical 3^3 misses; cc3d numbers the one first met in the scan first (np.argmax)
    gt = np.zeros((20, 20, 20), bool)
    cube(gt, (1, 1, 1), 3)
    cube(gt, (14, 14, 14), 3)
    assert next_click(np.zeros_like(gt), gt) == Click("fg", (2, 2, 2))


def test_components_are_26_connected():
    # two 2^3 cubes touching only at a corner form ONE 16-voxel component (26-connectivity),
    # which beats a separate 3x3x1 plate of 9 voxels; all 16 voxels tie at EDT 1
    gt = np.zeros((16, 16, 16), bool)
    cube(gt, (1, 1, 1), 2)
    cube(gt, (3, 3, 3), 2)
    gt[10, 10:13, 10:13] = True
    click = next_click(np.zeros_like(gt), gt)
    i = np.random.RandomState(42).choice(16)
    voxels = sorted([(1 + a, 1 + b, 1 + c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]
                    + [(3 + a, 3 + b, 3 + c) for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    assert click == Click("fg", voxels[i])


@pytest.mark.parametrize("n", [1, 2, 3, 7, 49, 1000])
def test_seeded_pick_equals_the_organizers_global_seed_call(n):
    state = np.random.get_state()
    np.random.seed(42)
    organizer = np.random.choice(n)
    np.random.set_state(state)
    values = np.zeros(n + 3)
    values[3:] = 1.0  # n tied maxima at indices 3..n+2
    assert pick_max_voxel(values) == (3 + organizer,)


def test_class_labels_drop_the_smallest_label():
    assert class_labels(np.array([[[0, 3, 1]]])).tolist() == [1, 3]
    assert class_labels(np.array([[[2, 5]]])).tolist() == [5]  # no 0: label 2 taken as background
