"""The synthetic generator produces what scripts/synthetic.py says it does."""
import numpy as np
import pytest

from scripts import synthetic
from scripts.synthetic import (MIN_VOXELS, box_for_mask, boxes_for_gts, generate_case,
                               touches_border, write_dataset)

SHAPE = (32, 64, 64)


def _case(i, **kw):
    return generate_case(np.random.default_rng([123, i]), shape=SHAPE, **kw)


def test_classes_present_types_and_spacing():
    for i in range(6):
        c = _case(i)
        imgs, gts, sp = c["imgs"], c["gts"], c["spacing"]
        assert imgs.shape == gts.shape == SHAPE
        assert imgs.dtype == np.uint8 and gts.dtype == np.uint8
        K = len(c["kinds"])
        assert 2 <= K <= 4
        assert sorted(np.unique(gts).tolist()) == list(range(K + 1))
        for k in range(1, K + 1):
            assert (gts == k).sum() >= MIN_VOXELS
        # anisotropic: z coarser than the in-plane spacing, which is square
        assert sp.shape == (3,) and sp[1] == sp[2] and sp[0] >= 1.49 * sp[1]
        # the image is not flat and classes differ from their surroundings
        assert imgs.std() > 10
        for k in range(1, K + 1):
            assert abs(float(imgs[gts == k].mean()) - float(imgs[gts == 0].mean())) > 5


def test_every_kind_and_border_cut():
    c = _case(0, n_classes=4, kinds=["border", "tube", "ellipsoid", "blob"])
    gts = c["gts"]
    assert touches_border(gts == 1)  # the border object is cut by a face of the volume
    assert not touches_border(gts == 3)  # centred ellipsoids stay inside
    # a tube is thin: most of its voxels are at most ~2 voxels from its surface in-plane
    tube = gts == 2
    from scipy import ndimage
    depth = ndimage.distance_transform_edt(tube, sampling=(1e6, 1, 1))  # in-plane distance only
    assert np.median(depth[tube]) <= 3
    # tubes run mainly along z: their z extent (mm) is the longest, in most cases
    along_z = 0
    for i in range(6):
        c = _case(i, n_classes=2, kinds=["tube", "blob"])
        z, y, x = np.nonzero(c["gts"] == 1)
        ext = [(v.max() - v.min() + 1) * s for v, s in zip((z, y, x), c["spacing"])]
        along_z += ext[0] >= max(ext[1], ext[2])
    assert along_z >= 5
    # random cases include border-cut objects, by the generator's own report and by the data
    border_seen = 0
    for i in range(10):
        c = _case(i)
        for k, kind in enumerate(c["kinds"], start=1):
            if kind == "border":
                assert touches_border(c["gts"] == k)
                border_seen += 1
    assert border_seen >= 2


def test_deterministic():
    a, b = _case(3), _case(3)
    np.testing.assert_array_equal(a["imgs"], b["imgs"])
    np.testing.assert_array_equal(a["gts"], b["gts"])
    assert not np.array_equal(_case(4)["imgs"], a["imgs"])


