"""scripts/gpu_check.py on the CPU: its pure parts against hand-computed values, the predictor's
real out-of-memory log lines, the no-CUDA exit, and one small end-to-end ``--allow-cpu`` run.

No timing is asserted; the GPU figures come from running the script on a CUDA host
(docs/GPU_CHECK.md).
"""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import infer.predictor
from infer.card import ModelCard
from infer.npz import read_case
from infer.predictor import Predictor
from infer.case import Case, num_classes
from infer.weights import load_model
from scripts import gpu_check as gc
from tests.tinymodel import tiny_arch

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


# ------------------------------------------------------------------ versions, driver, GPU class
def test_driver_version_from_nvidia_smi_and_proc():
    assert gc.driver_from_text("570.86.15\n") == "570.86.15"
    proprietary = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024\n"
                   "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    open_kernel = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build\n"
    assert gc.driver_from_text(proprietary) == "535.183.01"
    assert gc.driver_from_text(open_kernel) == "580.65.06"
    assert gc.driver_from_text("") is None and gc.driver_from_text("No devices were found") is None


def test_driver_requirements_follow_nvidias_minor_version_compatibility_table():
    # CUDA 12.x: >= 525.60.13; CUDA 13.x: >= 580.65.06 (Linux, CUDA toolkit release notes)
    assert gc.driver_supports("525.60.13", "12.8") is True
    assert gc.driver_supports("525.60.12", "12.8") is False
    assert gc.driver_supports("570.86.15", "12.8") is True
    assert gc.driver_supports("570.86.15", "13.0") is False
    assert gc.driver_supports("580.65.06", "13.0") is True
    assert gc.driver_supports("1000.1", "13.0") is True  # compares numbers, not strings
    assert gc.driver_supports(None, "12.8") is None and gc.driver_supports("570.1", None) is None


def test_gpu_class():
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA GH200 480GB", "NVIDIA H800"):
        assert gc.gpu_class(name) == "H100-class", name
    for name in ("NVIDIA A100-SXM4-80GB", "Tesla T4", "NVIDIA GeForce RTX 4090", "NVIDIA L40S", None):
        assert gc.gpu_class(name) == "other", name


def test_image_flavour_matches_version_and_cuda_of_the_requirements_files():
    assert gc.image_flavour("2.8.0+cu128", "12.8") == "requirements-image-cu12.txt"
    assert gc.image_flavour("2.13.0+cu130", "13.0") == "requirements-image.txt"
    assert gc.image_flavour("2.13.0+cpu", None) is None  # the same version, but the CPU build
    assert gc.image_flavour("2.8.0+cu126", "12.6") == "requirements-image-cu12.txt"
    assert gc.image_flavour("2.9.1+cu128", "12.8") is None


def test_no_cuda_line_is_one_line_and_says_why():
    line = gc.no_cuda_line("2.13.0+cu130", "13.0", "570.86.15", "CUDA driver too old")
    assert "\n" not in line and "570.86.15" in line and ">= 580.65.06" in line and "exit 2" in line
    assert "CPU build" in gc.no_cuda_line("2.13.0+cpu", None, None)


@pytest.mark.skipif(not NO_CUDA, reason="this host has CUDA")
@pytest.mark.parametrize("via", ["python", "sh"])
def test_without_cuda_one_line_and_exit_2(tmp_path, via):
    out = tmp_path / "report"
    if via == "python":
        cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(out)]
    else:
        cmd = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--python", sys.executable, "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0], lines
    assert not (out / gc.REPORT_NAME).exists()


# ------------------------------------------------------------------ metrics
def test_dice_per_class_by_hand():
    a = np.array([1, 1, 0, 2, 0, 3])
    b = np.array([1, 0, 0, 2, 3, 0])
    d = gc.dice_per_class(a, b, 4)
    # class 1: |A| = 2, |B| = 1, overlap 1 -> 2/3; class 2: identical; class 3: disjoint; 4: absent
    assert d == pytest.approx({1: 2 / 3, 2: 1.0, 3: 0.0, 4: 1.0})
    with pytest.raises(ValueError):
        gc.dice_per_class(a, b[:5], 1)


