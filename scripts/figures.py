"""Write the measured figures the docs quote from the measurement files they come from.

    python -m scripts.figures            # rewrite every marked block in README.md and docs/*.md
    python -m scripts.figures --check    # exit 1, naming the blocks, when a doc is not current

A measurement is a file under ``docs/measurements/`` (an evaluation's ``metrics.csv``, copied
as it was written) with an entry in ``docs/measurements/index.json``: its label, the command
that made it, the machine and the date. A doc carries a block between

    <!-- figures:NAME -->
    ...
    <!-- /figures:NAME -->

and this script replaces what lies between the two markers with :data:`BLOCKS` ``[NAME]``
rendered from the measurements. ``tests/test_figures.py`` runs ``--check``: a figure typed by
hand into a block, or a measurement replaced without re-running this script, fails the suite.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List

from scripts.ablation import _float, _mean, table_row

ROOT = Path(__file__).resolve().parents[1]
MEASUREMENTS = ROOT / "docs" / "measurements"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(<!-- figures:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /figures:(?P=name) -->)",
                    re.S)


def load_index(folder: Path = MEASUREMENTS) -> Dict[str, dict]:
    """``index.json``: measurement name -> its entry (``file``, ``label``, ``command``, ...)."""
    return json.loads((folder / "index.json").read_text())


def read_rows(folder: Path, entry: dict) -> List[dict]:
    with open(folder / entry["file"], newline="") as f:
        return list(csv.DictReader(f))


def quality_row(rows: List[dict]) -> dict:
    """The demo-quality figures of one evaluation: :func:`scripts.ablation.table_row` plus the
    first click stage of the cases without boxes (they start there)."""
    row = table_row(rows)
    row["first click (no-box)"] = _mean([_float(r["DSC_2"]) for r in rows if r["HasBoxes"] != "True"])
    row["n box"] = sum(r["HasBoxes"] == "True" for r in rows)
    return row


def box_fill(rows: List[dict]) -> float:
    """Mean Dice of filling each class's box as a 3D block (``scripts.box_baseline``'s CSV) over
    the cases with boxes: the floor a box stage has to beat."""
    return _mean([_float(r["DSC_box3d"]) for r in rows])


def _f(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def demo_quality(folder: Path, index: Dict[str, dict]) -> str:
    """One table row per measurement whose ``table`` is ``demo-quality``."""
    lines = ["| cases | box filled (no model) | box stage -> DSC_Final (box cases) "
             "| 1st click -> DSC_Final (no-box) | DSC_Final | click harm | how |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in index.items():
        if entry.get("table") != "demo-quality":
            continue
        r = quality_row(read_rows(folder, entry))
        box = f"{_f(r['box DSC'])} -> {_f(r['final (box)'])}" if r["n box"] else "n/a"
        nobox = (f"{_f(r['first click (no-box)'])} -> {_f(r['final (no-box)'])}"
                 if r["cases"] > r["n box"] else "n/a")
        fill = (_f(box_fill(read_rows(folder, index[entry["box_fill"]])))
                if entry.get("box_fill") else "n/a")
        lines.append(f"| {entry['label']} ({r['cases']} cases) | {fill} | {box} | {nobox} | "
                     f"{_f(r['DSC_Final'])} | {100 * r['click harm']:.1f} % | {entry['mode']}, "
                     f"[{name}](docs/measurements/{entry['file']}) |")
    return "\n".join(lines) + "\n"


BLOCKS: Dict[str, Callable[[Path, Dict[str, dict]], str]] = {"demo-quality": demo_quality}


def render(text: str, folder: Path, index: Dict[str, dict], doc: Path = ROOT / "README.md") -> str:
    """``text`` with every marked block replaced by its rendering. Links are written relative to
    the repository root and rewritten for a doc under ``docs/``."""
    def one(m):
        name = m.group("name")
        if name not in BLOCKS:
            raise KeyError(f"unknown figures block {name!r}; known: {sorted(BLOCKS)}")
        body = BLOCKS[name](folder, index)
        if Path(doc).resolve().parent == (ROOT / "docs").resolve():
            body = body.replace("](docs/", "](")
        return m.group(1) + body + m.group(4)
    return _BLOCK.sub(one, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.figures", description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a doc is not current")
    args = ap.parse_args(argv)
    index = load_index()
    stale = []
    for doc in DOCS:
        text = doc.read_text()
        new = render(text, MEASUREMENTS, index, doc)
        if new != text:
            stale.append(doc.relative_to(ROOT))
            if not args.check:
                doc.write_text(new)
    verb = "not current" if args.check else "rewritten"
    for d in stale:
        print(f"{verb}: {d}")
    if args.check and stale:
        print("run: python -m scripts.figures", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
