"""Paired per-case differences between evaluation runs, with a bootstrap interval.

    python -m scripts.paired BASE/metrics.csv OTHER/metrics.csv [...] [--metric DSC_Final ...]
                             [--resamples 10000] [--seed 0]
    python -m scripts.paired --ablation ABLATION_OUT --base default [--metric ...]

Each OTHER run is compared with BASE on the cases both scored (matched by ``CaseName``): per case
the difference OTHER - BASE of each ``--metric`` (default ``DSC_AUC`` and ``DSC_Final``), then the
mean difference, a 95 % percentile bootstrap interval of that mean (cases resampled with
replacement, ``--resamples`` times, seeded), and how many cases got better / worse / stayed equal
(|difference| <= 1e-4). An interval that holds 0 means the run cannot tell the two apart on these
cases. ``--ablation DIR`` takes every ``DIR/<config>/metrics.csv`` written by
``scripts.ablation``, ``--base`` naming the configuration compared against. Prints a markdown
table.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

EQUAL = 1e-4


def read_metrics(path) -> Dict[str, Dict[str, float]]:
    """CaseName -> {column: float} of a ``metrics.csv`` (cells that are not numbers left out)."""
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            values = {}
            for k, v in row.items():
                try:
                    values[k] = float(v)
                except (TypeError, ValueError):
                    pass
            out[row["CaseName"]] = values
    return out


def bootstrap_mean_ci(diffs: Sequence[float], resamples: int = 10000, seed: int = 0,
                      level: float = 0.95) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs`` (cases resampled with replacement)."""
    d = np.asarray(diffs, float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def compare(base: Dict[str, Dict[str, float]], other: Dict[str, Dict[str, float]], metric: str,
            resamples: int = 10000, seed: int = 0) -> dict:
    """Paired differences other - base of ``metric`` over the cases both hold (NaN cells dropped)."""
    cases = sorted(c for c in set(base) & set(other)
                   if not math.isnan(base[c].get(metric, math.nan)) and not math.isnan(other[c].get(metric, math.nan)))
    diffs = np.array([other[c][metric] - base[c][metric] for c in cases])
    if len(diffs) == 0:
        return {"n": 0, "mean": math.nan, "ci": (math.nan, math.nan), "better": 0, "worse": 0, "equal": 0}
    return {"n": len(diffs), "mean": float(diffs.mean()), "ci": bootstrap_mean_ci(diffs, resamples, seed),
            "better": int((diffs > EQUAL).sum()), "worse": int((diffs < -EQUAL).sum()),
            "equal": int((np.abs(diffs) <= EQUAL).sum())}


def table(base_name: str, runs: List[Tuple[str, Dict]], base: Dict, metrics: Sequence[str],
          resamples: int, seed: int) -> str:
    lines = ["| run | metric | cases | mean difference vs " + base_name + " | 95 % bootstrap interval | better / worse / equal |",
             "|---|---|---|---|---|---|"]
    for name, run in runs:
        for m in metrics:
            r = compare(base, run, m, resamples, seed)
            lines.append(f"| {name} | {m} | {r['n']} | {r['mean']:+.4f} | [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}] | "
                         f"{r['better']} / {r['worse']} / {r['equal']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.paired", description=__doc__.split("\n\n")[0])
    p.add_argument("csvs", nargs="*", type=Path, help="BASE metrics.csv, then the runs compared with it")
    p.add_argument("--ablation", type=Path, help="a scripts.ablation output folder (DIR/<config>/metrics.csv)")
    p.add_argument("--base", default="default", help="with --ablation: the configuration compared against")
    p.add_argument("--metric", action="append", help="metrics.csv column (repeatable; default DSC_AUC, DSC_Final)")
    p.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    a = p.parse_args(argv)
    metrics = a.metric or ["DSC_AUC", "DSC_Final"]
    if a.ablation:
        found = {c.parent.name: c for c in sorted(a.ablation.glob("*/metrics.csv"))}
        if a.base not in found:
            p.error(f"no {a.ablation}/{a.base}/metrics.csv (configurations: {sorted(found)})")
        base_name, base = a.base, read_metrics(found[a.base])
        runs = [(n, read_metrics(c)) for n, c in found.items() if n != a.base]
    else:
        if len(a.csvs) < 2:
            p.error("give BASE and at least one other metrics.csv, or --ablation DIR")
        base_name, base = str(a.csvs[0].parent.name or a.csvs[0]), read_metrics(a.csvs[0])
        runs = [(str(c.parent.name or c), read_metrics(c)) for c in a.csvs[1:]]
    print(table(base_name, runs, base, metrics, a.resamples, a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
