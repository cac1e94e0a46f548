"""Validation through the warm evaluation (``evaluation.runner``): the organizer's stages, in process.

Held-out cases in the validation layout (``DIR/images/*.npz`` with ``imgs``, ``spacing``, optional
``boxes``; ``DIR/gts/*.npz`` with ``gts``) are run through ``evaluate_case`` with a
``WarmRunner`` wrapping a predictor (``infer.predictor.Predictor``, built through its public
constructor) on the network being trained: box stage (when the case has boxes), then
``n_clicks`` click stages placed by ``evaluation.clicks``, each scored by ``evaluation.metrics``.
A ``log`` callable gets one line per case as it finishes (its stages' DSC and seconds).
"""
from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from evaluation.report import kind_means
from evaluation.runner import WarmRunner, evaluate_case
from infer.predictor import Predictor


def val_pairs(folder, limit: Optional[int] = None) -> list[tuple[Path, Path]]:
    """(image file, ground-truth file) pairs of a validation-layout folder, sorted by name."""
    folder = Path(folder)
    images = sorted((folder / "images").glob("*.npz"))
    pairs = [(p, folder / "gts" / p.name) for p in images if (folder / "gts" / p.name).is_file()]
    if not pairs:
        raise ValueError(f"{folder}: no images/*.npz with a matching gts/*.npz")
    return pairs[:limit] if limit is not None else pairs


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def case_line(i: int, n: int, result, seconds: float) -> str:
    """``val 2/6 NAME: DSC 0.712 0.801 (3.4 s)``: the DSC of each stage that ran, in order."""
    dsc = " ".join(f"{d:.3f}" for d, ran in zip(result.dsc, result.ran) if ran)
    return f"val {i}/{n} {result.name}: DSC {dsc or '-'} ({seconds:.1f} s)"


def evaluate(predict: Callable, pairs, n_clicks: int = 5, workdir=None,
             log: Optional[Callable[[str], None]] = None) -> dict:
    """Run the warm evaluation of ``predict`` (case dict -> segs) on ``pairs``; summary dict:

    ``box_dsc``: mean box-stage DSC over cases with boxes; ``final_dsc``: mean DSC of the last
    stage; ``final_dsc_box`` / ``final_dsc_nobox``: the same per kind of case; ``click1_dsc_nobox``:
    mean DSC of the first click stage of no-box cases; ``dsc_auc``: mean DSC AUC; ``results``: the
    per-case ``CaseResult`` list (dropped by :func:`make_validator`). ``log``: one
    :func:`case_line` per case as it finishes.
    """
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="val-")) if own else Path(workdir)
    runner = WarmRunner(predict, log=lambda *a: None)
    results = []
    try:
        for i, (img, gt) in enumerate(pairs, 1):
            t0 = time.perf_counter()
            results.append(evaluate_case(img, gt, runner, workdir / img.stem, log=lambda *a: None,
                                         n_clicks=n_clicks))
            if log is not None:
                log(case_line(i, len(pairs), results[-1], time.perf_counter() - t0))
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    kinds = kind_means(results, zero_over_budget=False, final_stage=n_clicks)
    return {
        "box_dsc": kinds[True]["start"],
        "final_dsc": _mean(r.dsc[n_clicks] for r in results),
        "final_dsc_box": kinds[True]["final"],
        "final_dsc_nobox": kinds[False]["final"],
        "click1_dsc_nobox": kinds[False]["start"] if n_clicks >= 1 else float("nan"),
        "dsc_auc": _mean(r.dsc_auc for r in results) if n_clicks == 5 else float("nan"),
        "results": results,
    }


def make_validator(folder, limit: Optional[int] = None, n_clicks: int = 5,
                   log: Optional[Callable[[str], None]] = None) -> Callable:
    """``validate(network, card, device, policy) -> dict`` for ``Trainer``: the summary of
    :func:`evaluate` of a ``Predictor(network, card, device, policy=policy)`` (``log``: one line
    per case). The predictor puts the network in eval mode; training steps put it back."""
    pairs = val_pairs(folder, limit)

    def validate(network, card, device, policy) -> dict:
        predictor = Predictor(network, card, device, policy=policy)
        summary = evaluate(predictor.predict, pairs, n_clicks=n_clicks, log=log)
        summary.pop("results")
        return {f"val_{k}": v for k, v in summary.items()}

    return validate
