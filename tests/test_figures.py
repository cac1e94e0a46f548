"""scripts/figures.py: the docs' measured figures come from docs/measurements/ and are current."""
import csv
import json

import pytest

from scripts import figures

FIELDS = ["CaseName", "DSC_AUC", "NSD_AUC", "DSC_Final", "DSC_1", "DSC_2", "HasBoxes",
          "HarmfulSteps", "ClickSteps", "FinalDropFromBest"]


def _write(folder, rows):
    folder.mkdir(exist_ok=True)
    with open(folder / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(dict(zip(FIELDS, r)))
    with open(folder / "fill.csv", "w", newline="") as f:  # box filled as a 3D block, 2 box cases
        f.write("CaseName,num_class,DSC_box3d,DSC_box2d\na,1,0.40,0.1\nb,2,0.50,0.2\n")
    index = {"toy": {"file": "m.csv", "label": "toy set", "table": "demo-quality", "mode": "cold",
                     "box_fill": "fill"},
             "fill": {"file": "fill.csv", "label": "fill", "table": None, "mode": "no model"}}
    (folder / "index.json").write_text(json.dumps(index))
    return figures.load_index(folder)


ROWS = [  # two box cases, one without boxes (its box stage is not run: DSC_1 = 0)
    ("a", 3.0, 2.9, 0.80, 0.60, 0.70, "True", 1, 10, 0.0),
    ("b", 3.2, 3.0, 0.90, 0.70, 0.80, "True", 0, 10, 0.0),
    ("c", 2.0, 1.9, 0.50, 0.00, 0.30, "False", 1, 8, 0.1),
]


def test_quality_row_by_hand(tmp_path):
    index = _write(tmp_path, ROWS)
    r = figures.quality_row(figures.read_rows(tmp_path, index["toy"]))
    assert r["box DSC"] == pytest.approx(0.65)            # (0.60 + 0.70) / 2, box cases only
    assert r["final (box)"] == pytest.approx(0.85)        # (0.80 + 0.90) / 2
    assert r["first click (no-box)"] == pytest.approx(0.30)
    assert r["final (no-box)"] == pytest.approx(0.50)
    assert r["DSC_Final"] == pytest.approx(2.2 / 3)
    assert r["click harm"] == pytest.approx(2 / 28)       # pooled: (1 + 0 + 1) / (10 + 10 + 8)


def test_render_replaces_only_the_block_and_fixes_links_for_docs(tmp_path):
    index = _write(tmp_path, ROWS)
    text = "intro\n<!-- figures:demo-quality -->\nold 0.99\n<!-- /figures:demo-quality -->\noutro\n"
    top = figures.render(text, tmp_path, index, figures.ROOT / "README.md")
    assert top.startswith("intro\n<!-- figures:demo-quality -->\n| cases |")
    assert top.endswith("<!-- /figures:demo-quality -->\noutro\n") and "old 0.99" not in top
    assert "| toy set (3 cases) | 0.450 | 0.650 -> 0.850 | 0.300 -> 0.500 | 0.733 | 7.1 % | cold, " in top
    assert "](docs/measurements/m.csv)" in top
    inner = figures.render(text, tmp_path, index, figures.ROOT / "docs" / "FIGURES.md")
    assert "](measurements/m.csv)" in inner and "](docs/" not in inner
    assert figures.render(top, tmp_path, index) == top  # rendering is a fixed point
    with pytest.raises(KeyError):
        figures.render("<!-- figures:nope -->\n<!-- /figures:nope -->", tmp_path, index)


def test_the_docs_carry_the_current_figures(capsys):
    assert figures.main(["--check"]) == 0, capsys.readouterr().out


def test_every_measurement_file_is_indexed_and_present():
    index = figures.load_index()
    files = {e["file"] for e in index.values()}
    on_disk = {p.name for p in figures.MEASUREMENTS.iterdir() if p.name != "index.json"}
    assert files == on_disk
    for e in index.values():
        assert {"label", "command", "machine", "date", "mode"} <= set(e)
