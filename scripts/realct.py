"""Real-CT cases from TotalSegmentator's example CT, with a split by structure.

    python -m scripts.realct --scan CT.nii.gz --labels SEG.nii.gz --out DIR [--split eval|train|all]
                             [--layout val|train] [--window 40,400] [--label-names NAMES.json]

Source: the test data of the TotalSegmentator repository (github.com/wasserth/TotalSegmentator,
``tests/reference_files/example_ct.nii.gz`` and its label map
``example_seg_fast_force_split.nii.gz``; Apache-2.0 licence): an abdominal-pelvic CT of 122 x 101 x
112 voxels at 3 mm with 61 structures labelled by TotalSegmentator (a strong automatic model, not
manual annotation). The label values are TotalSegmentator's ``total`` task numbers, written in
:data:`STRUCTURES`; ``--label-names`` (JSON ``{"value": "name"}`` or ``{"value": {"name": ...}}``)
replaces them for a label map numbered otherwise.

The split is by structure, fixed here: every structure has a kind (``large_organ``,
``small_organ``, ``lung``, ``vessel``, ``bone``, ``muscle``) and is either ``eval`` (kept for
evaluation only: no training run may use it) or ``train``. At least a third of every kind is
``eval``; both sides of a left/right pair are on the same side of the split, so a model cannot
learn an evaluation structure from its mirror image. Evaluation structures (25 of 61):

- large organs: spleen, kidney_left, kidney_right;
- small organs: gallbladder, adrenal_gland_left, adrenal_gland_right;
- lung: lung_lower_lobe_left, lung_lower_lobe_right (the lung is cut by the field of view);
- vessels: iliac_artery_left/right, iliac_vena_left/right (thin, touching each other);
- bones: vertebrae_L2, L3, L4 (a touching chain), femur_left/right, rib_left/right_9 and _10;
- muscles: gluteus_medius_left/right, gluteus_minimus_left/right (touching each other).

Cases (``--split eval``: :data:`EVAL_CASES`): the whole scan, 3-5 classes each, grouped by kind
(large organs, small organs, vessels, spine, muscles, thin bones, lung and ribs, one of each kind),
8 with the organizer's boxes and 4 without (no-box versions of large organs, small organs, vessels
and spine). ``--split train``: the training structures, grouped by kind 4 at a time (every other
case without boxes). Classes are numbered 1..K in the order listed; each case's
``meta/<name>.json`` names them and their label values.

Layouts: ``--layout val`` (default): ``DIR/images``, ``DIR/gts``, ``DIR/meta`` as
``scripts.nifti to-case`` writes them (for ``python -m evaluation --images DIR/images --gts
DIR/gts``); ``--layout train``: ``DIR/<name>.npz`` with ``imgs``, ``gts``, ``spacing`` (for
``python -m train --data DIR``; only with ``--split train``).

Augmented training copies (``--augment N --seed S``, train layout only): N variants of the scan,
each with every training case, made by :func:`augment` from the scan in Hounsfield units before
the window: resampled to other voxel spacings, flipped and with y and x swapped (orientation),
intensity scaled, shifted and noised, then put through a window jittered around ``--window`` as
the converter makes it. Variant 0 is the scan as it is.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from scripts import nifti

# name: (TotalSegmentator "total" label value, kind, split)
STRUCTURES: Dict[str, Tuple[int, str, str]] = {
    "spleen": (1, "large_organ", "eval"),
    "kidney_right": (2, "large_organ", "eval"),
    "kidney_left": (3, "large_organ", "eval"),
    "gallbladder": (4, "small_organ", "eval"),
    "liver": (5, "large_organ", "train"),
    "stomach": (6, "large_organ", "train"),
    "pancreas": (7, "small_organ", "train"),
    "adrenal_gland_right": (8, "small_organ", "eval"),
    "adrenal_gland_left": (9, "small_organ", "eval"),
    "lung_upper_lobe_left": (10, "lung", "train"),
    "lung_lower_lobe_left": (11, "lung", "eval"),
    "lung_lower_lobe_right": (14, "lung", "eval"),
    "small_bowel": (18, "large_organ", "train"),
    "duodenum": (19, "small_organ", "train"),
    "colon": (20, "large_organ", "train"),
    "urinary_bladder": (21, "large_organ", "train"),
    "prostate": (22, "small_organ", "train"),
    "sacrum": (25, "bone", "train"),
    "vertebrae_S1": (26, "bone", "train"),
    "vertebrae_L5": (27, "bone", "train"),
    "vertebrae_L4": (28, "bone", "eval"),
    "vertebrae_L3": (29, "bone", "eval"),
    "vertebrae_L2": (30, "bone", "eval"),
    "vertebrae_L1": (31, "bone", "train"),
    "vertebrae_T12": (32, "bone", "train"),
    "vertebrae_T11": (33, "bone", "train"),
    "aorta": (52, "vessel", "train"),
    "inferior_vena_cava": (63, "vessel", "train"),
    "portal_vein_and_splenic_vein": (64, "vessel", "train"),
    "iliac_artery_left": (65, "vessel", "eval"),
    "iliac_artery_right": (66, "vessel", "eval"),
    "iliac_vena_left": (67, "vessel", "eval"),
    "iliac_vena_right": (68, "vessel", "eval"),
    "femur_left": (75, "bone", "eval"),
    "femur_right": (76, "bone", "eval"),
    "hip_left": (77, "bone", "train"),
    "hip_right": (78, "bone", "train"),
    "spinal_cord": (79, "vessel", "train"),  # thin and tubular: with the vessels
    "gluteus_maximus_left": (80, "muscle", "train"),
    "gluteus_maximus_right": (81, "muscle", "train"),
    "gluteus_medius_left": (82, "muscle", "eval"),
    "gluteus_medius_right": (83, "muscle", "eval"),
    "gluteus_minimus_left": (84, "muscle", "eval"),
    "gluteus_minimus_right": (85, "muscle", "eval"),
    "autochthon_left": (86, "muscle", "train"),
    "autochthon_right": (87, "muscle", "train"),
    "iliopsoas_left": (88, "muscle", "train"),
    "iliopsoas_right": (89, "muscle", "train"),
    "rib_left_7": (98, "bone", "train"),
    "rib_left_8": (99, "bone", "train"),
    "rib_left_9": (100, "bone", "eval"),
    "rib_left_10": (101, "bone", "eval"),
    "rib_left_11": (102, "bone", "train"),
    "rib_left_12": (103, "bone", "train"),
    "rib_right_7": (110, "bone", "train"),
    "rib_right_8": (111, "bone", "train"),
    "rib_right_9": (112, "bone", "eval"),
    "rib_right_10": (113, "bone", "eval"),
    "rib_right_11": (114, "bone", "train"),
    "rib_right_12": (115, "bone", "train"),
    "costal_cartilages": (117, "bone", "train"),
}
KINDS = ("large_organ", "small_organ", "lung", "vessel", "bone", "muscle")

_LARGE = ["kidney_right", "kidney_left", "spleen"]
_SMALL = ["gallbladder", "adrenal_gland_right", "adrenal_gland_left"]
_VESSELS = ["iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right"]
_SPINE = ["vertebrae_L2", "vertebrae_L3", "vertebrae_L4"]
# (case name, structures in class order, with boxes)
EVAL_CASES: List[Tuple[str, List[str], bool]] = [
    ("large_organs", _LARGE, True),
    ("small_organs", _SMALL, True),
    ("vessels", _VESSELS, True),
    ("spine", _SPINE, True),
    ("muscles", ["gluteus_medius_left", "gluteus_minimus_left", "gluteus_medius_right", "gluteus_minimus_right"], True),
    ("thin_bones", ["femur_left", "femur_right", "rib_left_9", "rib_right_9"], True),
    ("lung_ribs", ["lung_lower_lobe_left", "lung_lower_lobe_right", "rib_left_10", "rib_right_10"], True),
    ("mixed", ["kidney_left", "gallbladder", "iliac_artery_left", "vertebrae_L3", "gluteus_medius_left"], True),
    ("large_organs_nobox", _LARGE, False),
    ("small_organs_nobox", _SMALL, False),
    ("vessels_nobox", _VESSELS, False),
    ("spine_nobox", _SPINE, False),
]


def structures(split: str, kind: str = None) -> List[str]:
    """Names of the structures of ``split`` ("eval" or "train"), of one ``kind`` or all, in
    label-value order."""
    return [n for n, (_, k, s) in sorted(STRUCTURES.items(), key=lambda i: i[1][0])
            if s == split and (kind is None or k == kind)]


def train_cases(per_case: int = 4) -> List[Tuple[str, List[str], bool]]:
    """The training structures grouped by kind, ``per_case`` at a time; every other case without
    boxes."""
    cases = []
    for kind in KINDS:
        names = structures("train", kind)
        for i in range(0, len(names), per_case):
            cases.append((f"train_{kind}_{i // per_case}", names[i:i + per_case], len(cases) % 2 == 0))
    return cases


def plan(split: str) -> List[Tuple[str, List[str], bool]]:
    """(case name, structures, with boxes) of ``split``: "eval", "train" or "all"."""
    if split == "eval":
        return list(EVAL_CASES)
    if split == "train":
        return train_cases()
    if split == "all":
        return list(EVAL_CASES) + train_cases()
    raise ValueError(f"split is eval, train or all, not {split!r}")


# augmentation ranges (training copies only): per-axis spacing factor, HU scale and shift, noise
# standard deviation in HU, window level and width jitter
SPACING_FACTOR = (0.75, 1.33)
HU_SCALE, HU_SHIFT, HU_NOISE = (0.9, 1.1), (-20.0, 20.0), (0.0, 15.0)
LEVEL_JITTER, WIDTH_FACTOR = (-30.0, 30.0), (0.75, 1.25)


def _resample(array: np.ndarray, shape: Tuple[int, ...], order: int) -> np.ndarray:
    from scipy.ndimage import zoom
    factors = [n / s for n, s in zip(shape, array.shape)]
    return zoom(array, factors, order=order, mode="nearest", grid_mode=True)


def augment(vol: dict, lab: dict, rng: np.random.Generator,
            window: Tuple[float, float] = nifti.DEFAULT_WINDOW) -> Tuple[dict, dict, Tuple[float, float]]:
    """One augmented copy of a scan in HU and its label map (:func:`scripts.nifti.read_nifti`
    dicts, same grid) and the window to convert it with: each axis resampled by a factor in
    :data:`SPACING_FACTOR` (the spacing divided by it; labels by nearest neighbour), each axis
    flipped with probability 1/2, y and x swapped with probability 1/2, HU scaled, shifted and
    noised, the window's level shifted and width scaled. The affine is kept (training copies are
    never written back onto the scan's grid)."""
    hu, labels = vol["array"].astype(np.float32), lab["array"]
    spacing = np.asarray(vol["spacing"], np.float64)
    factor = np.exp(rng.uniform(*np.log(SPACING_FACTOR), size=3))
    shape = tuple(max(8, int(round(n * f))) for n, f in zip(hu.shape, factor))
    spacing = spacing * np.asarray(hu.shape) / np.asarray(shape)
    hu, labels = _resample(hu, shape, 1), _resample(labels, shape, 0)
    for axis in range(3):
        if rng.random() < 0.5:
            hu, labels = np.flip(hu, axis), np.flip(labels, axis)
    if rng.random() < 0.5:
        hu, labels = hu.transpose(0, 2, 1), labels.transpose(0, 2, 1)
        spacing = spacing[[0, 2, 1]]
    hu = hu * rng.uniform(*HU_SCALE) + rng.uniform(*HU_SHIFT)
    hu = hu + rng.normal(0.0, rng.uniform(*HU_NOISE), hu.shape).astype(np.float32)
    level, width = window
    window = (level + rng.uniform(*LEVEL_JITTER), width * rng.uniform(*WIDTH_FACTOR))
    new_vol = dict(vol, array=np.ascontiguousarray(hu), spacing=tuple(float(s) for s in spacing))
    new_lab = dict(lab, array=np.ascontiguousarray(labels))
    return new_vol, new_lab, window


