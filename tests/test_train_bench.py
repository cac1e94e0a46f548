"""``python -m scripts.train_bench`` on the demo configuration (CPU, a few steps): every figure is
in its JSON and the figures agree with each other; ``--help`` has no side effects; v1.0 is refused
on a CPU. Not a timing test: no duration is compared with a bound. Figures: docs/TRAINING.md.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infer.weights import load_model
from scripts import train_bench

ROOT = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "scripts.train_bench", *args], cwd=str(cwd), env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_help_exits_0_and_writes_nothing(tmp_path):
    r = _run(["--help"], tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--epoch-examples" in r.stdout and "--json" in r.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU-only machines")
def test_v10_is_refused_on_cpu_without_force(tmp_path):
    r = _run(["--config", "v1.0", "--json", str(tmp_path / "b.json")], tmp_path, timeout=120)
    assert r.returncode == 2
    assert "needs a GPU" in r.stderr and "--force" in r.stderr
    assert not (tmp_path / "b.json").exists()


def test_projection_arithmetic():
    # 500 examples in batches of 2: 250 steps; 501: 251 (the last one partial)
    assert train_bench.epoch_projection(500, 2, 1.5)["steps"] == 250
    p = train_bench.epoch_projection(501, 2, 1.5)
    assert p["steps"] == 251 and p["projected_s"] == pytest.approx(376.5)
    # 2 examples/s per worker, batch 2: 7 workers on 8 cores give 14 examples/s, one batch per 1/7 s
    lim = train_bench.data_limits(2.0, 2, cores=(8,))["8"]
    assert lim["workers"] == 7 and lim["examples_per_s"] == pytest.approx(14.0)
    assert lim["min_step_s"] == pytest.approx(1 / 7)
    # a 0.25 s step of batch 2 needs 8 examples/s: 4 workers at 2 examples/s
    assert train_bench.workers_needed(2.0, 2, 0.25) == pytest.approx(4.0)


@pytest.mark.slow
def test_demo_on_cpu_reports_consistent_figures(tmp_path):
    out = tmp_path / "bench.json"
    r = _run(["--config", "demo", "--device", "cpu", "--cases", "2", "--shape", "32,48,48",
              "--data-examples", "6", "--steps", "2", "--loop-steps", "3", "--workers", "1",
              "--epoch-examples", "37", "--batch-size", "2", "--threads", "1", "--torchrun", "on",
              "--json", str(out)],
             tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(out.read_text())
    assert rep["config"] == "demo" and rep["machine"]["device"] == "cpu"
    assert rep["model"]["patch"] == [32, 32, 32]
    net, _ = load_model(ROOT / "weights" / "demo")
    assert rep["model"]["parameters"] == sum(p.numel() for p in net.parameters())
    assert rep["cases"] == {**rep["cases"], "n": 2, "shape": [32, 48, 48]}

    d = rep["data"]
    assert d["examples"] == 6 and 0 <= d["deferred"] <= 6
    assert d["deferred_share"] == pytest.approx(d["deferred"] / 6)
    assert d["worker_s_per_example"] > 0
    assert d["examples_per_s_per_worker"] == pytest.approx(6 / d["worker_s_total"])
    assert d["examples_per_cpu_s"] == pytest.approx(6 / d["worker_cpu_s_total"])
    assert d["worker_cpu_s_total"] > 0
    n_fin = 6 - d["deferred"]
    parts = ((d["worker_s_per_finished"] or 0) * n_fin + (d["worker_s_per_deferred"] or 0) * d["deferred"])
    assert parts == pytest.approx(d["worker_s_total"])
    cpu_parts = ((d["worker_cpu_s_per_finished"] or 0) * n_fin
                 + (d["worker_cpu_s_per_deferred"] or 0) * d["deferred"])
    assert cpu_parts == pytest.approx(d["worker_cpu_s_total"])
    assert (d["finish_s_per_deferred"] is None) == (d["deferred"] == 0)

    s = rep["step"]
    assert s["batch"] == 2 and s["steps"] == 2 and s["amp_fp16"] is False
    assert 0 < s["step_s_min"] <= s["step_s_median"] <= s["step_s_max"]

    lp = rep["loop"]
    assert lp["workers"] == 1 and lp["steps"] == 2  # the first of 3 left out
    assert lp["wait_s_mean"] >= 0 and lp["step_s_mean"] > 0
    assert 0 <= lp["wait_share"] <= 1
    assert lp["wait_share"] == pytest.approx(lp["wait_s_mean"] / (lp["wait_s_mean"] + lp["step_s_mean"]))

    e = rep["epoch"]
    steps = -(-37 // 2)  # 19 steps of batch 2 cover 37 examples
    assert e["steps"] == steps == 19
    assert e["projected_s"] == pytest.approx(steps * (lp["wait_s_mean"] + lp["step_s_mean"]))

    m = rep["memory"]
    assert m["kind"] == "cpu_peak_rss_main_process" and m["peak_bytes"] > 50 * 2 ** 20

    for c in ("8", "16"):
        lim = rep["data_limits"][c]
        assert lim["workers"] == int(c) - 1
        assert lim["min_step_s"] == pytest.approx(2 / ((int(c) - 1) * d["examples_per_cpu_s"]))
    assert rep["workers_needed"] == pytest.approx(2 / (s["step_s_median"] * d["examples_per_cpu_s"]))
    # without a GPU, --torchrun on launches one CPU process: the command line works (several
    # GPUs, the case it is for, cannot be tried here)
    tr = rep["torchrun"]
    assert tr["returncode"] == 0, tr["stderr_tail"]
    assert tr["processes"] == 1 and tr["steps"] == 3 and tr["global_batch"] == 2

    for needle in ("examples/s", "wait share", "projected epoch of 37 examples: 19 steps", "peak memory"):
        assert needle in r.stdout, needle
