"""metrics.csv, the summary line and report.png from a list of ``CaseResult``.

CSV columns: the organizer's, in its order (``CaseName, TotalRunningTime, RunningTime_1..6,
DSC_AUC, NSD_AUC, DSC_Final, NSD_Final, DSC_1..6, NSD_1..6, num_class, runtime_upperbound``),
then ``OverBudget``, ``MissingOutputs`` (stages that ran but left no usable output), ``HasBoxes``,
``ClickHarmRate`` / ``HarmfulSteps`` / ``ClickSteps`` (class steps whose Dice dropped by more than
0.05, see ``evaluation.harm``), ``FinalDropFromBest`` (best click-stage DSC minus final DSC) and
``Notes`` (what happened: the first error line each stage's predictor reported, identical ones of
consecutive stages merged, and the missing outputs). Floats are written at full precision
(shortest round-trip, as pandas does); NaN
is an empty cell (pandas' default). Over the 90 s x K budget, DSC_AUC / NSD_AUC / DSC_Final /
NSD_Final are written as 0 (the challenge rule; the organizer's script only warns) unless
``zero_over_budget`` is False; the per-stage DSC_k / NSD_k always hold the measured values.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable, List

import numpy as np

from .harm import click_harm, draw_harm_panels, final_drop_from_best, harm_rate
from .runner import N_STAGES, CaseResult

__all__ = ["COLUMNS", "case_row", "write_csv", "summary_line", "split_summary_line", "kind_means",
           "error_summary", "kind_stage_means", "plot_stage_scores", "plot_report"]

ORGANIZER_COLUMNS = (["CaseName", "TotalRunningTime"]
                     + [f"RunningTime_{k}" for k in range(1, N_STAGES + 1)]
                     + ["DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final"]
                     + [f"DSC_{k}" for k in range(1, N_STAGES + 1)]
                     + [f"NSD_{k}" for k in range(1, N_STAGES + 1)]
                     + ["num_class", "runtime_upperbound"])
HARM_COLUMNS = ["ClickHarmRate", "HarmfulSteps", "ClickSteps", "FinalDropFromBest"]
COLUMNS = ORGANIZER_COLUMNS + ["OverBudget", "MissingOutputs", "HasBoxes"] + HARM_COLUMNS + ["Notes"]


def _scores(r: CaseResult, zero_over_budget: bool) -> dict:
    out = {"DSC_AUC": r.dsc_auc, "NSD_AUC": r.nsd_auc, "DSC_Final": r.dsc[-1], "NSD_Final": r.nsd[-1]}
    if zero_over_budget and r.over_budget:
        out = {k: 0.0 for k in out}
    return out


def case_row(r: CaseResult, zero_over_budget: bool = True) -> dict:
    """One CSV row (values as Python objects) for a case."""
    row = {"CaseName": r.name, "TotalRunningTime": r.total_time}
    row.update({f"RunningTime_{k + 1}": float(t) for k, t in enumerate(r.times)})
    row.update(_scores(r, zero_over_budget))
    row.update({f"DSC_{k + 1}": float(v) for k, v in enumerate(r.dsc)})
    row.update({f"NSD_{k + 1}": float(v) for k, v in enumerate(r.nsd)})
    notes = list(r.notes) + error_notes(r.errors) + [f"stage {k + 1}: {m}" for k, m in enumerate(r.missing) if m]
    row.update({"num_class": r.n_classes, "runtime_upperbound": r.budget_s,
                "OverBudget": r.over_budget, "MissingOutputs": r.n_missing,
                "HasBoxes": r.has_boxes})
    harmful, steps = click_harm(r.class_dsc, r.ran)
    row.update({"ClickHarmRate": harm_rate(harmful, steps), "HarmfulSteps": harmful,
                "ClickSteps": steps, "FinalDropFromBest": final_drop_from_best(r.dsc),
                "Notes": " | ".join(notes)})
    return row


def error_notes(errors) -> List[str]:
    """``["stages 1-6: <line>", ...]``: one note per run of consecutive stages with the same error."""
    notes, k = [], 0
    while k < len(errors):
        if not errors[k]:
            k += 1
            continue
        j = k
        while j + 1 < len(errors) and errors[j + 1] == errors[k]:
            j += 1
        notes.append(f"{'stage' if j == k else 'stages'} {k + 1}{'' if j == k else f'-{j + 1}'}: {errors[k]}")
        k = j + 1
    return notes


def error_summary(results: List[CaseResult]) -> str:
    """"" when no stage reported an error, else one line: how many stages of how many cases did,
    and the first one's error."""
    bad = [(r.name, k, e) for r in results for k, e in enumerate(r.errors) if e]
    if not bad:
        return ""
    name, k, first = bad[0]
    cases = len({b[0] for b in bad})
    ran = sum(sum(r.ran) for r in results)
    return (f"{len(bad)} of {ran} stages ({cases} case{'s' if cases != 1 else ''}) reported errors; "
            f"first ({name}, stage {k + 1}): {first}")


