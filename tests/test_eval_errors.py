"""When stages fail, the evaluation says why: the first error line of each stage's predictor output
goes into the case's Notes, and the summary names the first one and points to predict.log."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluation.report import error_notes, error_summary
from evaluation.runner import ColdRunner, CaseResult, first_error_line

ROOT = Path(__file__).resolve().parents[1]

# What python -m infer printed for --device cuda on a machine without CUDA (every case fell back
# to zeros, exit status 0).
CUDA_LOG = """infer: cannot load weights from /w: AssertionError: Torch not compiled with CUDA enabled
infer: model ready on - after 2.63 s
infer: c.npz: RuntimeError: no model loaded
infer: c.npz: fallback (previous mask or zeros), K=3, shape 48x80x80 uint8, labels up to 0, 0.01 s
infer: done: 1 case(s), 1 problem(s), 2.63 s in all
"""
GOOD_LOG = """infer: model ready on cpu after 2.68 s
infer: c.npz: segmented, K=3, shape 48x80x80 uint8, labels up to 3, 0.22 s
infer: done: 1 case(s), 0 problem(s), 2.90 s in all
"""
TRACEBACK = """Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/x/infer/__main__.py", line 105, in main
    import torch
    ^^^^^^^^^^^^
ModuleNotFoundError: No module named 'torch'
predict.sh: 'python3' cannot import torch. Set up the project's environment with: bash setup_venv.sh
"""


def test_first_error_line():
    assert first_error_line(CUDA_LOG) == ("infer: cannot load weights from /w: AssertionError: Torch not "
                                          "compiled with CUDA enabled")
    assert first_error_line(GOOD_LOG) is None
    assert first_error_line(TRACEBACK, 1) == "ModuleNotFoundError: No module named 'torch'"
    assert first_error_line("", 127) == "exit status 127 (no output)"
    assert first_error_line("sh: 1: python3: not there\n", 2) == "exit status 2: sh: 1: python3: not there"


def test_error_notes_merge_consecutive_stages():
    assert error_notes([None] * 6) == []
    assert error_notes(["a"] * 6) == ["stages 1-6: a"]
    assert error_notes([None, "a", "a", None, "b", "a"]) == ["stages 2-3: a", "stage 5: b", "stage 6: a"]


def test_error_summary_names_the_first_error():
    ok = CaseResult(name="a.npz", n_classes=1, has_boxes=True, ran=[True] * 6)
    bad = CaseResult(name="b.npz", n_classes=1, has_boxes=True, ran=[True] * 6,
                     errors=[None, "boom", "boom", None, None, "bang"])
    assert error_summary([ok]) == ""
    assert error_summary([ok, bad]) == "3 of 12 stages (1 case) reported errors; first (b.npz, stage 2): boom"


def _stub_predict_sh(tmp_path, zeros: Path) -> Path:
    """A predict.sh that prints CUDA_LOG and writes an all-zero output, as the real one does on a
    machine without CUDA when given --device cuda."""
    log = tmp_path / "stage.log"
    log.write_text(CUDA_LOG)
    script = tmp_path / "predict.sh"
    script.write_text('#!/bin/sh\ncat "%s" >&2\nfor f in "$INFER_INPUTS"/*.npz; do cp "%s" "$INFER_OUTPUTS/$(basename "$f")"; '
                      'done\n' % (log, zeros))
    return script


def test_cold_runner_reports_the_stage_error_and_logs_everything(tmp_path):
    zeros = tmp_path / "zeros.npz"
    np.savez(zeros, segs=np.zeros((4, 4, 4), np.uint8))
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    np.savez(inputs / "c.npz", imgs=np.zeros((4, 4, 4), np.uint8), spacing=np.ones(3))
    runner = ColdRunner(_stub_predict_sh(tmp_path, zeros), log_path=tmp_path / "predict.log")
    runner(inputs, outputs)
    assert runner.last_problem == first_error_line(CUDA_LOG)
    assert (outputs / "c.npz").is_file()
    runner(inputs, outputs)
    assert (tmp_path / "predict.log").read_text() == CUDA_LOG * 2


@pytest.mark.slow
def test_summary_and_notes_say_why_every_stage_scored_zero(tmp_path):
    case = ROOT / "sample_inputs" / "CT_sample_box.npz"
    with np.load(case, allow_pickle=False) as f:
        shape = f["imgs"].shape
    zeros = tmp_path / "zeros.npz"
    np.savez(zeros, segs=np.zeros(shape, np.uint8))
    images = tmp_path / "images"
    images.mkdir()
    (images / case.name).write_bytes(case.read_bytes())
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "evaluation", "--images", str(images), "--gts", str(ROOT / "sample_inputs" / "gts"),
           "--out", str(out), "--predict-sh", str(_stub_predict_sh(tmp_path, zeros))]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    want = first_error_line(CUDA_LOG)
    lines = r.stdout.splitlines()
    (summary,) = [l for l in lines if "reported errors" in l]
    assert summary.startswith("6 of 6 stages (1 case) reported errors")
    assert want in summary and str(out / "predict.log") in summary
    with open(out / "metrics.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["DSC_Final"]) == 0.0
    assert row["Notes"] == f"stages 1-6: {want}"
