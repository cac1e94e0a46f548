"""Training cases: npz files in the organizer's training layout (``imgs``, ``gts``, ``spacing``).

Files are read with ``allow_pickle=False`` (the training layout holds plain arrays only).
``load_folder`` keeps every case in memory (small sets, in-process sampling); ``index_folder``
keeps only names, paths and labels, and ``CaseRef.load`` reads a case when an example needs it
(data-loader workers, large sets). Either kind of entry answers ``.load() -> Case``. Arrays are
(D, H, W), axis order (z, y, x).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Case:
    name: str
    imgs: np.ndarray      # (D, H, W), as stored (uint8 for the organizer's data)
    gts: np.ndarray       # (D, H, W) integer labels, 0 = background
    spacing: tuple        # (z, y, x) mm
    labels: tuple         # foreground labels present in gts

    def load(self) -> "Case":
        return self


@dataclass
class CaseRef:
    """A training file not read yet: its foreground ``labels`` are known, ``load()`` reads it."""
    name: str
    path: Path
    labels: tuple

    def load(self) -> Case:
        return load_case(self.path, labels=self.labels)


def load_case(path, labels: tuple | None = None) -> Case:
    """The case in ``path``; ``labels``: its foreground labels when already known (a ``CaseRef``'s,
    found when the folder was indexed), which spares the ``np.unique`` pass over ``gts``."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        if "imgs" not in z.files or "gts" not in z.files:
            raise ValueError(f"{path}: a training file needs 'imgs' and 'gts' (has {z.files})")
        imgs, gts = z["imgs"], z["gts"]
        spacing = tuple(float(s) for s in z["spacing"]) if "spacing" in z.files else (1.0, 1.0, 1.0)
    if imgs.shape != gts.shape or imgs.ndim != 3:
        raise ValueError(f"{path}: imgs {imgs.shape} and gts {gts.shape} must be the same 3D shape")
    if labels is None:
        labels = tuple(int(v) for v in np.unique(gts) if v != 0)
    return Case(path.name, imgs, gts, spacing, labels)


def load_folder(folder, limit: int | None = None) -> list[Case]:
    """All ``*.npz`` training files of ``folder`` (sorted by name) that hold a foreground label."""
    files = sorted(Path(folder).glob("*.npz"))
    if limit is not None:
        files = files[:limit]
    cases = [load_case(f) for f in files]
    cases = [c for c in cases if c.labels]
    if not cases:
        raise ValueError(f"no training case with a foreground label in {folder}")
    return cases


def index_folder(folder, limit: int | None = None) -> list[CaseRef]:
    """The cases ``load_folder`` would return (same files, same order), as ``CaseRef``: only
    ``gts`` is read, once, to find each file's labels."""
    refs = []
    for f in sorted(Path(folder).glob("*.npz"))[:limit]:
        with np.load(f, allow_pickle=False) as z:
            if "imgs" not in z.files or "gts" not in z.files:
                raise ValueError(f"{f}: a training file needs 'imgs' and 'gts' (has {z.files})")
            labels = tuple(int(v) for v in np.unique(z["gts"]) if v != 0)
        if labels:
            refs.append(CaseRef(f.name, f, labels))
    if not refs:
        raise ValueError(f"no training case with a foreground label in {folder}")
    return refs


def epoch_plan(cases: list[Case], n_examples: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``n_examples`` (case index, label) pairs: cases cycled in a shuffled order, one label drawn
    uniformly per example."""
    order = []
    while len(order) < n_examples:
        order.extend(rng.permutation(len(cases)).tolist())
    return [(i, int(rng.choice(cases[i].labels))) for i in order[:n_examples]]
