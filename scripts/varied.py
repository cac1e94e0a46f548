"""The varied training family: synthetic cases closer to what CT, MR, PET, US and microscopy show.

A second family beside the classic one of ``scripts/synthetic.py`` (chosen there with
``--family varied``), for training only; it shares nothing with the held-out evaluation family
(``scripts/heldout.py``) but the organizer's box rule and the file writer. Shapes are in
``scripts/varied_shapes.py``, intensity models in ``scripts/varied_modalities.py``.

Scenarios (one per case, cycling through ``Knobs.scenarios``; case ``i`` is imaged with modality
``(i % S + i // S) % M`` of ``Knobs.modalities`` (S scenarios, M modalities), so that consecutive
cases change modality and any S x M consecutive rounds pair every scenario with every modality):

- ``organs``: 2-4 deformed organs (metaball chains, warped by a smooth random field) and 1-2
  unlabelled look-alikes;
- ``touching``: an organ, a neighbour sharing a boundary with it (sometimes a third one), and
  sometimes a lesion inside the first one, all separate classes;
- ``nested``: a hollow organ (wall and lumen, two touching classes, from two levels of one field)
  or a lesion with a rim and a core (three nested classes), and an organ;
- ``large``: an organ longer than ``Knobs.large_extent`` voxels in-plane (beyond a 32^3 patch at
  zoom 4) in a ``large_size``-wide volume, and a small organ;
- ``trees``: 1-2 thin branching curved structures (Bezier segments, any direction) and an organ;
- ``mixed``: 3-4 classes from all of the above.

Every case also draws an anisotropic spacing (in-plane ``spacing_xy`` mm, z 1x..``max_anisotropy``
x that), a size jitter of the volume, a low-contrast version with probability ``p_low_contrast``,
and a zero border with probability ``p_zero_border`` (zero-padded bands on y / x sides; labels
are cut there; US cases always have a fan-shaped field of view with zeros outside). Classes left
with fewer than ``min_voxels`` voxels are dropped and the labels renumbered 1..K.

Deterministic in (seed, index, knobs). Written in the classic family's layouts (training:
``OUT/<name>.npz`` with ``imgs``, ``gts``, ``spacing``; validation: ``images/`` with boxes by the
organizer's rule, and ``gts/``), named ``<modality>_varied_<scenario>_s<seed>_<index>.npz``.

    python -m scripts.synthetic --family varied --out DIR --n 500 --seed 1 [knob flags]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Tuple

import numpy as np
from scipy import ndimage

from scripts import varied_modalities as vm
from scripts import varied_shapes as vs
from evaluation.boxes import boxes_for_gts
from scripts.synth_base import _atomic_savez, _grid_mm, _object_array

SCENARIOS = ("organs", "touching", "nested", "large", "trees", "mixed")
STREAM = 0x7A31  # mixed into every seed: streams apart from the other families


@dataclass(frozen=True)
class Knobs:
    """Named knobs of the varied family (defaults: the training set of docs/TRAINING.md)."""
    scenarios: Tuple[str, ...] = SCENARIOS
    modalities: Tuple[str, ...] = vm.MODALITIES
    shape: Tuple[int, int, int] = (64, 96, 96)  # (D, H, W) before the size jitter
    size_jitter: float = 0.25  # each axis x U(1 - j, 1 + j)
    large_size: int = 160  # in-plane size of "large" volumes (voxels)
    large_extent: int = 128  # a large organ spans more voxels than this along y or x
    spacing_xy: Tuple[float, float] = (0.5, 1.5)  # in-plane spacing range, mm
    max_anisotropy: float = 4.0  # z spacing up to this x the in-plane spacing (1 = isotropic)
    deform: float = 1.0  # amplitude of the smooth random deformation (x 3-8 mm)
    noise: float = 1.0  # noise level multiplier
    p_low_contrast: float = 0.2  # probability of a low-contrast case
    low_contrast: float = 0.3  # object contrast multiplier in low-contrast cases
    p_zero_border: float = 0.25  # probability of zero-padded bands
    min_voxels: int = 60  # every class keeps at least this many voxels

    def __post_init__(self):
        bad = [s for s in self.scenarios if s not in SCENARIOS]
        bad += [m for m in self.modalities if m not in vm.MODALITIES]
        if bad or not self.scenarios or not self.modalities:
            raise ValueError(f"unknown or no scenarios / modalities: {bad}")
        if self.max_anisotropy < 1.0 or self.large_size <= self.large_extent:
            raise ValueError("max_anisotropy must be >= 1 and large_size > large_extent")


def case_plan(i: int, knobs: Knobs) -> Tuple[str, str]:
    """(scenario, modality) of case ``i``."""
    s, m = knobs.scenarios, knobs.modalities
    return s[i % len(s)], m[(i % len(s) + i // len(s)) % len(m)]


def case_name(seed: int, i: int, knobs: Knobs = Knobs()) -> str:
    scenario, modality = case_plan(i, knobs)
    return f"{modality}_varied_{scenario}_s{seed}_{i:04d}.npz"


# --------------------------------------------------------------------------------------------
# a case under construction
# --------------------------------------------------------------------------------------------
class _Canvas:
    def __init__(self, rng, shape, spacing, knobs: Knobs):
        self.rng, self.shape, self.spacing, self.knobs = rng, shape, spacing, knobs
        self.extent = np.asarray(shape) * np.asarray(spacing)
        amp = knobs.deform * float(rng.uniform(3.0, 8.0))
        self.margin = amp
        self.coords = vs.warp(rng, _grid_mm(shape, spacing), shape, amp, int(rng.integers(3, 6)))
        self.gts = np.zeros(shape, np.uint8)
        self.extra = np.zeros(shape, np.uint8)
        self.kinds = []

    def put(self, mask, kind) -> bool:
        """Label the free part of ``mask`` as the next class if it has enough voxels."""
        free = mask & (self.gts == 0)
        if free.sum() < self.knobs.min_voxels:
            return False
        self.gts[free] = len(self.kinds) + 1
        self.kinds.append(kind)
        return True

    def put_all(self, masks, kinds) -> bool:
        """Label several masks together (all or none)."""
        if any((m & (self.gts == 0)).sum() < self.knobs.min_voxels for m in masks):
            return False
        for m, k in zip(masks, kinds):
            self.put(m, k)
        return True

    def centre(self, lo=0.2, hi=0.8):
        return self.rng.uniform(lo, hi, 3) * self.extent

    def organ_size(self, lo=0.2, hi=0.45):
        return float(self.rng.uniform(lo, hi)) * float(np.median(self.extent))

    def field(self, centre=None, size=None, **kw):
        c = self.centre() if centre is None else centre
        return vs.organ_field(self.rng, self.coords, self.spacing, c,
                              self.organ_size() if size is None else size, margin_mm=self.margin, **kw)


def _retry(fn, tries=20):
    for _ in range(tries):
        if fn():
            return True
    return False


def _organ(cv: _Canvas, kind="organ", **kw) -> bool:
    return _retry(lambda: cv.put(cv.field(**kw) > 0.5, kind))


def _extra(cv: _Canvas, n):
    for _ in range(n):
        m = (cv.field() > 0.5) & (cv.gts == 0) & (cv.extra == 0)
        cv.extra[m] = cv.extra.max() + 1


def _touching(cv: _Canvas) -> bool:
    def attempt():
        a = cv.field() > 0.5
        if a.sum() < 4 * cv.knobs.min_voxels or (a & (cv.gts > 0)).any():
            return False
        b = vs.abut(cv.rng, cv.coords, cv.spacing, a, cv.organ_size(0.15, 0.35), cv.margin) & ~a
        if b.sum() < cv.knobs.min_voxels or not (ndimage.binary_dilation(a) & b).any():
            return False
        masks, kinds = [a, b], ["organ", "neighbour"]
        if cv.rng.random() < 0.3:  # a third organ against the neighbour
            c = vs.abut(cv.rng, cv.coords, cv.spacing, b, cv.organ_size(0.1, 0.3), cv.margin) & ~(a | b)
            if not (ndimage.binary_dilation(b) & c).any():
                return False
            masks, kinds = [a, b, c], ["organ", "neighbour", "neighbour"]
        if cv.rng.random() < 0.5:
            les = vs.lesion_in(cv.rng, cv.coords, cv.spacing, a, float(cv.rng.uniform(0.6, 1.0)), cv.margin)
            masks, kinds = [a & ~les] + masks[1:] + [les], ["organ"] + kinds[1:] + ["lesion"]
        return cv.put_all(masks, kinds)
    return _retry(attempt)


def _nested(cv: _Canvas) -> bool:
    def attempt():
        f = cv.field(size=cv.organ_size(0.3, 0.5))
        if cv.rng.random() < 0.5:  # hollow organ: wall and lumen (both classes, or the wall)
            t = float(cv.rng.uniform(0.5, 0.65))
            wall, lumen = vs.nested_levels(f, [0.3, t])
            if cv.rng.random() < 0.7:
                return cv.put_all([wall, lumen], ["wall", "lumen"])
            return cv.put_all([wall], ["wall"])
        edema, rim, core = vs.nested_levels(f, [0.35, 0.6, 0.85])  # lesion with rim and core
        return cv.put_all([edema, rim, core], ["edema", "rim", "core"])
    return _retry(attempt)


def _large(cv: _Canvas) -> bool:
    def attempt():
        d = np.array([cv.rng.uniform(-0.2, 0.2), *cv.rng.normal(size=2)])
        size = float(cv.rng.uniform(1.0, 1.3)) * float(cv.extent[1:].max())
        m = cv.field(centre=cv.centre(0.4, 0.6), size=size, direction=d, balls=(4, 6)) > 0.5
        ext = [int(np.ptp(np.nonzero(m.any(axis=tuple(b for b in range(3) if b != a)))[0]) + 1)
               if m.any() else 0 for a in range(3)]
        return max(ext[1], ext[2]) > cv.knobs.large_extent and cv.put(m, "large")
    return _retry(attempt)


def _tree(cv: _Canvas) -> bool:
    def attempt():
        r = max(float(cv.rng.uniform(1.0, 3.0)), 0.8 * float(cv.spacing[1]))
        length = float(cv.rng.uniform(0.5, 0.8)) * float(cv.extent.max())
        d = vs.random_unit(cv.rng)
        start = cv.centre(0.3, 0.7) - d * length * 0.4
        m, _ = vs.bezier_tree(cv.rng, cv.shape, cv.spacing, start, d, length, r,
                              depth=int(cv.rng.integers(1, 3)))
        return cv.put(m, "tree")
    return _retry(attempt)


def _fill(cv: _Canvas, scenario: str) -> bool:
    rng = cv.rng
    if scenario == "organs":
        ok = all(_organ(cv) for _ in range(int(rng.integers(2, 5))))
        _extra(cv, int(rng.integers(1, 3)))
    elif scenario == "touching":
        ok = _touching(cv)
        _extra(cv, 1)
    elif scenario == "nested":
        ok = _nested(cv) and _organ(cv)
    elif scenario == "large":
        ok = _large(cv) and _organ(cv, size=cv.organ_size(0.08, 0.15))
    elif scenario == "trees":
        ok = all(_tree(cv) for _ in range(int(rng.integers(1, 3)))) and _organ(cv)
        _extra(cv, 1)
    else:  # mixed
        parts = [_organ, _tree, _touching, _nested]
        ok, want = True, int(rng.integers(3, 5))
        while ok and len(cv.kinds) < want:
            ok = parts[int(rng.integers(0, len(parts)))](cv)
        _extra(cv, int(rng.integers(0, 2)))
    return ok


def _shape_spacing(rng, scenario, knobs: Knobs):
    j = knobs.size_jitter
    shape = [max(16, int(round(n * rng.uniform(1 - j, 1 + j)))) for n in knobs.shape]
    if scenario == "large":
        shape = [max(24, int(round(0.75 * shape[0]))), knobs.large_size, knobs.large_size]
    s_xy = float(rng.uniform(*knobs.spacing_xy))
    s_z = s_xy * float(rng.uniform(1.0, knobs.max_anisotropy))
    return tuple(shape), (round(s_z, 4), round(s_xy, 4), round(s_xy, 4))


def _body(rng, shape, spacing):
    """Body (D, H, W) bool: an ellipse in-plane whose radii and centre drift smoothly along z, or
    (one case in four) the whole volume (a scan cropped inside the patient)."""
    if rng.random() < 0.25:
        return np.ones(shape, bool)
    D, H, W = shape
    zs = np.linspace(0, 1, D)
    wob = [rng.uniform(-0.06, 0.06) * np.sin(2 * np.pi * (rng.uniform(0.3, 1.2) * zs + rng.uniform(0, 1)))
           for _ in range(4)]
    cy = (0.5 + wob[0]) * H
    cx = (0.5 + wob[1]) * W
    ry = (rng.uniform(0.38, 0.5) + wob[2]) * H
    rx = (rng.uniform(0.4, 0.55) + wob[3]) * W
    yy, xx = np.ogrid[:H, :W]
    return (((yy[None] - cy[:, None, None]) / ry[:, None, None]) ** 2
            + ((xx[None] - cx[:, None, None]) / rx[:, None, None]) ** 2) < 1.0


def _pads(rng, shape):
    """Zero bands: {(axis, side): width} on 1-4 of the y / x sides, 4-15% of the axis each."""
    sides = [(a, s) for a in (1, 2) for s in (0, 1)]
    pick = [sides[k] for k in rng.permutation(4)[:int(rng.integers(1, 5))]]
    return {(a, s): max(1, int(shape[a] * rng.uniform(0.04, 0.15))) for a, s in sorted(pick)}


def pad_mask(shape, pads) -> np.ndarray:
    """(D, H, W) bool, True inside the zero bands ``pads`` ({(axis, side): width})."""
    m = np.zeros(shape, bool)
    for (a, s), w in pads.items():
        sl = [slice(None)] * 3
        sl[a] = slice(0, w) if s == 0 else slice(shape[a] - w, shape[a])
        m[tuple(sl)] = True
    return m


def _renumber(gts, kinds, min_voxels):
    """Drop classes under ``min_voxels`` voxels; labels renumbered 1..K in order."""
    out, keep = np.zeros_like(gts), []
    counts = np.bincount(gts.ravel(), minlength=len(kinds) + 1)
    for k, kind in enumerate(kinds, start=1):
        if counts[k] >= min_voxels:
            keep.append(kind)
            out[gts == k] = len(keep)
    return out, keep


def generate_case(rng, scenario: str, modality: str, knobs: Knobs = Knobs()) -> dict:
    """Draw one case of ``scenario`` imaged as ``modality``.

    Returns a dict with ``imgs`` (D, H, W) uint8, ``gts`` (D, H, W) uint8 with labels 1..K all
    present (K >= 1, each with at least ``knobs.min_voxels`` voxels), ``spacing`` (3,) float64
    (z, y, x) mm, ``kinds`` (K str: organ, neighbour, lesion, wall, lumen, edema, rim, core,
    large, tree), ``scenario``, ``modality``, ``low_contrast`` (bool) and ``zero`` ((D, H, W)
    bool, where the image was zeroed: padded bands or outside the US fan; None without).
    """
    for _ in range(10):
        shape, spacing = _shape_spacing(rng, scenario, knobs)
        cv = _Canvas(rng, shape, spacing, knobs)
        if _fill(cv, scenario) and cv.kinds:
            break
    else:
        raise RuntimeError(f"could not build a {scenario} case")
    body = _body(rng, shape, spacing)
    low = bool(rng.random() < knobs.p_low_contrast)
    contrast = knobs.low_contrast if low else 1.0
    zero = ~vm.fan(rng, shape) if modality == "US" else None
    if rng.random() < knobs.p_zero_border:
        bands = pad_mask(shape, _pads(rng, shape))
        zero = bands if zero is None else (zero | bands)
    gts, kinds = cv.gts, cv.kinds
    if zero is not None:
        cut, cut_kinds = _renumber(np.where(zero, 0, gts).astype(np.uint8), kinds, knobs.min_voxels)
        if cut_kinds:
            gts, kinds = cut, cut_kinds
        elif modality != "US":  # the bands would erase every class: no bands
            zero = None
        else:
            raise RuntimeError("no class inside the US field of view")  # caller redraws
    model = vm.MODELS[modality]
    kw = {"fov": ~zero} if modality == "US" else {}
    imgs = model(rng, gts, body, cv.extra * (gts == 0), spacing, contrast=contrast, noise=knobs.noise, **kw)
    if zero is not None:
        imgs[zero] = 0
    return {"imgs": imgs, "gts": gts, "spacing": np.asarray(spacing, dtype=np.float64),
            "kinds": kinds, "scenario": scenario, "modality": modality, "low_contrast": low,
            "zero": zero}


def make_case(i: int, seed: int = 0, knobs: Knobs = Knobs()) -> dict:
    """Case ``i`` of the set of ``seed``: the plan's scenario and modality, its own generator
    (redrawn from the next sub-stream in the rare event that nothing fits)."""
    scenario, modality = case_plan(i, knobs)
    for attempt in range(5):
        rng = np.random.default_rng([int(seed), STREAM, int(i), attempt])
        try:
            return generate_case(rng, scenario, modality, knobs)
        except RuntimeError:
            continue
    raise RuntimeError(f"case {i} of seed {seed}: nothing fits ({scenario}, {modality})")


def write_dataset(out, n, seed=0, layout="train", knobs: Knobs = Knobs(), no_box_every=0):
    """Write ``n`` cases to ``out`` (layouts and box rule as ``scripts.synthetic.write_dataset``);
    returns the file names."""
    if layout not in ("train", "val"):
        raise ValueError(f"layout must be 'train' or 'val', not {layout!r}")
    out = Path(out)
    names = []
    for i in range(n):
        case = make_case(i, seed, knobs)
        name = case_name(seed, i, knobs)
        if layout == "train":
            _atomic_savez(out / name, imgs=case["imgs"], gts=case["gts"], spacing=case["spacing"])
        else:
            arrays = {"imgs": case["imgs"], "spacing": case["spacing"]}
            if not (no_box_every and i % no_box_every == no_box_every - 1):
                box_rng = np.random.default_rng([int(seed), STREAM, int(i), 99])
                arrays["boxes"] = _object_array(boxes_for_gts(case["gts"], box_rng))
            _atomic_savez(out / "images" / name, **arrays)
            _atomic_savez(out / "gts" / name, gts=case["gts"], spacing=case["spacing"])
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------
# command-line knobs (used by ``python -m scripts.synthetic --family varied``)
# --------------------------------------------------------------------------------------------
_HELP = {
    "scenarios": "scenarios to cycle through", "modalities": "intensity models to cycle through",
    "size_jitter": "volume size jitter per axis", "large_size": "in-plane size of large volumes",
    "large_extent": "a large organ spans more voxels than this", "spacing_xy": "in-plane spacing range (mm)",
    "max_anisotropy": "largest z / in-plane spacing ratio", "deform": "deformation amplitude multiplier",
    "noise": "noise level multiplier", "p_low_contrast": "probability of a low-contrast case",
    "low_contrast": "contrast multiplier of low-contrast cases", "p_zero_border": "probability of zero bands",
    "min_voxels": "smallest class size (voxels)",
}


def add_knob_arguments(parser):
    """One ``--<knob>`` flag per knob but ``shape`` (the generator's ``--shape``); a flag not given
    leaves no attribute (the knob keeps its default)."""
    g = parser.add_argument_group("varied family knobs (defaults: scripts.varied.Knobs)")
    for f in fields(Knobs):
        if f.name == "shape":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(Knobs(), f.name)
        if f.name in ("scenarios", "modalities"):
            choices = SCENARIOS if f.name == "scenarios" else vm.MODALITIES
            g.add_argument(flag, nargs="+", choices=choices, default=argparse.SUPPRESS,
                           help=f"{_HELP[f.name]} (default: all)")
        elif f.name == "spacing_xy":
            g.add_argument(flag, type=float, nargs=2, default=argparse.SUPPRESS, metavar=("LO", "HI"),
                           help=f"{_HELP[f.name]} (default: {default})")
        else:
            g.add_argument(flag, type=type(default), default=argparse.SUPPRESS,
                           help=f"{_HELP[f.name]} (default: {default})")


def knobs_from_args(args, shape=None) -> Tuple[Knobs, list]:
    """(Knobs, names of the knob flags given) from parsed ``args``; ``shape``: the volume shape."""
    given = {f.name: getattr(args, f.name) for f in fields(Knobs)
             if f.name != "shape" and getattr(args, f.name, None) is not None}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    if shape is not None:
        kw["shape"] = tuple(int(n) for n in shape)
    return replace(Knobs(), **kw), sorted(given)
