"""The held-out evaluation family (scripts/heldout.py) produces what its docstring says."""
import numpy as np
import pytest

from scripts.heldout import (LARGE_EXTENT, MIN_VOXELS, Knobs, case_plan, make_case, tree,
                             write_set)

SMALL = dict(max_size=64, zero_border=0.0)


def _touch(a, b):
    """Independent 6-neighbour contact test by shifting ``a`` one voxel along each axis."""
    for axis in range(3):
        for shift in (1, -1):
            moved = np.roll(a, shift, axis=axis)
            edge = [slice(None)] * 3
            edge[axis] = 0 if shift == 1 else -1
            moved[tuple(edge)] = False  # no wrap-around
            if (moved & b).any():
                return True
    return False


@pytest.fixture(scope="module")
def touching_case():
    return make_case(0, seed=5, knobs=Knobs(scenarios=("touching",), zero_border=1.0, max_size=80))


def test_same_seed_same_case_other_seed_other_case():
    knobs = Knobs(scenarios=("organs",), **SMALL)
    a, b, c = make_case(0, 1, knobs), make_case(0, 1, knobs), make_case(0, 2, knobs)
    for key in ("imgs", "gts", "spacing"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["boxes"] == b["boxes"] and a["name"] == b["name"]
    assert a["gts"].shape != c["gts"].shape or not np.array_equal(a["imgs"], c["imgs"])


def test_boxes_follow_the_organizers_rule(touching_case):
    c = touching_case
    gts, boxes = c["gts"], c["boxes"]
    K = int(gts.max())
    assert len(boxes) == K
    H, W = gts.shape[1:]
    for k, b in enumerate(boxes, start=1):
        z, y, x = np.nonzero(gts == k)
        assert (b["z_min"], b["z_max"]) == (z.min(), z.max())  # full z extent, inclusive
        assert b["z_mid"] == z[len(z) // 2]  # middle voxel in C order
        ys, xs = np.nonzero(gts[b["z_mid"]] == k)
        grow = [ys.min() - b["z_mid_y_min"], b["z_mid_y_max"] - ys.max(),
                xs.min() - b["z_mid_x_min"], b["z_mid_x_max"] - xs.max()]
        # outward by int(s * H / 256), s in 0..5, clipped to the image
        assert all(0 <= g <= int(5 * H / 256) for g in grow)
        assert 0 <= b["z_mid_y_min"] and b["z_mid_y_max"] <= H - 1
        assert 0 <= b["z_mid_x_min"] and b["z_mid_x_max"] <= W - 1


def test_touching_classes_touch_and_no_class_is_small(touching_case):
    c = touching_case
    gts = c["gts"]
    K = len(c["kinds"])
    assert sorted(np.unique(gts).tolist()) == list(range(K + 1))
    assert all((gts == k).sum() >= MIN_VOXELS for k in range(1, K + 1))
    assert c["touching"]
    for a, b in c["touching"]:
        assert _touch(gts == a, gts == b)


def test_zero_border_holds_no_image_and_no_label(touching_case):
    c = touching_case
    assert (~c["fov"]).any()
    assert (c["imgs"][~c["fov"]] == 0).all() and (c["gts"][~c["fov"]] == 0).all()
    assert c["imgs"][c["fov"]].std() > 5


def test_large_organ_exceeds_a_patch_of_32_at_zoom_4():
    c = make_case(0, seed=3, knobs=Knobs(scenarios=("large",), max_size=144, zero_border=0.0))
    g = c["gts"]
    assert max(g.shape) <= 144
    spans = [max(np.ptp(np.nonzero(g == k)[a]) + 1 for a in (1, 2)) for k in range(1, int(g.max()) + 1)]
    assert max(spans) > LARGE_EXTENT


def test_trees_run_in_every_direction_not_mainly_along_z():
    shape, spacing = (48, 48, 48), (1.0, 1.0, 1.0)
    rng = np.random.default_rng(11)
    z_share = []
    for _ in range(8):
        m = tree(rng, shape, spacing, np.array([24.0, 24.0, 24.0]), 40.0, 1.2, max_depth=0)
        pts = np.argwhere(m).astype(float)
        pts -= pts.mean(axis=0)
        axis = np.linalg.svd(pts, full_matrices=False)[2][0]  # principal direction (z, y, x)
        z_share.append(abs(axis[0]))
    assert sum(s < 0.5 for s in z_share) >= 3  # most of the length in-plane for several trees


def test_written_set_layout_and_no_box_cases(tmp_path):
    knobs = Knobs(scenarios=("organs", "lowcontrast"), no_box_every=2, **SMALL)
    names = write_set(tmp_path, 2, seed=4, knobs=knobs)
    assert [case_plan(i, knobs)[2] for i in range(2)] == [True, False]
    for i, name in enumerate(names):
        with np.load(tmp_path / "images" / name, allow_pickle=False) as f:
            keys = set(f.files)
            assert f["imgs"].dtype == np.uint8
        with np.load(tmp_path / "gts" / name, allow_pickle=False) as f:
            assert set(f.files) == {"gts", "spacing"}
        assert keys == ({"imgs", "spacing", "boxes"} if i == 0 else {"imgs", "spacing"})
    assert names[0].startswith(("CT_heldout_organs", "MR_heldout_organs"))
