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


def _fake_scan(tmp_path):
    """A (x, y, z) = (20, 18, 16) CT whose label map holds every evaluation structure as one small
    block (label values as in STRUCTURES), in a row along x, y and z."""
    lab = np.zeros((20, 18, 16), np.uint8)
    for i, name in enumerate(realct.structures("eval")):
        x, y, z = 2 + (i % 5) * 3, 2 + (i // 5) * 3, 2 + (i % 4) * 3
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
