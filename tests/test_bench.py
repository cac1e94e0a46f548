"""``python -m scripts.bench`` runs end to end on a tiny model and prints every row it names; the
shared synthetic case builder writes valid cases; the runtime package holds no benchmark code.

Not a timing test: nothing here compares durations. The figures themselves are in
docs/PERFORMANCE.md.
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scripts import bench
from scripts.cases import make_case
from tests.tinymodel import make_artifact

ROOT = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.mark.slow
def test_bench_runs_end_to_end_and_prints_every_row(tmp_path):
    weights = make_artifact(tmp_path / "tiny")
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "scripts.bench", "--weights", str(weights), "--classes", "2",
           "--shape", "20,40,40", "--repeats", "1", "--warm", "1", "--write-shape", "4,8,8",
           "--stage", "click", "--json", str(out_json)]
    r = subprocess.run(cmd, cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    for _, label in bench.ROWS + bench.COLD_ROWS:
        assert any(l.startswith(label) for l in lines), f"row {label!r} missing:\n{r.stdout}"
    assert bench.WRITE_LABEL.format(shape="4x8x8") in r.stdout
    assert "machine:" in r.stdout and "K=2" in r.stdout

    data = json.loads(out_json.read_text())
    probe, cold = data["probe"]["2"], data["cold"]["2"]
    assert probe["classes"] == 2 and probe["passes"] >= 1
    for key in ("interpreter", "import_torch", "import_infer", "weights", "npz_read", "forward", "total"):
        assert probe[key] > 0, key
    assert probe["exit"] >= probe["total"]
    assert cold["bare"] > 0 and cold["stage"] > 0 and cold["ratio"] > 0
    assert data["write"]["median"] > 0


@pytest.mark.slow
def test_probe_counts_every_network_pass(tmp_path):
    # The probe's hooks see each forward pass: a network that records its calls is the reference.
    from scripts import bench_probe
    weights = make_artifact(tmp_path / "tiny")
    case = make_case(tmp_path / "c.npz", (16, 32, 32), 2, stage="box")
    out = bench_probe.main({"case": str(case), "weights": str(weights), "device": "cpu", "warm": 1,
                            "output": str(tmp_path / "out.npz")})
    assert len(out["runs"]) == 2 and (tmp_path / "out.npz").is_file()
    cold = out["runs"][0]
    assert cold["k"] == 2 and cold["calls"] >= 2  # at least one pass per class
    assert 0 < cold["net"] <= cold["predict"]


@pytest.mark.parametrize("stage", ["box", "click"])
def test_make_case_is_a_valid_case(tmp_path, stage):
    from infer.npz import read_case
    from infer.case import Case
    path = make_case(tmp_path / "c.npz", (12, 24, 20), 3, stage=stage)
    case = read_case(path)
    assert case["imgs"].shape == (12, 24, 20) and case["imgs"].dtype == np.uint8
    parsed = Case.from_mapping(case)
    assert parsed.num_classes == 3
    r = max(2, 12 // (4 + 3))
    for k in (1, 2, 3):
        p = parsed.prompts(k, "2d")
        assert p.box is not None and not p.done
        (z0, y0, x0), (z1, y1, x1) = p.extent  # half-open
        if stage == "box":
            assert case.get("prev_pred") is None and not p.clicks
            continue
        assert case["prev_pred"].shape == (12, 24, 20)
        (fg, (z, y, x)), (bg, (bz, by, bx)) = p.clicks
        assert fg and not bg
        assert z0 <= z < z1 and y0 <= y < y1 and x0 <= x < x1
        # the foreground click is the sphere's bright centre; the background click lies outside it
        assert case["imgs"][z, y, x] >= 100 and case["prev_pred"][z, y, x] == k
        assert (bz - z) ** 2 + (by - y) ** 2 + (bx - x) ** 2 > r * r


def test_demo_configuration_comes_from_train_configs(tmp_path):
    # Without weights/demo the benchmark builds the demo configuration of train/configs.py.
    from train.configs import get_config
    demo = get_config("demo")
    path = bench.make_random_artifact(tmp_path / "demo", demo["architecture"], demo["patch_size"])
    text = json.loads((Path(path) / "model_card.json").read_text())
    assert text["patch_size"] == demo["patch_size"]
    assert text["architecture"]["features_per_stage"] == demo["architecture"]["features_per_stage"]


def test_runtime_package_holds_no_benchmark_code():
    # infer/ is what the image ships: no benchmark module, and nothing in it imports scripts/ or tests/.
    names = sorted(p.name for p in (ROOT / "infer").glob("*.py"))
    assert not [n for n in names if "bench" in n], names
    for name in names:
        tree = ast.parse((ROOT / "infer" / name).read_text())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [m for m in mods if m.split(".")[0] in ("scripts", "tests", "train", "evaluation")], \
                (name, mods)