def _cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def write_csv(results: Iterable[CaseResult], path, zero_over_budget: bool = True) -> None:
    """Write ``metrics.csv`` (see module docstring for columns and conventions)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in results:
            writer.writerow({k: _cell(v) for k, v in case_row(r, zero_over_budget).items()})


def _nanmean(values) -> float:
    values = np.asarray(list(values), dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def summary_line(results: List[CaseResult], zero_over_budget: bool = True, mode: str = "") -> str:
    """One line: case count, mean DSC_AUC / NSD_AUC / DSC_Final / NSD_Final (NaN cases skipped),
    cases over budget, stages without output, total predictor time."""
    rows = [_scores(r, zero_over_budget) for r in results]
    means = {k: _nanmean(row[k] for row in rows) for k in ("DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final")}
    over = sum(r.over_budget for r in results)
    missing = sum(r.n_missing for r in results)
    total = sum(r.total_time for r in results)
    head = f"[{mode}] " if mode else ""
    return (f"{head}{len(results)} cases | DSC_AUC {means['DSC_AUC']:.4f} (max 4) | NSD_AUC "
            f"{means['NSD_AUC']:.4f} | DSC_Final {means['DSC_Final']:.4f} | NSD_Final "
            f"{means['NSD_Final']:.4f} | over budget {over} | stages without output {missing} | "
            f"predictor time {total:.1f} s")


KINDS = ((True, "box cases", 0, "box stage"), (False, "no-box cases", 1, "click 1"))


def kind_means(results: List[CaseResult], zero_over_budget: bool = True, final_stage: int = -1) -> dict:
    """Per kind of case (``True``: with boxes, ``False``: without): ``n`` cases, ``start`` (mean
    DSC of the box stage; without boxes the box stage is skipped and the first click stage takes
    its place), ``final`` (mean DSC of stage ``final_stage``, by default the last: DSC_Final; a
    case over budget counts 0 when ``zero_over_budget``, as in ``summary_line``) and ``change``
    (mean of final - start); NaN for a kind without cases. ``final_stage``: the last stage run
    when a run stops early (``CaseResult.dsc`` always holds all six stages, 0 for those not run)."""
    out = {}
    for has_boxes, _, first, _ in KINDS:
        group = [r for r in results if bool(r.has_boxes) == has_boxes]
        final = [0.0 if zero_over_budget and r.over_budget else r.dsc[final_stage] for r in group]
        start = [r.dsc[first] for r in group]
        out[has_boxes] = {"n": len(group), "start": _nanmean(start), "final": _nanmean(final),
                          "change": _nanmean(f - s for f, s in zip(final, start))}
    return out


def split_summary_line(results: List[CaseResult], zero_over_budget: bool = True) -> str:
    """One line per kind of case (``kind_means``): with boxes, mean DSC of the box stage, mean
    DSC_Final and the mean change from the box stage to the last stage; without boxes, the first
    click stage takes the box stage's place. Kinds without cases are left out."""
    means = kind_means(results, zero_over_budget)
    parts = []
    for has_boxes, name, _, first_name in KINDS:
        m = means[has_boxes]
        if m["n"]:
            parts.append(f"{name} {m['n']}: {first_name} DSC {m['start']:.4f} -> DSC_Final "
                         f"{m['final']:.4f} (mean change {m['change']:+.4f})")
    return " | ".join(parts)


def _wrap(text: str) -> str:
    """Break a summary line after its fourth field so that it fits above the figure."""
    parts = text.split(" | ")
    return " | ".join(parts[:4]) + ("\n" + " | ".join(parts[4:]) if len(parts) > 4 else "")


def kind_stage_means(values: np.ndarray, has_boxes) -> dict:
    """Mean per stage over the cases of each kind, NaN skipped: ``{True: (6,) over the cases with
    boxes, False: (6,) over those without (the skipped box stage NaN)}``; a kind without cases is
    left out. Kept apart so that no mean changes its set of cases between stages (one mean over
    all cases would jump at click 1, where the no-box cases join)."""
    values = np.asarray(values, dtype=float).reshape(len(has_boxes), -1)
    boxed = np.asarray(has_boxes, bool)
    out = {}
    for kind, rows in ((True, values[boxed]), (False, values[~boxed])):
        if len(rows):
            with np.errstate(all="ignore"):
                mean = np.array([_nanmean(col) for col in rows.T])
            if not kind:
                mean[0] = np.nan
            out[kind] = mean
    return out


MEAN_STYLES = {True: ("-o", "mean, box cases"), False: ("--s", "mean, no-box cases")}


