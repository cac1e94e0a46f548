"""Click harm: how often a stage makes a class worse, and how much a case loses after its best stage.

Definitions (pure functions on the per-stage scores a ``CaseResult`` holds; stages are numbered
1..6 as in ``metrics.csv``: stage 1 = box stage, 2..6 = click stages):

- A **step** is one class going from stage ``s`` to stage ``s + 1`` (s = 1..5: steps 1->2, 2->3,
  3->4, 4->5, 5->6). Its **drop** is ``Dice_s - Dice_{s+1}`` of that class (absolute Dice points).
- A step is **harmful** when its drop is strictly greater than ``HARM_THRESHOLD`` = 0.05 (up to a
  float tolerance of 1e-9, so that 0.74 -> 0.69 is a drop of exactly 0.05, not harm).
- A step counts only when both of its stages ran: a case without ``boxes`` skips the box stage
  (not run, scored 0 by the organizer's rule), so its step 1->2 is left out of both the harmful
  count and the step count (a case with boxes has 5 steps per class, one without has 4). A stage
  that ran but wrote no usable output did run: it is scored as all zeros and its steps count.
- Every class counts at every step, whether or not it got a click in that stage: a class already
  perfect gets ``None`` in ``clicks_order`` and no click, and a drop of its Dice is then harm done
  by the predictor while answering the other classes' clicks.
- A step whose Dice is NaN on either side (a class absent from the ground truth, which the
  evaluation never scores) is not counted.
- The **click-harm rate** of a case is harmful steps / counted steps (NaN with no counted step);
  over several cases the steps are pooled: sum of harmful steps / sum of counted steps.
- The **final drop from best click stage** of a case is ``max(DSC_2..DSC_6) - DSC_6`` on the
  case's mean DSC (>= 0; 0 when the last stage is the best): what the case lost by not stopping
  at its best click stage.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import numpy as np

__all__ = ["HARM_THRESHOLD", "step_drops", "click_harm", "harm_rate", "final_drop_from_best",
           "pooled_click_harm", "steps_harm_by_position", "harm_summary_line", "draw_harm_panels"]

HARM_THRESHOLD = 0.05
_EPS = 1e-9  # float tolerance of the comparison with the threshold


def _harmful(drops: np.ndarray, threshold: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return drops > threshold + _EPS  # NaN compares False


def step_drops(class_dsc: Sequence[Sequence[float]], ran: Sequence[bool]) -> np.ndarray:
    """Dice drop of every (step, class): (n_stages - 1, K) float, NaN where the step does not count.

    Args:
        class_dsc: per stage, the Dice of each class (label order); a stage that did not run may
            hold an empty list.
        ran: per stage, whether it ran (False only for a skipped box stage).
    """
    n = len(ran)
    k = max((len(row) for row in class_dsc), default=0)
    table = np.full((n, k), np.nan)
    for s, row in enumerate(class_dsc):
        if ran[s] and len(row):
            table[s, :len(row)] = np.asarray(row, dtype=float)
    with np.errstate(invalid="ignore"):
        return table[:-1] - table[1:]  # NaN propagates from a stage that did not run


def click_harm(class_dsc, ran, threshold: float = HARM_THRESHOLD) -> Tuple[int, int]:
    """``(harmful, steps)``: steps whose drop exceeds ``threshold``, and steps counted."""
    drops = step_drops(class_dsc, ran)
    counted = np.isfinite(drops)
    return int(_harmful(drops[counted], threshold).sum()), int(counted.sum())


def harm_rate(harmful: int, steps: int) -> float:
    """``harmful / steps``; NaN when no step counted."""
    return harmful / steps if steps else float("nan")


def final_drop_from_best(dsc: Sequence[float]) -> float:
    """``max(click-stage DSC) - final DSC`` of one case's mean DSC per stage (stage 1 = box stage,
    left out). NaN stages are skipped in the maximum; NaN if the final DSC is NaN."""
    clicks = np.asarray(list(dsc)[1:], dtype=float)
    if not clicks.size or not np.isfinite(clicks[-1]) or not np.isfinite(clicks).any():
        return float("nan")
    return float(np.nanmax(clicks) - clicks[-1])


def pooled_click_harm(results: Iterable, threshold: float = HARM_THRESHOLD) -> Tuple[int, int]:
    """Sum of ``click_harm`` over ``CaseResult``s."""
    harmful = steps = 0
    for r in results:
        h, n = click_harm(r.class_dsc, r.ran, threshold)
        harmful, steps = harmful + h, steps + n
    return harmful, steps


def steps_harm_by_position(results: Iterable, threshold: float = HARM_THRESHOLD) -> Tuple[np.ndarray, np.ndarray]:
    """Per step position (1->2 .. 5->6): pooled harmful steps and counted steps, two int arrays."""
    harmful, counted = None, None
    for r in results:
        drops = step_drops(r.class_dsc, r.ran)
        ok = np.isfinite(drops)
        h = (_harmful(drops, threshold) & ok).sum(axis=1)
        c = ok.sum(axis=1)
        harmful = h if harmful is None else harmful + h
        counted = c if counted is None else counted + c
    if harmful is None:
        return np.zeros(0, int), np.zeros(0, int)
    return harmful, counted


def harm_summary_line(results: List) -> str:
    """One line: pooled click-harm rate with its counts, and the largest final drop from the best
    click stage with its case."""
    harmful, steps = pooled_click_harm(results)
    rate = harm_rate(harmful, steps)
    drops = [(final_drop_from_best(r.dsc), r.name) for r in results]
    drops = [(d, n) for d, n in drops if np.isfinite(d)]
    worst = max(drops, default=None)
    worst_text = f"{worst[0]:.4f} ({worst[1]})" if worst else "n/a"
    return (f"click harm: {harmful}/{steps} class steps dropped Dice by > {HARM_THRESHOLD} "
            f"({100 * rate:.1f}%) | max final drop from best click stage {worst_text}")


def draw_harm_panels(ax_steps, ax_cases, results: List) -> None:
    """Two report panels: the pooled click-harm rate per step position, and per case its harm rate
    and its final drop from the best click stage."""
    from pathlib import Path
    harmful, counted = steps_harm_by_position(results)
    labels = ["box->1", "1->2", "2->3", "3->4", "4->5"][:len(harmful)]
    x = np.arange(len(harmful))
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(counted > 0, harmful / np.maximum(counted, 1), np.nan)
    ax_steps.bar(x, np.nan_to_num(rates), color="tab:red", width=0.6)
    for i in x:
        ax_steps.text(i, np.nan_to_num(rates[i]) + 0.01, f"{harmful[i]}/{counted[i]}", ha="center",
                      va="bottom", fontsize=8)
    top = float(np.nanmax(rates)) if np.isfinite(rates).any() else 0.0
    ax_steps.set(xticks=x, ylim=(0, max(0.1, top * 1.3)), ylabel="share of class steps",
                 title=f"click harm per step (click k -> k+1): Dice drop > {HARM_THRESHOLD}, "
                       "pooled over cases and classes")
    ax_steps.set_xticklabels([f"{s}\n(stage {i + 1}->{i + 2})" for i, s in enumerate(labels)], fontsize=8)
    ax_steps.grid(axis="y", alpha=0.3)
    _say_if_empty(ax_steps, int(np.sum(harmful)), int(np.sum(counted)))

    names = [Path(r.name).stem for r in results]
    xc = np.arange(len(results))
    case_rates = [harm_rate(*click_harm(r.class_dsc, r.ran)) for r in results]
    final = [final_drop_from_best(r.dsc) for r in results]
    ax_cases.bar(xc - 0.2, np.nan_to_num(case_rates), 0.4, color="tab:red", label="click-harm rate")
    ax_cases.bar(xc + 0.2, np.nan_to_num(final), 0.4, color="tab:purple",
                 label="final drop from best click stage (DSC)")
    top = max([0.1] + [v for v in case_rates + final if np.isfinite(v)])
    ax_cases.set(xticks=xc, ylim=(0, top * 1.2), title="per case: click-harm rate and final drop "
                 "from the best click stage")
    ax_cases.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax_cases.legend(fontsize=7, loc="upper right")
    ax_cases.grid(axis="y", alpha=0.3)
    if not any(np.isfinite(v) and v > 0 for v in case_rates + final):
        steps = sum(click_harm(r.class_dsc, r.ran)[1] for r in results)
        _say_if_empty(ax_cases, 0, steps, "no click harm and no final drop")


def _say_if_empty(ax, harmful: int, steps: int, text: str = "no click harm") -> None:
    """Write in the middle of a harm panel whose bars are all 0 why it is empty: ``text`` (with
    the number of class steps counted), or "no click steps" when there were none."""
    if harmful:
        return
    message = f"{text}\n(0 of {steps} class steps)" if steps else "no click steps"
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="0.35")