def build(scan, labels, out, split: str = "eval", layout: str = "val",
          window: Tuple[float, float] = nifti.DEFAULT_WINDOW, names: Dict[int, str] = None,
          augment_n: int = 0, seed: int = 0) -> List[str]:
    """Write the cases of ``split`` to ``out``; returns their file names. ``scan``/``labels``:
    NIfTI paths; ``names``: label value -> name (default: :data:`STRUCTURES`); ``augment_n`` > 0
    (train layout only): that many variants of every case (:func:`augment`, generator seeded with
    ``seed``), named ``..._aNNN``, variant 0 unchanged."""
    if layout not in ("val", "train"):
        raise ValueError(f"layout is val or train, not {layout!r}")
    if layout == "train" and split != "train":
        raise ValueError("--layout train holds ground truth beside the image: only for --split train")
    if augment_n and layout != "train":
        raise ValueError("--augment makes training copies: only with --layout train")
    names = names or {v: n for n, (v, _, _) in STRUCTURES.items()}
    vol = nifti.read_nifti(scan)
    lab = nifti.read_nifti(labels, labels=True)
    rng = np.random.default_rng(seed)
    written = []
    for variant in range(max(1, augment_n)):
        v_vol, v_lab, v_window = (vol, lab, window) if variant == 0 else augment(vol, lab, rng, window)
        suffix = f"_a{variant:03d}" if augment_n else ""
        for i, (case, members, boxes) in enumerate(plan(split)):
            c = nifti.scan_to_case(v_vol, v_lab, names, members, "CT", v_window, boxes=boxes, seed=i)
            c["meta"]["source"] = str(scan)
            c["meta"]["split"] = "eval" if case in {e[0] for e in EVAL_CASES} else "train"
            c["meta"]["kinds"] = [STRUCTURES[m][1] for m in members]
            name = f"CT_realct_{case}{suffix}"
            if layout == "val":
                nifti.write_case(out, name, c)
            else:
                from scripts.synthetic import _atomic_savez
                _atomic_savez(Path(out) / f"{name}.npz", imgs=c["image"]["imgs"], gts=c["gts"]["gts"],
                              spacing=c["image"]["spacing"])
            written.append(f"{name}.npz")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.realct", description=__doc__.split("\n\n")[0],
                                epilog="The split, the cases and the source: see scripts/realct.py and "
                                       "docs/EVALUATION.md (real-CT evaluation set).")
    p.add_argument("--scan", required=True, type=Path, help="the CT (TotalSegmentator's example_ct.nii.gz)")
    p.add_argument("--labels", required=True, type=Path,
                   help="its label map (TotalSegmentator's example_seg_fast_force_split.nii.gz)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--split", default="eval", choices=("eval", "train", "all"),
                   help="which structures' cases (default eval: the evaluation-only structures)")
    p.add_argument("--layout", default="val", choices=("val", "train"),
                   help="val: images/, gts/, meta/ (default); train: one npz per case with gts (--split train only)")
    p.add_argument("--window", default="40,400", help="CT window LEVEL,WIDTH in HU (default 40,400)")
    p.add_argument("--augment", type=int, default=0, metavar="N",
                   help="training copies: N variants of every case (resampled, flipped, intensity "
                        "and window jittered; variant 0 as it is); --layout train only")
    p.add_argument("--seed", type=int, default=0, help="seed of the augmentation")
    p.add_argument("--label-names", type=Path, help="JSON label value -> name, for a label map numbered "
                                                    "otherwise than TotalSegmentator's total task")
    a = p.parse_args(argv)
    try:
        names = None
        if a.label_names:
            names = nifti.read_label_names(a.label_names)
        written = build(a.scan, a.labels, a.out, a.split, a.layout, nifti.parse_window(a.window), names,
                        a.augment, a.seed)
    except (ValueError, OSError, KeyError) as exc:
        p.error(str(exc))
    print(f"wrote {len(written)} {a.split} cases to {a.out} ({a.layout} layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