def test_logit_agreement_by_hand():
    ref = np.array([[3.0, 0.0, 1.0, 0.0], [0.0, 4.0, 0.0, 1.0]])  # argmax 0, 1, 0, 1; norm sqrt(27)
    low = ref.copy()
    low[1, 2] = 1.5  # voxel 2 now argmax 1; error 1.5
    r = gc.logit_agreement(low, ref)
    assert r["rel_l2"] == pytest.approx(1.5 / np.sqrt(27))
    assert r["max_abs"] == pytest.approx(1.5)
    assert r["label_agreement"] == pytest.approx(0.75) and r["finite"]
    low[0, 0] = np.inf
    r = gc.logit_agreement(low, ref)
    assert not r["finite"] and r["label_agreement"] == 0.0


# ------------------------------------------------------------------ OOM ladder log, from the real predictor
class OomNet(torch.nn.Module):
    """Background everywhere; raises a device out-of-memory error on the calls ``oom_calls``."""

    def __init__(self, oom_calls=()):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.oom_calls, self.calls = set(oom_calls), 0

    def forward(self, x):
        self.calls += 1
        if self.calls in self.oom_calls:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB (stub)")
        bg = torch.full_like(x[:, :1], 5.0)
        return torch.cat([bg, -bg], 1)


def _card():
    return ModelCard(architecture=tiny_arch(), input_channels=8, num_classes=2, patch_size=[8, 16, 16])


def _case():
    box = {"z_min": 4, "z_max": 8, "z_mid": 6, "z_mid_y_min": 10, "z_mid_y_max": 30,
           "z_mid_x_min": 10, "z_mid_x_max": 30}
    return {"imgs": np.random.default_rng(0).integers(0, 255, (20, 40, 40), dtype=np.uint8),
            "spacing": (1.0, 1.0, 1.0), "name": "t.npz", "boxes": [box], "clicks": None,
            "clicks_order": None, "prev_pred": None}


def _rungs(caplog, net, fallback=True, monkeypatch=None, case_oom=False):
    caplog.set_level(logging.INFO, logger="infer")
    caplog.clear()
    if case_oom:
        real, calls = infer.predictor.normalize_image, []

        def once(imgs, device, **kw):
            calls.append(1)
            if len(calls) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (stub: the volume does not fit)")
            return real(imgs, device, **kw)
        monkeypatch.setattr(infer.predictor, "normalize_image", once)
    pred = Predictor(net, _card(), "cpu", autozoom=False)
    pred.cpu_fallback = fallback
    segs = pred.predict(_case())
    assert segs.shape == (20, 40, 40)
    return gc.ladder_rungs(pred.events)


def test_ladder_rungs_read_from_the_predictors_events(caplog, monkeypatch):
    # forward fails twice: zoom 1 on the device, then the CPU
    assert _rungs(caplog, OomNet({1, 2})) == ["zoom_1", "cpu_class"]
    # fails once: zoom 1 on the device is enough
    assert _rungs(caplog, OomNet({1})) == ["zoom_1"]
    # no CPU fallback and both device tries fail: the class keeps its previous mask
    assert _rungs(caplog, OomNet({1, 2}), fallback=False) == ["zoom_1", "class_failed"]
    # the whole volume does not fit: the case reruns on the CPU
    assert _rungs(caplog, OomNet(), monkeypatch=monkeypatch, case_oom=True) == ["cpu_case"]
    assert _rungs(caplog, OomNet()) == []