def plot_stage_scores(ax, results: List[CaseResult], key: str = "dsc", name: str = "DSC") -> None:
    """One report panel: ``key`` ("dsc" or "nsd") per stage, one thin line per case (a skipped box
    stage is not drawn), and in bold black the mean of the box cases and, apart, of the no-box
    cases (``kind_stage_means``), each labelled with its number of cases."""
    import matplotlib.pyplot as plt
    stages = np.arange(1, N_STAGES + 1)
    labels = ["box"] + [f"click {k}" for k in range(1, N_STAGES)]
    cmap = plt.get_cmap("tab10" if len(results) <= 10 else "viridis")
    colors = [cmap(i / max(len(results) - 1, 1)) if len(results) > 10 else cmap(i)
              for i in range(len(results))]
    values = np.array([getattr(r, key) for r in results], dtype=float).reshape(len(results), -1)
    for r, v, c in zip(results, values, colors):
        start = 0 if r.has_boxes else 1  # a skipped box stage is scored 0: not drawn
        ax.plot(stages[start:], v[start:], "-o", color=c, lw=1, ms=3, alpha=0.7,
                label=Path(r.name).stem if len(results) <= 10 else None)
    has_boxes = [bool(r.has_boxes) for r in results]
    for kind, mean in kind_stage_means(values, has_boxes).items():
        style, label = MEAN_STYLES[kind]
        n = sum(h == kind for h in has_boxes)
        start = 0 if kind else 1
        ax.plot(stages[start:], mean[start:], style, color="black", lw=2.5, ms=5, label=f"{label} ({n})")
    ax.axvspan(1.5, N_STAGES + 0.5, color="0.93", zorder=0)
    ax.text(1.6, 0.97, "AUC stages", ha="left", va="top", fontsize=8, color="0.4")
    ax.set(xticks=stages, xticklabels=labels, ylim=(0, 1.02), xlim=(0.5, N_STAGES + 0.5),
           ylabel=name, title=f"{name} per stage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)


def plot_report(results: List[CaseResult], path, title: str = "") -> None:
    """report.png: DSC and NSD per stage (``plot_stage_scores``: one thin line per case, the means
    of box and of no-box cases in bold, apart), time per stage (stacked bar per case with its 90 s x K
    budget), each case's AUCs and final scores, and the click harm (``evaluation.harm``): per step
    position, and per case with the final drop from the best click stage."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["box"] + [f"click {k}" for k in range(1, N_STAGES)]
    names = [Path(r.name).stem for r in results]
    fig, axes = plt.subplots(3, 2, figsize=(14, 13.5), constrained_layout=True)
    fig.suptitle(_wrap(title or f"{len(results)} cases"), fontsize=12)
    for ax, key, name in ((axes[0, 0], "dsc", "DSC"), (axes[0, 1], "nsd", "NSD (2 mm)")):
        plot_stage_scores(ax, results, key, name)

    ax = axes[1, 0]
    times = np.array([r.times for r in results], dtype=float).reshape(len(results), -1)
    budgets = np.array([r.budget_s for r in results], dtype=float)
    x = np.arange(len(results))
    bottom = np.zeros(len(results))
    stage_colors = plt.get_cmap("Blues")(np.linspace(0.35, 0.95, N_STAGES))
    for k in range(N_STAGES):
        ax.bar(x, times[:, k], bottom=bottom, color=stage_colors[k], label=labels[k], width=0.8)
        bottom += times[:, k]
    top = max(float(bottom.max(initial=0)) * 1.25, 1.0)
    shown = budgets <= top
    if shown.any():
        ax.scatter(x[shown], budgets[shown], marker="_", s=600, lw=2, color="red",
                   label="budget 90 s x K", zorder=3)
    for i, r in enumerate(results):
        pct = 100 * r.total_time / r.budget_s if r.budget_s else float("inf")
        ax.text(i, bottom[i], f"{r.total_time:.1f} s\n{pct:.0f}%" + (" OVER" if r.over_budget else ""),
                color="red" if r.over_budget else "black", ha="center", va="bottom", fontsize=7)
    off = "" if shown.all() else f"; budgets ({budgets[~shown].min():.0f} s and up) off scale"
    ax.set(xticks=x, ylim=(0, top * 1.1), ylabel="seconds",
           title=f"time per stage, stacked (label: total, % of budget){off}")
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1, 1]
    rows = [case_row(r) for r in results]
    width = 0.2
    for j, (key, c) in enumerate((("DSC_AUC", "tab:blue"), ("NSD_AUC", "tab:orange"))):
        ax.bar(x + (j - 1.5) * width, [row[key] / 4 for row in rows], width, color=c,
               label=f"{key} / 4")
    for j, (key, c) in enumerate((("DSC_Final", "tab:green"), ("NSD_Final", "tab:red"))):
        ax.bar(x + (j + 0.5) * width, [row[key] for row in rows], width, color=c, label=key)
    for i, r in enumerate(results):
        if r.n_missing:
            ax.text(i, 1.01, f"{r.n_missing} missing", color="red", ha="center", fontsize=7)
    ax.set(xticks=x, ylim=(0, 1.08), title="per case: AUC (scaled to 0..1) and final scores")
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.legend(fontsize=7, ncol=4, loc="lower center")
    ax.grid(axis="y", alpha=0.3)

    draw_harm_panels(axes[2, 0], axes[2, 1], results)
    fig.savefig(path, dpi=110)
    plt.close(fig)
