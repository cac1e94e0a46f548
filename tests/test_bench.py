"""``python -m infer.bench`` runs end to end on a tiny model and prints every row it names.

Not a timing test: nothing here compares durations. The figures themselves are in
docs/PERFORMANCE.md.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from infer import bench
from tests.tinymodel import make_artifact

ROOT = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_bench_runs_end_to_end_and_prints_every_row(tmp_path):
    weights = make_artifact(tmp_path / "tiny")
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "infer.bench", "--weights", str(weights), "--classes", "2",
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
    assert probe["classes_run"] == 2 and probe["passes"] >= 1
    for key in ("interpreter", "import_torch", "import_infer", "weights", "npz_read", "forward", "total"):
        assert probe[key] > 0, key
    assert probe["exit"] >= probe["total"]
    assert cold["bare"] > 0 and cold["stage"] > 0 and cold["ratio"] > 0
    assert data["write"]["median"] > 0


def test_make_case_is_a_valid_case(tmp_path):
    from infer.io import read_case
    from infer.prompts import class_prompts, num_classes
    path = bench.make_case(tmp_path / "c.npz", (12, 24, 20), 3, stage="click")
    case = read_case(path)
    assert case["imgs"].shape == (12, 24, 20) and case["imgs"].dtype == np.uint8
    assert num_classes(case) == 3 and case["prev_pred"].shape == (12, 24, 20)
    for k in (1, 2, 3):
        p = class_prompts(case, k, "2d")
        assert p.box is not None and len(p.clicks) == 1 and p.clicks[0][0] and not p.done
        (z0, y0, x0), (z1, y1, x1) = p.extent
        z, y, x = p.clicks[0][1]
        assert z0 <= z < z1 and y0 <= y < y1 and x0 <= x < x1


def test_python_m_infer_does_not_import_the_benchmark(tmp_path):
    weights = make_artifact(tmp_path / "tiny")
    inputs = tmp_path / "in"
    inputs.mkdir()
    bench.make_case(inputs / "c.npz", (16, 32, 32), 1)
    code = ("import sys, infer.__main__ as m; m.main(sys.argv[1:]); "
            "print('BENCH_IMPORTED' if 'infer.bench' in sys.modules else 'BENCH_NOT_IMPORTED')")
    r = subprocess.run([sys.executable, "-c", code, "--inputs", str(inputs), "--outputs", str(tmp_path / "out"),
                        "--weights", str(weights), "--device", "cpu"],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "BENCH_NOT_IMPORTED" in r.stdout
    assert (tmp_path / "out" / "c.npz").is_file()