# ------------------------------------------------------------------ generated inputs
def test_make_case_boxes_are_the_balls_bounding_boxes(tmp_path):
    shape = (30, 40, 50)
    path, balls = gc.make_case(tmp_path / "c.npz", shape, 5, seed=3)
    case = read_case(path)
    assert case["imgs"].shape == shape and case["imgs"].dtype == np.uint8
    assert num_classes(case) == 5 and case.get("prev_pred") is None
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    for k, (centre, r) in enumerate(balls, start=1):
        ball = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= r * r
        idx = np.nonzero(ball)
        b = case["boxes"][k - 1]
        assert (b["z_min"], b["z_max"]) == (idx[0].min(), idx[0].max())
        on_mid = np.nonzero(ball[b["z_mid"]])
        assert (b["z_mid_y_min"], b["z_mid_y_max"]) == (on_mid[0].min(), on_mid[0].max())
        assert (b["z_mid_x_min"], b["z_mid_x_max"]) == (on_mid[1].min(), on_mid[1].max())
        assert b["z_mid"] == centre[0]
        p = Case.from_mapping(case).prompts(k, "2d")
        assert p.box is not None and not p.done
    last_centre, last_r = balls[-1]
    last = ((z - last_centre[0]) ** 2 + (y - last_centre[1]) ** 2 + (x - last_centre[2]) ** 2) <= last_r ** 2
    assert (case["imgs"][last] == 100 + (5 * 37) % 150).all()  # drawn last: nothing overwrites it
    anywhere = np.zeros(shape, bool)
    for c, r in balls:
        anywhere |= (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r
    assert case["imgs"][~anywhere].max() < 40  # noise elsewhere
    assert balls[0][1] == int(0.4 * 30)  # class 1 is the large one (its crop is zoomed out)


def test_release_folder_loads_through_the_safe_loader_and_gives_the_same_network(tmp_path):
    torch.manual_seed(0)
    net = gc.random_network(tiny_arch(), background_bias=False)
    root = gc.write_release_folder(tmp_path / "rel", net.state_dict(), net.arch, (16, 32, 32))
    assert {p.name for p in root.iterdir()} == {"plans.json", "dataset.json", "inference_session_class.json", "fold_0"}
    loaded, card = load_model(root)
    assert list(card.patch_size) == [16, 32, 32] and card.click_radius == 4 and card.prompt_decay == 0.9
    x = torch.randn(1, 8, 16, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_random_network_with_background_bias_predicts_background(one_thread):
    net = gc.random_network(tiny_arch(), seed=1)
    with torch.no_grad():
        prob = torch.softmax(net(gc.forward_input((16, 32, 32), "cpu")), 1)[0, 1]
    assert float(prob.max()) < 0.01  # each class then takes exactly one forward pass


# ------------------------------------------------------------------ checks, table, settings
def _report(**over):
    secs = {
        "environment": {"status": "ok", "device_conv_ok": True, "device_name": "NVIDIA H100 80GB HBM3"},
        "forward": {"status": "ok", "median_ms": 120.0, "patch": [192, 192, 192], "peak_bytes": 6e9},
        "cold_stage": {"status": "ok", "per_k": {"1": {"stage_median_s": 2.0, "peak_bytes": 7e9},
                                                 "5": {"stage_median_s": 4.9, "peak_bytes": 8e9}}},
        "demo": {"status": "ok", "min_dice": 0.995},
        "fp16": {"status": "ok", "rel_l2": 4e-3, "label_agreement": 0.998},
        "oom_ladder": {"status": "ok", "ok": True},
    }
    for key, val in over.items():
        sec, field = key.split("__")
        secs[sec][field] = val
    return {"mode": "quick", "settings": {"sections": list(gc.SECTIONS)}, "sections": secs}


def test_checks_against_the_targets():
    rep = _report()
    rep["checks"] = gc.evaluate(rep)
    assert all(c["ok"] for c in rep["checks"]) and gc.exit_code(rep) == 0
    names = [c["name"] for c in rep["checks"]]
    assert len(names) == 8
    by = {c["name"]: c for c in rep["checks"]}
    assert by["peak VRAM (forward, cold stages)"]["value"] == pytest.approx(8.0)  # max over forward and K
    for over, failing in [({"forward__median_ms": 150.5}, "forward"),
                          ({"cold_stage__per_k": {"5": {"stage_median_s": 5.2, "peak_bytes": 1e9}}}, "cold stage K=5"),
                          ({"forward__peak_bytes": 10.5e9}, "peak VRAM"),
                          ({"demo__min_dice": 0.98}, "demo model"),
                          ({"fp16__rel_l2": 0.02}, "relative L2"),
                          ({"fp16__label_agreement": 0.97}, "argmax"),
                          ({"oom_ladder__ok": False}, "OOM ladder"),
                          ({"environment__device_conv_ok": False}, "driver"),
                          ({"forward__median_ms": None}, "forward")]:
        rep = _report(**over)
        rep["checks"] = gc.evaluate(rep)
        bad = [c["name"] for c in rep["checks"] if not c["ok"]]
        assert len(bad) == 1 and failing in bad[0], (over, bad)
        assert gc.exit_code(rep) == 1
        assert "MISSED" in gc.format_table(rep)


def test_limits_are_inclusive_and_boundaries_pass():
    rep = _report(forward__median_ms=150.0, cold_stage__per_k={"5": {"stage_median_s": 5.0, "peak_bytes": 10e9}},
                  demo__min_dice=0.99)
    rep["checks"] = gc.evaluate(rep)
    assert all(c["ok"] for c in rep["checks"])


def test_failed_and_skipped_sections():
    rep = _report()
    rep["sections"]["demo"] = {"status": "failed", "error": "RuntimeError: no cases"}
    rep["sections"]["oom_ladder"] = {"status": "skipped", "why": "needs CUDA"}
    rep["checks"] = gc.evaluate(rep)
    names = [c["name"] for c in rep["checks"]]
    assert "section demo ran" in names and not any("OOM" in n for n in names)
    assert gc.exit_code(rep) == 1
    rep["settings"]["sections"] = ["environment", "forward"]  # a partial run checks only those
    names = [c["name"] for c in gc.evaluate(rep)]
    assert len(names) == 3 and any("forward" in n for n in names) and any("VRAM" in n for n in names)


def test_table_lists_every_check_and_the_gpu():
    rep = _report()
    rep["checks"] = gc.evaluate(rep)
    text = gc.format_table(rep)
    for c in rep["checks"]:
        assert c["name"] in text
    assert "NVIDIA H100 80GB HBM3" in text and "120.0 ms" in text and "<= 150 ms" in text
    assert "K=5: stage 4.90 s" in text


def test_settings_per_mode_and_overrides():
    q = gc.mode_settings(gc.parse_args(["--quick"]))
    f = gc.mode_settings(gc.parse_args([]))
    assert q["repeats"] < f["repeats"] and q["iters"] < f["iters"] and q["ladder"] == ["forward", "card16"]
    assert f["ladder"] == ["forward", "case", "card16"] and f["classes"] == [1, 3, 5] and f["shape"] == [300, 512, 512]
    s = gc.mode_settings(gc.parse_args(["--quick", "--repeats", "4", "--sections", "demo,environment"]))
    assert s["repeats"] == 4 and s["sections"] == ["environment", "demo"]  # run order, not given order
    with pytest.raises(SystemExit):
        gc.parse_args(["--sections", "forward,nonsense"])


def test_report_is_written_atomically(tmp_path):
    path = gc.write_report(tmp_path / "out", {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in (tmp_path / "out").iterdir()] == [gc.REPORT_NAME]


# ------------------------------------------------------------------ end to end on the CPU
@pytest.mark.slow
def test_allow_cpu_runs_the_pipeline_end_to_end(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--allow-cpu", "--quick", "--arch", "demo",
           "--shape", "24,48,48", "--classes", "2", "--warmup", "1", "--iters", "1", "--out", str(out),
           "--sections", "environment,weights,forward,cold_stage,demo,fp16"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), env=_env(), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / gc.REPORT_NAME).read_text())
    secs = rep["sections"]
    assert rep["mode"] == "cpu-debug" and rep["exit_code"] == 0
    for name in ("environment", "weights", "forward", "cold_stage", "demo"):
        assert secs[name]["status"] == "ok", (name, secs[name])
    assert secs["fp16"] == {"status": "skipped", "why": "needs CUDA"}
    from train.configs import get_config
    patch = list(get_config("demo")["patch_size"])  # the demo configuration the check builds
    assert secs["weights"]["random"] and secs["weights"]["patch_size"] == patch
    assert secs["forward"]["output_shape"] == [1, 2, *patch]
    assert secs["cold_stage"]["per_k"]["2"]["stage_median_s"] > 0
    assert secs["cold_stage"]["per_k"]["2"]["probe"]["classes"] == 2
    assert secs["demo"]["min_dice"] >= 0.99 and len(secs["demo"]["per_case"]) == 3
    assert (out / gc.TABLE_NAME).read_text().strip().endswith("(exit 0)")
    assert "[gpu_check +" in r.stdout  # progress lines


def test_a_failing_section_is_recorded_and_the_rest_still_runs(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--allow-cpu", "--out", str(out),
           "--sections", "environment,demo", "--sample-inputs", str(tmp_path / "missing")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), env=_env(), timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    rep = json.loads((out / gc.REPORT_NAME).read_text())
    assert rep["sections"]["environment"]["status"] == "ok"
    assert rep["sections"]["demo"]["status"] == "failed" and "predict.sh" in rep["sections"]["demo"]["error"]


def test_a_16_gb_card_scenario_passes_only_without_a_rung():
    ok = {"output_ok": True, "rungs": [], "class_errors": []}
    assert gc.scenario_ok("card16", ok) and not gc.scenario_ok("forward", ok)
    laddered = dict(ok, rungs=["zoom_1"])
    assert gc.scenario_ok("forward", laddered) and not gc.scenario_ok("card16", laddered)
    assert not gc.scenario_ok("card16", dict(ok, output_ok=False))
    assert not gc.scenario_ok("card16", dict(ok, class_errors=["x.npz: class 1: RuntimeError"]))
    assert 15 * 2 ** 30 < gc.CARD16_CAP < 16 * 2 ** 30  # 16 GiB less the driver's share
