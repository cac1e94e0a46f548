"""NIfTI scans in and out of the organizer's npz layout (outside the image: needs ``nibabel``).

    python -m scripts.nifti to-case --scan CT.nii.gz [--labels SEG.nii.gz] [--label-names NAMES.json]
                                    [--classes liver,5,...] [--modality CT|MR|...] [--window 40,400]
                                    [--no-boxes] [--seed 0] [--name NAME] --out DIR
    python -m scripts.nifti to-nifti --segs outputs/CASE.npz (--meta DIR/meta/CASE.json | --like CT.nii.gz)
                                     [--original-values] [--per-class] --out SEG.nii.gz|FOLDER

Axis order. A NIfTI array is indexed (x, y, z) = (i, j, k) of its affine; the organizer's arrays
are (z, y, x), axis 0 = z. ``to-case`` transposes the array (``.transpose(2, 1, 0)``) and writes
``spacing`` as the header's voxel sizes reversed, ``(dz, dy, dx)``; ``to-nifti`` transposes back and
writes the source affine, so a prediction lands on the source scan's grid voxel for voxel.

Intensities, as the challenge's preprocessed data holds them (uint8, 0..255):

- CT: a window ``LEVEL,WIDTH`` in Hounsfield units, default 40,400 (soft tissue / abdomen, the
  organizer's CT default): ``lo = LEVEL - WIDTH/2``, value ``clip((HU - lo) / WIDTH * 255, 0, 255)``
  truncated to uint8 (the organizer's preprocessing truncates, it does not round);
- any other modality: clipped at the 0.5 / 99.5 percentiles of the voxels above 0, scaled min..max
  to 0..255, voxels that were 0 stay 0, truncated to uint8 (the organizer's rule for MR, PET, ...).

``to-case`` writes the validation layout (``sample_inputs/`` has the same): ``DIR/images/NAME.npz``
(``imgs``, ``spacing``, ``boxes`` unless ``--no-boxes``), with ``--labels`` also
``DIR/gts/NAME.npz`` (``gts`` with the chosen classes renumbered 1..K in the order given,
``spacing``), and ``DIR/meta/NAME.json``: the source file, affine and (x, y, z) shape, the window,
and per class its number, original label value and name (what ``to-nifti`` needs to go back).
Boxes follow the organizer's rule (``evaluation.boxes.box_for_mask``: full z extent, the 2D box on
the class's middle slice in C order, jittered outward by up to 5 voxels per 256, seeded by
``--seed``). Without ``--labels`` there is no ground truth and no box: add prompts with
:func:`prompt_case` in Python.

``to-nifti`` reads ``segs`` from an output npz and writes one label map (class numbers 1..K, or
with ``--original-values`` the source label values) or, with ``--per-class``, one 0/1 file per
class into a folder (``<class number>_<name>.nii.gz``).

In Python, for your own prompts on a scan (coordinates are NIfTI voxel indices (x, y, z) unless
``order="zyx"``)::

    from infer.predictor import Predictor
    from scripts.nifti import prompt_case, segs_to_nifti
    case = prompt_case("ct.nii.gz", boxes=[((40, 30, 20), (70, 60, 35))],   # (lo, hi) corners, inclusive
                       clicks=[{"fg": [(55, 45, 27)], "bg": []}])
    segs = Predictor.from_path("weights/demo", device="cpu").predict(case)
    segs_to_nifti(segs, "ct.nii.gz", "seg.nii.gz")
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

DEFAULT_WINDOW = (40.0, 400.0)  # level, width in HU: soft tissue / abdomen


# --------------------------------------------------------------------------------------------
# reading and writing NIfTI (the only place nibabel is imported)
# --------------------------------------------------------------------------------------------
def _nib():
    try:
        import nibabel
    except ImportError:  # pragma: no cover - depends on the environment
        raise SystemExit("scripts.nifti needs nibabel: .venv/bin/pip install -r requirements-dev.txt")
    return nibabel


def read_nifti(path, labels: bool = False) -> dict:
    """One NIfTI file as the organizer's arrays.

    Returns ``{"array": (D, H, W) = (z, y, x) array, "spacing": (dz, dy, dx) floats, "affine": (4, 4)
    float64, "shape_xyz": (X, Y, Z)}``. ``labels``: the stored integers (scaling ignored, a float
    label map rounded) instead of float32 values with the header's scaling applied. A 4D file
    must have a single volume.
    """
    img = _nib().load(str(path))
    if labels:
        data = np.asanyarray(img.dataobj)
        if data.dtype.kind == "f":
            data = np.rint(data).astype(np.int32)
    else:
        data = img.get_fdata(dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    return {"array": np.ascontiguousarray(data.transpose(2, 1, 0)), "spacing": tuple(zooms[::-1]),
            "affine": np.asarray(img.affine, dtype=np.float64), "shape_xyz": tuple(int(s) for s in data.shape)}


def write_nifti(path, array_zyx: np.ndarray, affine) -> Path:
    """Write a (z, y, x) array as NIfTI (x, y, z) with ``affine``; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = _nib().Nifti1Image(np.ascontiguousarray(np.asarray(array_zyx).transpose(2, 1, 0)),
                             np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    _nib().save(img, str(path))
    return path


# --------------------------------------------------------------------------------------------
# intensities
# --------------------------------------------------------------------------------------------
def ct_to_uint8(hu: np.ndarray, level: float = DEFAULT_WINDOW[0], width: float = DEFAULT_WINDOW[1]) -> np.ndarray:
    """Hounsfield units -> uint8 through the window ``level`` +- ``width``/2 (truncated)."""
    if not width > 0:
        raise ValueError(f"window width must be > 0, not {width}")
    lo = level - width / 2.0
    return np.clip((np.asarray(hu, np.float64) - lo) / width * 255.0, 0.0, 255.0).astype(np.uint8)


def percentile_to_uint8(values: np.ndarray) -> np.ndarray:
    """The organizer's non-CT rule: clip at the 0.5 / 99.5 percentiles of the voxels > 0, scale
    the clipped min..max to 0..255, keep 0 where the input is 0, truncate to uint8."""
    values = np.asarray(values, np.float64)
    positive = values[values > 0]
    if positive.size == 0:
        return np.zeros(values.shape, np.uint8)
    lo, hi = np.percentile(positive, [0.5, 99.5])
    clipped = np.clip(values, lo, hi)
    span = clipped.max() - clipped.min()
    out = (clipped - clipped.min()) / span * 255.0 if span > 0 else np.zeros_like(clipped)
    out[values == 0] = 0
    return out.astype(np.uint8)


def to_uint8(values: np.ndarray, modality: str = "CT", window: Tuple[float, float] = DEFAULT_WINDOW) -> np.ndarray:
    """CT: :func:`ct_to_uint8` with ``window`` (level, width); other modalities: percentiles."""
    return ct_to_uint8(values, *window) if modality.upper() == "CT" else percentile_to_uint8(values)


def parse_window(text: str) -> Tuple[float, float]:
    """``"LEVEL,WIDTH"`` -> (level, width), width > 0."""
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--window takes LEVEL,WIDTH (e.g. 40,400), not {text!r}") from None
    if not width > 0:
        raise ValueError(f"--window width must be > 0, not {width}")
    return level, width


# --------------------------------------------------------------------------------------------
# classes and boxes
# --------------------------------------------------------------------------------------------
def read_label_names(path) -> Dict[int, str]:
    """Label value -> name from a JSON ``{"5": "liver"}`` or ``{"5": {"name": "liver", ...}}``."""
    raw = json.loads(Path(path).read_text())
    return {int(k): (v["name"] if isinstance(v, dict) else str(v)) for k, v in raw.items()}


def choose_classes(label_map: np.ndarray, names: Optional[Dict[int, str]] = None,
                   classes: Optional[Sequence] = None) -> List[Tuple[int, str]]:
    """(label value, name) per class in output order: ``classes`` (values or names) in the order
    given, or every non-zero value present, ascending. A requested class absent from the map, or
    an unknown name, raises ValueError."""
    names = names or {}
    present = set(int(v) for v in np.unique(label_map)) - {0}
    if classes is None:
        values = sorted(present)
    else:
        by_name = {n: v for v, n in names.items()}
        values = []
        for c in classes:
            c = str(c).strip()
            if c.lstrip("-").isdigit():
                values.append(int(c))
            elif c in by_name:
                values.append(by_name[c])
            else:
                raise ValueError(f"unknown class {c!r}: not a label value nor a name in the label names")
        missing = [v for v in values if v not in present]
        if missing:
            raise ValueError(f"label value(s) {missing} not in the label map")
        if len(set(values)) != len(values):
            raise ValueError(f"a class is named twice: {values}")
    return [(v, names.get(v, f"label_{v}")) for v in values]


def renumber(label_map: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """``gts`` with label ``values[i]`` as class ``i + 1`` and everything else 0 (uint8, or uint16
    beyond 255 classes)."""
    gts = np.zeros(label_map.shape, np.uint8 if len(values) <= 255 else np.uint16)
    for i, v in enumerate(values, start=1):
        gts[label_map == v] = i
    return gts


def organizer_boxes(gts: np.ndarray, k: int, seed: int = 0) -> List[dict]:
    """One organizer box per class 1..k (``evaluation.boxes.box_for_mask``), jitter seeded."""
    from evaluation.boxes import box_for_mask
    rng = np.random.default_rng(seed)
    return [box_for_mask(gts == c, rng) for c in range(1, k + 1)]


# --------------------------------------------------------------------------------------------
# scan -> case
# --------------------------------------------------------------------------------------------
def scan_to_case(scan, labels=None, names: Optional[Dict[int, str]] = None, classes=None,
                 modality: str = "CT", window: Tuple[float, float] = DEFAULT_WINDOW,
                 boxes: bool = True, seed: int = 0) -> dict:
    """A case from a NIfTI scan (path or :func:`read_nifti` dict) and optional label map.

    Returns ``{"image": {imgs, spacing[, boxes]}, "gts": {gts, spacing} or None, "meta": dict}``;
    ``boxes`` only with a label map and ``boxes=True``. The label map must have the scan's grid.
    """
    vol = scan if isinstance(scan, dict) else read_nifti(scan)
    image = {"imgs": to_uint8(vol["array"], modality, window),
             "spacing": np.asarray(vol["spacing"], np.float64)}
    meta = {"source": None if isinstance(scan, dict) else str(scan),
            "affine": vol["affine"].tolist(), "shape_xyz": list(vol["shape_xyz"]),
            "axes": "case arrays are (z, y, x): the NIfTI (x, y, z) array transposed",
            "modality": modality, "window": list(window) if modality.upper() == "CT" else None,
            "classes": []}
    gts_members = None
    if labels is not None:
        lab = labels if isinstance(labels, dict) else read_nifti(labels, labels=True)
        if lab["array"].shape != vol["array"].shape or not np.allclose(lab["affine"], vol["affine"], atol=1e-3):
            raise ValueError("the label map is not on the scan's grid (shape or affine differ)")
        chosen = choose_classes(lab["array"], names, classes)
        gts = renumber(lab["array"], [v for v, _ in chosen])
        meta["classes"] = [{"class": i, "value": v, "name": n} for i, (v, n) in enumerate(chosen, start=1)]
        gts_members = {"gts": gts, "spacing": image["spacing"]}
        if boxes and chosen:
            from scripts.synthetic import _object_array
            image["boxes"] = _object_array(organizer_boxes(gts, len(chosen), seed))
    return {"image": image, "gts": gts_members, "meta": meta}


def write_case(out, name: str, case: dict) -> List[Path]:
    """Write :func:`scan_to_case`'s result as ``out/images/NAME.npz``, ``out/gts/NAME.npz`` (when
    there are labels) and ``out/meta/NAME.json``; returns the paths."""
    from scripts.synthetic import _atomic_savez
    from infer.writer import atomic_write
    out, stem = Path(out), Path(name).name.removesuffix(".npz")
    paths = [out / "images" / f"{stem}.npz"]
    _atomic_savez(paths[0], **case["image"])
    if case["gts"] is not None:
        paths.append(out / "gts" / f"{stem}.npz")
        _atomic_savez(paths[-1], **case["gts"])
    paths.append(out / "meta" / f"{stem}.json")
    paths[-1].parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(paths[-1], "w", encoding="utf-8") as f:
        json.dump(case["meta"], f, indent=1)
    return paths


# --------------------------------------------------------------------------------------------
# your own prompts
# --------------------------------------------------------------------------------------------
def _zyx(point, order: str) -> List[int]:
    p = [int(v) for v in point]
    if len(p) != 3:
        raise ValueError(f"a point has 3 coordinates, not {point!r}")
    return p[::-1] if order == "xyz" else p


def box_from_corners(lo, hi, order: str = "xyz") -> dict:
    """An organizer box dict from two inclusive corners: z range as given, the 2D box on the
    middle slice ``z_mid = (z_min + z_max) // 2``."""
    (z0, y0, x0), (z1, y1, x1) = _zyx(lo, order), _zyx(hi, order)
    z0, z1, y0, y1, x0, x1 = min(z0, z1), max(z0, z1), min(y0, y1), max(y0, y1), min(x0, x1), max(x0, x1)
    return {"z_min": z0, "z_max": z1, "z_mid": (z0 + z1) // 2, "z_mid_y_min": y0, "z_mid_y_max": y1,
            "z_mid_x_min": x0, "z_mid_x_max": x1}


def prompt_case(scan, boxes=None, clicks=None, modality: str = "CT",
                window: Tuple[float, float] = DEFAULT_WINDOW, order: str = "xyz", prev_pred=None) -> dict:
    """A case dict for ``Predictor.predict`` (the format ``infer.npz.read_case`` returns) from a
    NIfTI scan (path or :func:`read_nifti` dict) and your own prompts, one entry per class:

    - ``boxes``: list of ``(lo, hi)`` inclusive corners (or organizer box dicts, kept as they are);
    - ``clicks``: list of ``{"fg": [point, ...], "bg": [point, ...]}``; ``clicks_order`` is all
      foreground clicks, then all background clicks, per class.

    Points and corners are NIfTI voxel indices (x, y, z) unless ``order="zyx"``. With both lists,
    they must have the same length (K). ``prev_pred``: an earlier (z, y, x) ``segs`` to correct.
    """
    if order not in ("xyz", "zyx"):
        raise ValueError(f"order is 'xyz' or 'zyx', not {order!r}")
    if boxes is not None and clicks is not None and len(boxes) != len(clicks):
        raise ValueError(f"{len(boxes)} boxes but {len(clicks)} click entries: one of each per class")
    vol = scan if isinstance(scan, dict) else read_nifti(scan)
    case = {"name": Path(str(scan)).name if not isinstance(scan, dict) else "case", "warnings": [],
            "imgs": to_uint8(vol["array"], modality, window), "spacing": tuple(vol["spacing"]),
            "boxes": None, "clicks": None, "clicks_order": None, "prev_pred": prev_pred}
    if boxes is not None:
        case["boxes"] = [dict(b) if isinstance(b, dict) else box_from_corners(*b, order=order) for b in boxes]
    if clicks is not None:
        case["clicks"] = [{s: [_zyx(p, order) for p in (c or {}).get(s, [])] for s in ("fg", "bg")}
                          for c in clicks]
        case["clicks_order"] = [["fg"] * len(c["fg"]) + ["bg"] * len(c["bg"]) for c in case["clicks"]]
    return case


# --------------------------------------------------------------------------------------------
# segs -> NIfTI
# --------------------------------------------------------------------------------------------
def read_segs(path) -> np.ndarray:
    """``segs`` of an output npz (plain array, nothing unpickled)."""
    with np.load(path, allow_pickle=False) as f:
        return f["segs"]


def _grid(like) -> Tuple[np.ndarray, Tuple[int, int, int], List[dict]]:
    """(affine, shape_xyz, classes) from a meta dict / JSON path or a NIfTI scan path."""
    if isinstance(like, dict):
        meta = like
    elif str(like).endswith(".json"):
        meta = json.loads(Path(like).read_text())
    else:
        img = _nib().load(str(like))
        return np.asarray(img.affine, np.float64), tuple(int(s) for s in img.shape[:3]), []
    return np.asarray(meta["affine"], np.float64), tuple(meta["shape_xyz"]), meta.get("classes", [])


def segs_to_nifti(segs: np.ndarray, like, out, original_values: bool = False,
                  per_class: bool = False) -> List[Path]:
    """Write a (z, y, x) ``segs`` on the grid of ``like`` (the source scan, or the case's meta
    dict / JSON from :func:`write_case`). ``original_values``: class i -> the source label value
    (needs meta). ``per_class``: ``out`` is a folder of ``<i>_<name>.nii.gz`` 0/1 files. Returns
    the paths written."""
    affine, shape_xyz, classes = _grid(like)
    segs = np.asarray(segs)
    if segs.shape[::-1] != tuple(shape_xyz):
        raise ValueError(f"segs shape {segs.shape} (z, y, x) is not the source grid {tuple(shape_xyz)} (x, y, z)")
    if original_values and not classes:
        raise ValueError("--original-values needs the case's meta JSON (it holds the label values)")
    if per_class:
        k = max(int(segs.max(initial=0)), len(classes))
        name = {c["class"]: c["name"] for c in classes}
        return [write_nifti(Path(out) / f"{i}_{name.get(i, f'class_{i}')}.nii.gz", (segs == i).astype(np.uint8), affine)
                for i in range(1, k + 1)]
    if original_values:
        top = max(c["value"] for c in classes)
        low = min(c["value"] for c in classes)
        dtype = np.uint8 if low >= 0 and top <= 255 else np.uint16 if low >= 0 and top <= 65535 else np.int32
        lut = np.zeros(max(int(segs.max(initial=0)), len(classes)) + 1, dtype)
        for c in classes:
            lut[c["class"]] = c["value"]
        return [write_nifti(out, lut[segs], affine)]
    return [write_nifti(out, segs, affine)]


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.nifti", description=__doc__.split("\n\n")[0],
                                epilog="Axis order, intensities and the layout: see the module docstring "
                                       "(scripts/nifti.py) and docs/EVALUATION.md.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("to-case", help="NIfTI scan (+ label map) -> images/, gts/, meta/ under --out",
                       description="A NIfTI scan (and label map) as a case in the organizer's validation layout.")
    c.add_argument("--scan", required=True, type=Path, help="the scan (.nii or .nii.gz)")
    c.add_argument("--labels", type=Path, help="label map on the scan's grid (gives gts/ and boxes)")
    c.add_argument("--label-names", type=Path, help='JSON {"value": "name"} or {"value": {"name": ...}}')
    c.add_argument("--classes", help="comma-separated label values or names, in class order 1..K "
                                     "(default: every label present, ascending)")
    c.add_argument("--modality", default="CT", help="CT: --window; anything else: 0.5/99.5 percentiles (default CT)")
    c.add_argument("--window", default="40,400", help="CT window LEVEL,WIDTH in HU (default 40,400: soft tissue / abdomen)")
    c.add_argument("--no-boxes", action="store_true", help="write no boxes (a case that starts at the click stages)")
    c.add_argument("--seed", type=int, default=0, help="seed of the box jitter (default 0)")
    c.add_argument("--name", help="case name (default: MODALITY_<scan file name without .nii[.gz]>)")
    c.add_argument("--out", required=True, type=Path, help="output folder (images/, gts/, meta/ inside)")
    b = sub.add_parser("to-nifti", help="segs of an output npz -> NIfTI on the source grid",
                       description="segs of an output npz as NIfTI on the source scan's grid and affine.")
    b.add_argument("--segs", required=True, type=Path, help="an output .npz holding segs")
    grid = b.add_mutually_exclusive_group(required=True)
    grid.add_argument("--meta", type=Path, help="the case's meta JSON written by to-case")
    grid.add_argument("--like", type=Path, help="the source NIfTI scan (grid and affine only)")
    b.add_argument("--original-values", action="store_true", help="write the source label values (needs --meta)")
    b.add_argument("--per-class", action="store_true", help="one 0/1 file per class; --out is a folder")
    b.add_argument("--out", required=True, type=Path, help="output .nii.gz (a folder with --per-class)")
    return p


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        if a.command == "to-case":
            window = parse_window(a.window)
            names = read_label_names(a.label_names) if a.label_names else None
            classes = [c for c in a.classes.split(",") if c.strip()] if a.classes else None
            case = scan_to_case(a.scan, a.labels, names, classes, a.modality, window,
                                boxes=not a.no_boxes, seed=a.seed)
            name = a.name or f"{a.modality}_{_stem(a.scan)}"
            paths = write_case(a.out, name, case)
            k = len(case["meta"]["classes"])
            print(f"wrote {', '.join(map(str, paths))} ({k} classes"
                  f"{', boxes' if 'boxes' in case['image'] else ', no boxes'})")
        else:
            like = a.meta or a.like
            paths = segs_to_nifti(read_segs(a.segs), like, a.out, a.original_values, a.per_class)
            print(f"wrote {len(paths)} file(s): {', '.join(map(str, paths[:4]))}{' ...' if len(paths) > 4 else ''}")
    except (ValueError, OSError, KeyError) as exc:
        p.error(str(exc))
    except Exception as exc:  # nibabel's ImageFileError and the like: one line, not a traceback
        p.error(f"{type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
