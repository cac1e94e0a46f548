"""scripts/realct.py: the split by structure and the case builder. The unit tests make their own
small NIfTI files; the last test uses TotalSegmentator's example CT where it has been downloaded
(REALCT_DIR, default data/realct/) and skips otherwise."""
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from scripts import realct  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


def test_every_kind_keeps_at_least_a_third_for_evaluation_and_pairs_stay_together():
    total = Counter(k for _, k, _ in realct.STRUCTURES.values())
    held = Counter(k for _, k, s in realct.STRUCTURES.values() if s == "eval")
    assert set(total) == set(realct.KINDS)
    for kind in realct.KINDS:
        assert 3 * held[kind] >= total[kind], kind
    assert sum(held.values()) == 25 and len(realct.STRUCTURES) == 61
    for name, (_, _, split) in realct.STRUCTURES.items():
        for a, b in (("_left", "_right"), ("_right", "_left")):
            if a in name and name.replace(a, b) in realct.STRUCTURES:  # the lung's lobes differ per side
                assert realct.STRUCTURES[name.replace(a, b)][2] == split, name
    values = [v for v, _, _ in realct.STRUCTURES.values()]
    assert len(set(values)) == len(values)


def test_evaluation_cases_use_only_evaluation_structures_and_training_cases_only_training_ones():
    for _, members, _ in realct.plan("eval"):
        assert all(realct.STRUCTURES[m][2] == "eval" for m in members)
        assert 3 <= len(members) <= 5
    train = realct.plan("train")
    assert all(realct.STRUCTURES[m][2] == "train" for _, ms, _ in train for m in ms)
    assert sorted(m for _, ms, _ in train for m in ms) == sorted(realct.structures("train"))
    boxes = [b for _, _, b in realct.plan("eval")]
    assert boxes.count(True) == 8 and boxes.count(False) == 4
    # every kind appears in the evaluation cases
    assert {realct.STRUCTURES[m][1] for _, ms, _ in realct.plan("eval") for m in ms} == set(realct.KINDS)