def test_box_rule_by_hand():
    mask = np.zeros((10, 512, 256), dtype=bool)
    mask[2:7, 100:200, 50:60] = True
    mask[7, 300, 30] = True  # an outlier slice: part of the z range, not of the mid slice
    seen = set()
    for seed in range(40):
        b = box_for_mask(mask, np.random.default_rng(seed))
        assert (b["z_min"], b["z_max"]) == (2, 7)
        # z_mid = z of the middle voxel in C order (here slice 4 of the slab 2..6)
        assert b["z_mid"] == int(np.nonzero(mask)[0][mask.sum() // 2]) == 4
        sy, sx = 100 - b["z_mid_y_min"], 50 - b["z_mid_x_min"]
        s = sx  # W = 256: x shift = s; H = 512: y shift = 2 s
        assert 0 <= s <= 5 and sy == 2 * s
        assert b["z_mid_y_max"] == 199 + 2 * s and b["z_mid_x_max"] == 59 + s
        seen.add(s)
    assert seen == set(range(6))
    # clipped at the image border
    edge = np.zeros((4, 256, 256), dtype=bool)
    edge[1:3, 0:10, 250:256] = True
    for seed in range(10):
        b = box_for_mask(edge, np.random.default_rng(seed))
        assert b["z_mid_y_min"] == 0 and b["z_mid_x_max"] == 255


def test_boxes_consistent_with_gts():
    c = _case(1)
    gts = c["gts"]
    boxes = boxes_for_gts(gts, np.random.default_rng(0))
    assert len(boxes) == gts.max()
    H, W = gts.shape[1:]
    jy, jx = int(5 * H / 256), int(5 * W / 256)
    for k, b in enumerate(boxes, start=1):
        m = gts == k
        z = np.nonzero(m)[0]
        assert (b["z_min"], b["z_max"]) == (z.min(), z.max())
        assert m[b["z_mid"]].any()
        ys, xs = np.nonzero(m[b["z_mid"]])
        assert 0 <= ys.min() - b["z_mid_y_min"] <= jy and 0 <= b["z_mid_y_max"] - ys.max() <= jy
        assert 0 <= xs.min() - b["z_mid_x_min"] <= jx and 0 <= b["z_mid_x_max"] - xs.max() <= jx
        assert all(isinstance(v, int) for v in b.values())


def test_layouts_on_disk(tmp_path):
    import infer.npz as io
    names = write_dataset(tmp_path / "tr", 2, seed=5, layout="train", shape=SHAPE)
    for n in names:
        with np.load(tmp_path / "tr" / n, allow_pickle=False) as z:
            assert set(z.files) == {"imgs", "gts", "spacing"}
            assert z["imgs"].dtype == np.uint8 and z["spacing"].shape == (3,)
    names = write_dataset(tmp_path / "va", 3, seed=5, layout="val", shape=SHAPE, no_box_every=3)
    for i, n in enumerate(names):
        img_path, gt_path = tmp_path / "va" / "images" / n, tmp_path / "va" / "gts" / n
        with np.load(gt_path, allow_pickle=False) as z:
            assert set(z.files) == {"gts", "spacing"}
            gts = z["gts"]
        case = io.read_case(img_path)
        assert case["imgs"].shape == gts.shape
        if i == 2:
            assert case["boxes"] is None  # the no-box case
        else:
            assert len(case["boxes"]) == gts.max()
            for k, b in enumerate(case["boxes"], start=1):
                assert (gts[b["z_mid"]] == k).any()
                z = np.nonzero(gts == k)[0]
                assert (b["z_min"], b["z_max"]) == (z.min(), z.max())
    # the same seed gives the same files
    again = write_dataset(tmp_path / "tr2", 2, seed=5, layout="train", shape=SHAPE)
    for n in again:
        with np.load(tmp_path / "tr" / n) as a, np.load(tmp_path / "tr2" / n) as b:
            np.testing.assert_array_equal(a["imgs"], b["imgs"])


def test_cli(tmp_path):
    assert synthetic.main(["--out", str(tmp_path), "--n", "1", "--seed", "2",
                           "--shape", "16", "48", "48"]) == 0
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as z:
        assert z["imgs"].shape == (16, 48, 48)


def test_sample_inputs_are_what_the_generator_writes(tmp_path):
    import infer.npz as io
    from pathlib import Path
    from scripts import make_sample_inputs as msi
    committed = Path(__file__).resolve().parents[1] / "sample_inputs"
    msi.make(tmp_path)
    for name in msi.NAMES:
        a, b = io.read_case(committed / name), io.read_case(tmp_path / name)
        for key in ("imgs", "prev_pred"):
            if a[key] is None:
                assert b[key] is None
            else:
                np.testing.assert_array_equal(a[key], b[key])
        assert a["boxes"] == b["boxes"] and a["clicks"] == b["clicks"]
        assert a["clicks_order"] == b["clicks_order"]
        with np.load(committed / "gts" / name, allow_pickle=False) as z:
            assert z["gts"].shape == a["imgs"].shape and a["imgs"].shape == msi.SHAPE
        with np.load(committed / name, allow_pickle=False) as z:
            assert "gts" not in z.files  # ground truth is kept apart
    box, clicks, nobox = (io.read_case(committed / n) for n in msi.NAMES)
    assert box["boxes"] is not None and box["clicks"] is None and box["prev_pred"] is None
    assert clicks["boxes"] is not None and clicks["prev_pred"] is not None
    assert any(order[-1] is None for order in clicks["clicks_order"])  # a class already perfect
    with np.load(committed / "gts" / msi.NAMES[1], allow_pickle=False) as z:
        gts = z["gts"]
    for k, order in enumerate(clicks["clicks_order"], start=1):
        if order[-1] is None:
            np.testing.assert_array_equal(clicks["prev_pred"] == k, gts == k)
    assert nobox["boxes"] is None and nobox["clicks"] is not None
    assert not nobox["prev_pred"].any()
