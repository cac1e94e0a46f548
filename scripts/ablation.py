"""Ablation: the evaluation (warm mode) of one folder of cases under several predictor configurations.

    python -m scripts.ablation --cases DIR [--gts DIR] --out DIR [--weights PATH] [--device cpu]
                               [--config NAME="--flag value ..."]... [--limit N] [--pictures]

``--cases DIR``: a folder written by ``scripts.heldout`` or ``scripts.synthetic --layout val``
(``DIR/images`` and ``DIR/gts``), or a folder of image files with ``--gts`` (or with their own
``gts``). Each configuration is a name and ``python -m infer`` options; it runs as

    python -m evaluation --images ... --gts ... --out OUT/<name> --warm --weights ... \\
        --no-pictures --predict-arg="<options>"

(one process per configuration, the predictor loaded once in it), and gives one row of a markdown
table written to ``OUT/ablation.md`` and printed:

- ``DSC_AUC``, ``NSD_AUC``, ``DSC_Final``: means over cases of ``metrics.csv``; ``final (box)``
  and ``final (no-box)``: the mean ``DSC_Final`` of the cases with boxes and of those without;
- ``click harm``: pooled share of class steps whose Dice dropped by more than 0.05
  (``evaluation.harm``: sum of ``HarmfulSteps`` / sum of ``ClickSteps``);
- ``max final drop``: largest ``FinalDropFromBest`` (best click-stage DSC minus final DSC);
- ``box DSC``: mean ``DSC_1`` over the cases with boxes;
- ``seconds``: wall time of the configuration's evaluation process (start-up included).

Without ``--config``, the configurations are :func:`default_configs`: the predictor as it is,
``--no-refine``, ``--no-autozoom``, and ``--policy reference`` / ``--policy project`` when
``python -m infer --help`` lists ``--policy``.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLE_COLUMNS = ("config", "options", "DSC_AUC", "NSD_AUC", "DSC_Final", "final (box)",
                 "final (no-box)", "click harm", "max final drop", "box DSC", "seconds")


def infer_accepts(flag: str, python: str = sys.executable) -> bool:
    """Whether ``python -m infer --help`` lists ``flag``."""
    out = subprocess.run([python, "-m", "infer", "--help"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300)
    return out.returncode == 0 and flag in out.stdout.split()  # whole tokens: not --policy-x


def default_configs(has_policy: bool) -> List[Tuple[str, str]]:
    """(name, options) of the default ablation; the policy presets only when ``has_policy``."""
    configs = [("default", ""), ("no-refine", "--no-refine"), ("no-autozoom", "--no-autozoom")]
    if has_policy:
        configs += [("policy-reference", "--policy reference"), ("policy-project", "--policy project")]
    return configs


def parse_config(text: str) -> Tuple[str, str]:
    """``NAME=OPTIONS`` -> (NAME, OPTIONS); NAME must be a plain folder name."""
    name, sep, options = text.partition("=")
    name = name.strip()
    if not sep or not name or any(c in name for c in "/\\ ") or name in (".", ".."):
        raise ValueError(f"--config takes NAME=\"--flag value ...\", not {text!r}")
    return name, options.strip()


def _float(v: str) -> float:
    return float(v) if v not in ("", None) else math.nan


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def table_row(rows: List[Dict[str, str]]) -> Dict[str, float]:
    """The table's numbers from the rows of one configuration's ``metrics.csv``."""
    harmful = sum(int(r["HarmfulSteps"]) for r in rows)
    steps = sum(int(r["ClickSteps"]) for r in rows)
    drops = [_float(r["FinalDropFromBest"]) for r in rows]
    drops = [d for d in drops if not math.isnan(d)]
    boxed = [r for r in rows if r["HasBoxes"] == "True"]
    nobox = [r for r in rows if r["HasBoxes"] != "True"]
    return {"DSC_AUC": _mean([_float(r["DSC_AUC"]) for r in rows]),
            "NSD_AUC": _mean([_float(r["NSD_AUC"]) for r in rows]),
            "DSC_Final": _mean([_float(r["DSC_Final"]) for r in rows]),
            "final (box)": _mean([_float(r["DSC_Final"]) for r in boxed]),
            "final (no-box)": _mean([_float(r["DSC_Final"]) for r in nobox]),
            "click harm": harmful / steps if steps else math.nan,
            "harm counts": f"{harmful}/{steps}",
            "max final drop": max(drops) if drops else math.nan,
            "box DSC": _mean([_float(r["DSC_1"]) for r in boxed]),
            "cases": len(rows)}


def markdown_table(entries: List[dict]) -> str:
    """Markdown table of ``{"config", "options", "seconds", "row" (table_row or None), "error"}``."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for e in entries:
        opts = f"`{e['options']}`" if e["options"] else "(none)"
        row = e.get("row")
        if row is None:
            cells = ([e["config"], opts, f"failed: {e.get('error', '')}"] + [""] * (len(TABLE_COLUMNS) - 4)
                     + [f"{e['seconds']:.0f}"])
        else:
            cells = [e["config"], opts, f"{row['DSC_AUC']:.4f}", f"{row['NSD_AUC']:.4f}",
                     f"{row['DSC_Final']:.4f}", f"{row['final (box)']:.4f}", f"{row['final (no-box)']:.4f}",
                     f"{100 * row['click harm']:.1f}% ({row['harm counts']})",
                     f"{row['max final drop']:.4f}", f"{row['box DSC']:.4f}", f"{e['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_config(name: str, options: str, images: Path, gts: Optional[Path], out: Path, weights: str,
               device: Optional[str], limit: Optional[int], pictures: bool) -> dict:
    """One configuration's evaluation (a subprocess, warm mode); returns its table entry."""
    cmd = [sys.executable, "-m", "evaluation", "--images", str(images), "--out", str(out / name),
           "--warm", "--weights", str(weights)]
    cmd += ["--gts", str(gts)] if gts else []
    cmd += ["--device", device] if device else []
    cmd += ["--limit", str(limit)] if limit else []
    cmd += [] if pictures else ["--no-pictures"]
    cmd += [f"--predict-arg={options}"] if options else []
    # idle OpenMP threads sleep rather than spin, as python -m infer sets for itself (a warm
    # evaluation never imports infer.__main__); an explicit setting in the environment wins
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / "evaluation.log").write_text(proc.stdout + proc.stderr)
    entry = {"config": name, "options": options, "seconds": seconds, "row": None}
    metrics = out / name / "metrics.csv"
    if proc.returncode != 0 or not metrics.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        entry["error"] = f"exit {proc.returncode}: {last[:120]}"
        return entry
    with open(metrics, newline="") as f:
        entry["row"] = table_row(list(csv.DictReader(f)))
    return entry


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.ablation", description=__doc__.split("\n")[0])
    p.add_argument("--cases", required=True, type=Path, help="folder with images/ and gts/, or of images")
    p.add_argument("--gts", type=Path, help="ground-truth folder (default CASES/gts when it exists)")
    p.add_argument("--out", required=True, type=Path, help="OUT/<config>/ per configuration, OUT/ablation.md")
    p.add_argument("--weights", default=str(REPO_ROOT / "weights" / "demo"),
                   help="model folder (default: the bundled weights/demo)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present, else cpu")
    p.add_argument("--config", action="append", metavar='NAME="OPTIONS"',
                   help="a configuration: name and python -m infer options (repeatable; default: "
                        "the built-in list)")
    p.add_argument("--limit", type=int, help="only the first N cases (default: all)")
    p.add_argument("--pictures", action="store_true", help="also draw OUT/<config>/cases/*.png")
    a = p.parse_args(argv)
    images = a.cases / "images" if (a.cases / "images").is_dir() else a.cases
    gts = a.gts or (a.cases / "gts" if (a.cases / "gts").is_dir() else None)
    try:
        configs = [parse_config(c) for c in a.config] if a.config else default_configs(infer_accepts("--policy"))
    except ValueError as exc:
        p.error(str(exc))
    names = [n for n, _ in configs]
    if len(set(names)) != len(names):
        p.error(f"configuration names repeat: {names}")
    a.out.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, options in configs:
        print(f"[{len(entries) + 1}/{len(configs)}] {name}: {options or '(no options)'}", flush=True)
        entries.append(run_config(name, options, images, gts, a.out, a.weights, a.device, a.limit,
                                  a.pictures))
    n_cases = max((e["row"]["cases"] for e in entries if e["row"]), default=0)
    table = (f"Ablation on {images} ({n_cases} cases), weights {a.weights}, warm mode; click harm = "
             f"share of class steps with a Dice drop > 0.05.\n\n" + markdown_table(entries) + "\n")
    (a.out / "ablation.md").write_text(table)
    print(table)
    print(f"wrote {a.out / 'ablation.md'}")
    return 0 if all(e["row"] for e in entries) else 1


if __name__ == "__main__":
    sys.exit(main())