def _fake_scan(tmp_path, split="eval"):
    """A (x, y, z) = (20, 18, 16) CT whose label map holds every structure of ``split`` as one small
    block (label values as in STRUCTURES), in a row along x, y and z."""
    lab = np.zeros((20, 18, 16), np.uint8)
    for i, name in enumerate(realct.structures(split)):
        x, y, z = 2 + (i % 6) * 3, 2 + (i // 6) * 3 % 15, 2 + (i % 4) * 3
        lab[x:x + 2, y:y + 2, z:z + 2] = realct.STRUCTURES[name][0]
    scan = np.where(lab > 0, 100, -50).astype(np.int16)
    nib.save(nib.Nifti1Image(scan, AFFINE), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(lab, AFFINE), str(tmp_path / "seg.nii.gz"))
    return lab


def test_build_writes_each_evaluation_case_with_its_classes_in_order(tmp_path):
    lab = _fake_scan(tmp_path)
    assert realct.main(["--scan", str(tmp_path / "ct.nii.gz"), "--labels", str(tmp_path / "seg.nii.gz"),
                        "--out", str(tmp_path / "out")]) == 0
    images = sorted(p.name for p in (tmp_path / "out" / "images").iterdir())
    assert images == sorted(f"CT_realct_{c}.npz" for c, _, _ in realct.EVAL_CASES)
    lab_zyx = lab.transpose(2, 1, 0)
    for case, members, boxes in realct.EVAL_CASES:
        with np.load(tmp_path / "out" / "images" / f"CT_realct_{case}.npz", allow_pickle=False) as f:
            assert ("boxes" in f.files) == boxes
            assert f["imgs"].shape == (16, 18, 20)
        with np.load(tmp_path / "out" / "gts" / f"CT_realct_{case}.npz", allow_pickle=False) as f:
            gts = f["gts"]
        for k, m in enumerate(members, start=1):
            np.testing.assert_array_equal(gts == k, lab_zyx == realct.STRUCTURES[m][0])
        assert int(gts.max()) == len(members)


def test_train_layout_only_for_the_training_split(tmp_path):
    _fake_scan(tmp_path)
    with pytest.raises(ValueError):
        realct.build(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "o", "eval", "train")


def _real_files():
    folder = Path(os.environ.get("REALCT_DIR", ROOT / "data" / "realct"))
    pairs = [("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
             ("ct_abdomen_pelvis_3mm.nii.gz", "ct_abdomen_pelvis_3mm_labels.nii.gz")]
    for scan, labels in pairs:
        if (folder / scan).is_file() and (folder / labels).is_file():
            return folder / scan, folder / labels
    pytest.skip(f"TotalSegmentator's example CT is not in {folder} (REALCT_DIR)")


def _touch(a, b):
    """6-neighbour contact by shifting ``a`` one voxel along each axis (no wrap-around)."""
    for axis in range(3):
        for lo, hi in ((slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None))):
            sa, sb = [slice(None)] * 3, [slice(None)] * 3
            sa[axis], sb[axis] = lo, hi
            if (a[tuple(sa)] & b[tuple(sb)]).any():
                return True
    return False


def test_the_real_ct_gives_every_case_its_structures_and_touching_classes(tmp_path):
    scan, labels = _real_files()
    realct.build(scan, labels, tmp_path / "out")
    touching = 0
    for case, members, _ in realct.EVAL_CASES:
        with np.load(tmp_path / "out" / "gts" / f"CT_realct_{case}.npz", allow_pickle=False) as f:
            gts = f["gts"]
        counts = np.bincount(gts.ravel(), minlength=len(members) + 1)
        assert (counts[1:] >= 60).all(), (case, counts)  # every class present, none tiny
        touching += any(_touch(gts == a, gts == b) for a in range(1, len(members) + 1)
                        for b in range(a + 1, len(members) + 1))
    assert touching >= 5  # vessels, spine, muscles and their no-box versions at least


def _block_volume():
    """A (z, y, x) = (12, 16, 20) scan at (3, 1.5, 1) mm: 0 HU, with a 100 HU block labelled 5 at
    z 2..5, y 4..11, x 6..15."""
    hu = np.zeros((12, 16, 20), np.float32)
    lab = np.zeros((12, 16, 20), np.uint8)
    hu[2:6, 4:12, 6:16] = 100.0
    lab[2:6, 4:12, 6:16] = 5
    affine = np.diag([1.0, 1.5, 3.0, 1.0])
    vol = {"array": hu, "spacing": (3.0, 1.5, 1.0), "affine": affine, "shape_xyz": (20, 16, 12)}
    return vol, dict(vol, array=lab)


def test_augment_keeps_the_physical_extent_the_labels_and_the_ranges():
    vol, lab = _block_volume()
    extent = np.asarray(vol["spacing"]) * np.asarray(vol["array"].shape)  # 36, 24, 20 mm
    block_mm3 = 4 * 3.0 * 8 * 1.5 * 10 * 1.0
    for seed in range(12):
        v, l, (level, width) = realct.augment(vol, lab, np.random.default_rng(seed))
        assert v["array"].shape == l["array"].shape
        assert set(np.unique(l["array"])) == {0, 5}
        # the physical extent is the same whatever the resampling and axis swap (y and x may swap)
        new_extent = np.asarray(v["spacing"]) * np.asarray(v["array"].shape)
        assert new_extent[0] == pytest.approx(extent[0])
        assert sorted(new_extent[1:]) == pytest.approx(sorted(extent[1:]))
        for n, o in zip(sorted(v["array"].shape[1:]), sorted(vol["array"].shape[1:])):
            assert 0.74 * o - 1 <= n <= 1.34 * o + 1
        # the labelled volume in mm^3 stays within a voxel layer of the block's 480 mm^3
        voxel = float(np.prod(v["spacing"]))
        assert abs(int((l["array"] == 5).sum()) * voxel - block_mm3) < 0.6 * block_mm3
        # inside the block the intensity is 100 HU scaled by 0.9..1.1, shifted by +-20, noised
        inside = v["array"][l["array"] == 5]
        assert 60 < float(np.median(inside)) < 140
        assert 10.0 <= level <= 70.0 and 300.0 <= width <= 500.0


def test_augmented_training_copies_start_with_the_scan_as_it_is(tmp_path):
    _fake_scan(tmp_path, "train")
    names = realct.build(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "o", "train",
                         "train", augment_n=3, seed=4)
    assert len(names) == 3 * len(realct.plan("train"))
    plain = realct.build(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "p", "train", "train")
    for name in plain:
        with np.load(tmp_path / "p" / name) as a, \
                np.load(tmp_path / "o" / name.replace(".npz", "_a000.npz")) as b:
            for key in ("imgs", "gts", "spacing"):
                np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError):
        realct.build(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "v", "train", "val", augment_n=2)
