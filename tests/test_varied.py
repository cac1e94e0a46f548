"""The varied training family (scripts/varied.py) produces what its knobs say, and the classic
family of scripts/synthetic.py is unchanged."""
import hashlib

import cc3d
import numpy as np
import pytest

from scripts import synthetic, varied
from scripts.varied import Knobs, case_plan, make_case, pad_mask, write_dataset
from scripts.varied_shapes import bezier_tree

SMALL = Knobs(shape=(32, 56, 56), size_jitter=0.1)


def _faces_touch(gts, a, b) -> bool:
    """Some voxel of class a and some voxel of class b share a face (6-neighbours), by shifts."""
    for ax in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        x, y = gts[tuple(lo)], gts[tuple(hi)]
        if (((x == a) & (y == b)) | ((x == b) & (y == a))).any():
            return True
    return False


def _principal_axis_mm(mask, spacing):
    pts = np.argwhere(mask) * np.asarray(spacing)
    pts = pts - pts.mean(0)
    w, v = np.linalg.eigh(pts.T @ pts)
    return v[:, -1]


def test_classic_family_unchanged(tmp_path):
    # sha256 of imgs, gts, spacing and boxes of seed 0, cases 0-1 at (16, 48, 48), computed with
    # scripts/synthetic.py as it was before the varied family existed
    h = hashlib.sha256()
    for i in range(2):
        c = synthetic.generate_case(np.random.default_rng([0, i]), shape=(16, 48, 48))
        for k in ("imgs", "gts", "spacing"):
            h.update(np.ascontiguousarray(c[k]).tobytes())
        h.update(repr(synthetic.boxes_for_gts(c["gts"], np.random.default_rng([0, i]))).encode())
    assert h.hexdigest() == "714892833e3241b8f48de15e34d1920a18f845d689b3dd8b13482e7374d5bce2"
    # the CLI's default family is the classic one and writes exactly generate_case's cases
    for family in ([], ["--family", "classic"]):
        out = tmp_path / str(len(family))
        assert synthetic.main(["--out", str(out), "--n", "2", "--seed", "4", "--shape", "16", "40", "40"]
                              + family) == 0
        for i in range(2):
            c = synthetic.generate_case(np.random.default_rng([4, i]), shape=(16, 40, 40))
            with np.load(out / synthetic.case_name(4, i), allow_pickle=False) as z:
                np.testing.assert_array_equal(z["imgs"], c["imgs"])
                np.testing.assert_array_equal(z["gts"], c["gts"])


def test_deterministic_per_seed_and_index(tmp_path):
    a, b = make_case(3, 11, SMALL), make_case(3, 11, SMALL)
    for k in ("imgs", "gts", "spacing"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(make_case(3, 12, SMALL)["spacing"], a["spacing"])
    # case i does not depend on how many cases are written
    n1 = write_dataset(tmp_path / "a", 2, seed=11, knobs=SMALL)
    n2 = write_dataset(tmp_path / "b", 4, seed=11, knobs=SMALL)
    assert n1 == n2[:2]
    with np.load(tmp_path / "a" / n1[1]) as x, np.load(tmp_path / "b" / n1[1]) as y:
        np.testing.assert_array_equal(x["imgs"], y["imgs"])
        np.testing.assert_array_equal(x["gts"], y["gts"])


def test_plan_covers_every_scenario_and_modality():
    k = Knobs()
    plans = {case_plan(i, k) for i in range(len(k.scenarios) * len(k.modalities))}
    assert plans == {(s, m) for s in k.scenarios for m in k.modalities}


def test_cases_valid_no_empty_class_spacing_in_range():
    knobs = Knobs(shape=(32, 56, 56), size_jitter=0.1, spacing_xy=(0.7, 0.9), max_anisotropy=2.5)
    for i in range(12):  # two rounds of scenarios: every scenario, CT and MR
        c = make_case(i, 5, knobs)
        gts, imgs, sp = c["gts"], c["imgs"], c["spacing"]
        assert imgs.dtype == np.uint8 and gts.dtype == np.uint8 and imgs.shape == gts.shape
        K = len(c["kinds"])
        assert K >= 1 and sorted(np.unique(gts).tolist()) == list(range(K + 1))
        assert np.bincount(gts.ravel())[1:].min() >= knobs.min_voxels
        assert sp[1] == sp[2] and 0.7 <= sp[1] <= 0.9 and sp[1] * 0.999 <= sp[0] <= 2.5 * sp[2] * 1.001
        assert imgs.std() > 5
    iso = make_case(0, 5, Knobs(shape=(32, 56, 56), max_anisotropy=1.0))
    assert iso["spacing"][0] == iso["spacing"][1]


def test_touching_classes_share_a_face():
    knobs = Knobs(shape=(32, 56, 56), scenarios=("touching",), modalities=("MR",), p_zero_border=0.0)
    lesions = 0
    for i in range(10):
        c = make_case(i, 2, knobs)
        kinds = c["kinds"]
        assert kinds[:2] == ["organ", "neighbour"]
        assert _faces_touch(c["gts"], 1, 2)
        if "lesion" in kinds:
            lesions += 1
            les = kinds.index("lesion") + 1
            assert _faces_touch(c["gts"], 1, les)
            # the lesion lies inside the organ: filling the organ's holes covers it
            from scipy import ndimage
            filled = ndimage.binary_fill_holes((c["gts"] == 1) | (c["gts"] == les))
            assert filled[c["gts"] == les].all()
    assert lesions >= 2


def test_nested_classes_touch_level_by_level():
    knobs = Knobs(shape=(32, 56, 56), scenarios=("nested",), modalities=("CT",), p_zero_border=0.0)
    seen = set()
    for i in range(12):
        c = make_case(i, 0, knobs)
        kinds, gts = c["kinds"], c["gts"]
        if kinds[:3] == ["edema", "rim", "core"]:
            seen.add("lesion")
            assert _faces_touch(gts, 1, 2) and _faces_touch(gts, 2, 3) and not _faces_touch(gts, 1, 3)
        elif kinds[:2] == ["wall", "lumen"]:
            seen.add("hollow")
            assert _faces_touch(gts, 1, 2)
    assert seen == {"lesion", "hollow"}


def test_large_object_exceeds_128_voxels():
    knobs = Knobs(shape=(32, 56, 56), scenarios=("large",), modalities=("CT",), p_zero_border=0.0)
    for i in range(2):
        c = make_case(i, 1, knobs)
        assert c["kinds"][0] == "large"
        _, y, x = np.nonzero(c["gts"] == 1)
        assert max(np.ptp(y), np.ptp(x)) + 1 > 128
        assert c["imgs"].shape[1:] == (160, 160)


def test_tree_primitive_branches():
    rng = np.random.default_rng(0)
    shape, spacing = (40, 64, 64), (2.0, 1.0, 1.0)
    mask, segs = bezier_tree(rng, shape, spacing, start=(40.0, 32.0, 4.0), direction=(0.0, 0.2, 1.0),
                             length_mm=56.0, radius_mm=2.0, depth=1, children=(2, 2))
    assert len(segs) == 3 and segs[1][2] == 0 and segs[2][2] == 0
    # every in-volume centre-line point lies in the mask
    for pts, _, _ in segs:
        idx = np.round(pts / spacing).astype(int)
        keep = np.all((idx >= 0) & (idx < shape), axis=1)
        assert mask[tuple(idx[keep].T)].all()
    # cutting a ball around a branch point splits the tree into >= 3 pieces (parent before and
    # after, child)
    p = segs[1][0][0]
    zz, yy, xx = np.ogrid[:shape[0], :shape[1], :shape[2]]
    ball = ((zz * 2.0 - p[0]) ** 2 + (yy - p[1]) ** 2 + (xx - p[2]) ** 2) <= (3 * 2.0) ** 2
    assert cc3d.connected_components((mask & ~ball).astype(np.uint8), connectivity=26).max() >= 3
    # thin: radius 2 mm tapering, so far fewer voxels than its bounding box
    assert mask.sum() < 0.1 * np.prod([np.ptp(v) + 1 for v in np.nonzero(mask)])


def test_trees_run_in_any_direction():
    knobs = Knobs(shape=(32, 56, 56), scenarios=("trees",), modalities=("CT",), p_zero_border=0.0)
    angles = []
    for i in range(6):
        c = make_case(i, 4, knobs)
        for k, kind in enumerate(c["kinds"], start=1):
            if kind == "tree":
                v = _principal_axis_mm(c["gts"] == k, c["spacing"])
                angles.append(np.degrees(np.arccos(min(1.0, abs(v[0])))))
    assert len(angles) >= 6
    # the classic tubes run within ~30 degrees of z; these are spread over all directions
    assert sum(a > 45 for a in angles) >= len(angles) // 3


def test_zero_borders_are_zero():
    knobs = Knobs(shape=(32, 56, 56), modalities=("CT", "US"), p_zero_border=1.0)
    seen = set()
    for i in (0, 1, 6, 7):
        c = make_case(i, 6, knobs)
        seen.add(c["modality"])
        zero, imgs, gts = c["zero"], c["imgs"], c["gts"]
        assert zero is not None and zero.any() and not zero.all()
        assert (imgs[zero] == 0).all() and (gts[zero] == 0).all()
        faces = [imgs[:, 0], imgs[:, -1], imgs[:, :, 0], imgs[:, :, -1]]
        assert any((f == 0).all() for f in faces)  # at least one y / x face is a zero band
    assert seen == {"CT", "US"}
    # the band mask by hand
    m = pad_mask((2, 10, 8), {(1, 0): 3, (2, 1): 2})
    assert m[:, :3].all() and m[:, :, 6:].all() and not m[:, 3:, :6].any()


def test_us_cases_have_a_fan_of_view():
    c = make_case(3, 0, Knobs(shape=(32, 56, 56), modalities=("US",), p_zero_border=0.0))
    zero, imgs = c["zero"], c["imgs"]
    assert c["modality"] == "US" and zero is not None
    # the fan is the same in every slice, widens with depth (y) and its speckle is not flat
    assert (zero == zero[:1]).all()
    inside = ~zero[0]
    widths = inside.sum(axis=1)
    assert widths[:len(widths) // 3].mean() < widths[len(widths) // 3: 2 * len(widths) // 3].mean()
    assert imgs[~zero].std() > 10


def _contrast(c):
    """Mean absolute difference between each class and a 2-voxel ring around it."""
    from scipy import ndimage
    out = []
    for k in range(1, int(c["gts"].max()) + 1):
        m = c["gts"] == k
        ring = ndimage.binary_dilation(m, iterations=2) & ~m & (c["gts"] == 0)
        out.append(abs(float(c["imgs"][m].mean()) - float(c["imgs"][ring].mean())))
    return np.mean(out)


def test_low_contrast_and_noise_knobs():
    base = dict(shape=(32, 56, 56), scenarios=("organs",), modalities=("MR",), p_zero_border=0.0)
    normal = make_case(0, 9, Knobs(**base, p_low_contrast=0.0))
    low = make_case(0, 9, Knobs(**base, p_low_contrast=1.0, low_contrast=0.2))
    np.testing.assert_array_equal(normal["gts"], low["gts"])  # same geometry, other contrast
    assert low["low_contrast"] and not normal["low_contrast"]
    assert _contrast(low) < 0.5 * _contrast(normal)
    quiet = make_case(0, 9, Knobs(**base, p_low_contrast=0.0, noise=0.2))
    loud = make_case(0, 9, Knobs(**base, p_low_contrast=0.0, noise=3.0))

    def grain(img):  # voxel-to-voxel differences along x
        return float(np.abs(np.diff(img.astype(np.float32), axis=2)).mean())
    assert grain(loud["imgs"]) > 2 * grain(quiet["imgs"])


@pytest.mark.parametrize("modality", ["CT", "MR", "PET", "US", "Microscopy"])
def test_every_modality_shows_its_classes(modality):
    c = make_case(0, 8, Knobs(shape=(32, 56, 56), scenarios=("organs",), modalities=(modality,),
                              p_zero_border=0.0, p_low_contrast=0.0))
    assert c["modality"] == modality and c["imgs"].std() > 5
    assert _contrast(c) > 5


def test_pet_is_blurred():
    from scipy import ndimage

    def high_freq(c):  # share of the image's variation finer than a 1-voxel Gaussian
        im = c["imgs"].astype(np.float32)
        return float((im - ndimage.gaussian_filter(im, 1.0)).std() / im.std())
    for seed in (8, 10):
        base = dict(shape=(32, 56, 56), scenarios=("organs",), p_zero_border=0.0,
                    p_low_contrast=0.0, noise=0.05)
        pet = make_case(0, seed, Knobs(**base, modalities=("PET",)))
        ct = make_case(0, seed, Knobs(**base, modalities=("CT",)))
        np.testing.assert_array_equal(pet["gts"], ct["gts"])  # same labels, other imaging
        assert high_freq(pet) < 0.7 * high_freq(ct)


def test_val_layout_boxes_follow_the_organizer_rule(tmp_path):
    import infer.npz as io
    from evaluation.clicks import next_click
    names = write_dataset(tmp_path, 4, seed=3, layout="val", knobs=SMALL, no_box_every=4)
    for i, n in enumerate(names):
        case = io.read_case(tmp_path / "images" / n)
        with np.load(tmp_path / "gts" / n, allow_pickle=False) as z:
            gts = z["gts"]
        H, W = gts.shape[1:]
        if i == 3:
            assert case["boxes"] is None
            continue
        assert len(case["boxes"]) == gts.max()
        for k, b in enumerate(case["boxes"], start=1):
            z, y, x = np.where(gts == k)  # organizer: full z extent, z of the middle voxel
            assert (b["z_min"], b["z_max"], b["z_mid"]) == (z.min(), z.max(), z[len(z) // 2])
            ys, xs = np.where(gts[b["z_mid"]] == k)
            for lo, hi, v, size in ((b["z_mid_y_min"], b["z_mid_y_max"], ys, H),
                                    (b["z_mid_x_min"], b["z_mid_x_max"], xs, W)):
                j = int(5 * size / 256)
                assert max(0, v.min() - j) <= lo <= v.min() and v.max() <= hi <= min(size - 1, v.max() + j)
            # the first click of a no-box case (empty prediction) is a foreground voxel of the class
            c = next_click(np.zeros(gts.shape, bool), gts == k)
            assert c.kind == "fg" and gts[c.zyx] == k


def test_cli_family_switch_and_knobs(tmp_path):
    assert synthetic.main(["--family", "varied", "--out", str(tmp_path), "--n", "2", "--seed", "1",
                           "--shape", "24", "48", "48", "--modalities", "PET", "--noise", "0.5",
                           "--p-zero-border", "0"]) == 0
    knobs = Knobs(shape=(24, 48, 48), modalities=("PET",), noise=0.5, p_zero_border=0.0)
    for i in range(2):
        name = varied.case_name(1, i, knobs)
        assert name.startswith("PET_varied_")
        with np.load(tmp_path / name, allow_pickle=False) as z:
            assert set(z.files) == {"imgs", "gts", "spacing"}
            np.testing.assert_array_equal(z["gts"], make_case(i, 1, knobs)["gts"])
    from train.data import load_folder
    assert all(c.labels for c in load_folder(tmp_path))  # what `python -m train --data` reads
    with pytest.raises(SystemExit):  # a varied knob with the classic family
        synthetic.main(["--out", str(tmp_path / "x"), "--noise", "2"])
    with pytest.raises(SystemExit):  # a knob out of range
        synthetic.main(["--family", "varied", "--out", str(tmp_path / "x"), "--max-anisotropy", "0.5"])


@pytest.mark.usefixtures("one_thread")
def test_training_examples_from_varied_cases():
    """train.simulate builds examples from these cases (organizer's box or first click, then a
    second, simulated click on the network's prediction) for every scenario."""
    import torch
    from train import __main__ as cli
    from train.simulate import SimModel, simulate_example
    net, card = cli.build_model("scratch", "tiny", 0, "3d", True, "test")
    model = SimModel.of(net.eval(), card, torch.device("cpu"))
    for i in range(len(SMALL.scenarios)):
        c = make_case(i, 13, SMALL)
        gt = c["gts"] == len(c["kinds"])  # the last class (a lesion, core, lumen, ... if any)
        rng = np.random.default_rng(i)
        ex = simulate_example(model, c["imgs"], gt, rng, p_box=0.5, p_second=1.0)
        assert tuple(ex.x.shape[1:]) == tuple(card.patch_size) == tuple(ex.target.shape)
        assert torch.isfinite(ex.x).all() and set(torch.unique(ex.target).tolist()) <= {0.0, 1.0}
        if ex.first == "click":
            assert gt[ex.prompts.clicks[0][1]]  # the first click is a voxel of the class
        if ex.click is not None:  # the simulated click: foreground where the truth says so
            assert ex.click.kind == ("fg" if gt[ex.click.zyx] else "bg")
