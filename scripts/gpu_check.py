"""The image's CUDA path in one command: versions, timings, VRAM and correctness on a CUDA host.

    python scripts/gpu_check.py [--quick] [--out DIR] [--weights DIR] [--sections a,b,...]
    bash scripts/gpu_check.sh [--venv [--cuda 12|13] | --python PY | --docker IMAGE] -- [these flags]

Sections, in order (each one's figures are written to ``DIR/gpu_check.json`` as soon as it ends,
so a run cut short keeps what it measured):

- ``environment``: Python, torch, CUDA, cuDNN, device, driver, the driver the torch build needs,
  which image requirements file the installed torch matches, and a cuDNN convolution on the device;
- ``startup``: a fresh interpreter, timed from spawn to ``import torch``, to a CUDA context and to
  a first cuDNN convolution;
- ``weights``: random weights of the nnInteractive v1.0 configuration (102 M parameters, patch
  192^3) written as a v1.0-layout release folder and converted to the artifact the image holds,
  or ``--weights`` (the real release or an artifact);
- ``forward``: one 192^3 forward pass in fp16 autocast, median after warm-up, peak VRAM;
- ``cold_stage``: ``sh predict.sh`` as the harness runs it (fresh process, one case) for K = 1, 3,
  5 on a generated 300 x 512 x 512 box-stage case, beside a bare ``python -c "import torch"``,
  plus one probe process per K for the per-step split and the stage's peak VRAM
  (``scripts/bench.py``);
- ``demo``: the bundled demo model on ``sample_inputs/``, on CUDA and on the CPU, Dice per class
  between the two;
- ``fp16``: the full configuration's logits in fp16 autocast against fp32 (TF32 off);
- ``oom_ladder``: the predictor under ``torch.cuda.set_per_process_memory_fraction`` caps that the
  192^3 forward does not fit (and, without ``--quick``, that the whole volume does not fit): the
  case must still get an output and the log must name the rung taken.

Then the checks against ``TARGETS`` (and the correctness limits), a short table printed and
written to ``DIR/gpu_check.txt``; exit 0 when every check passes, 1 when one fails or could not
be measured, 2 when there is no CUDA device (one line says so; ``--allow-cpu`` runs the pipeline
on the CPU at small sizes instead, for debugging this script: no targets apply). Needs only
what the image installs (torch, numpy) plus this repository.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.bench import random_network  # noqa: E402

# ------------------------------------------------------------------------------- targets
# The performance targets, in one place. They are stated for an H100-class GPU (H100, H200, H800,
# GH200); on another GPU they are still checked and the report names the GPU.
REFERENCE_GPU_CLASS = "H100-class (H100 / H200 / H800 / GH200)"
TARGETS = {
    "forward_ms": 150.0,      # one 192^3 forward pass, fp16 autocast, median after warm-up
    "cold_stage_k5_s": 5.0,   # `sh predict.sh`, fresh process, 300 x 512 x 512 case, K = 5
    "peak_vram_gb": 10.0,     # torch.cuda.max_memory_allocated, GB = 1e9 bytes
}
# Correctness limits (not performance targets).
DEMO_DICE_MIN = 0.99  # demo model on sample_inputs/: CUDA (fp16 autocast) vs CPU (fp32), per class
# fp16 autocast vs fp32 logits of the full configuration. fp16 keeps 11 significant bits (unit
# round-off u = 2^-11 = 4.9e-4); under autocast cuDNN accumulates in fp32 and InstanceNorm
# re-normalises every layer, so the error is the rounding of each layer's inputs and weights,
# about u per layer, adding up like a random walk over the ~65 convolutions of the longest path:
# sqrt(65) * u = 4e-3. An emulation on the CPU (random v1.0 weights, 64^3 input; weights and
# every conv / norm / block output rounded to fp16) gave 1.5e-3 and 0.9997 argmax agreement. The
# limit is 2.5x the estimate; the errors that matter (overflow to inf, a wrong cast, a layer run
# in the wrong precision) are of order 1. The fp32 reference runs with TF32 off, else on Ampere
# and later GPUs it would itself round to 10 bits.
FP16_REL_L2_MAX = 1e-2      # ||logits16 - logits32|| / ||logits32||
FP16_LABEL_AGREEMENT_MIN = 0.99  # fraction of voxels with the same argmax label
# Minimum Linux driver per CUDA major version (NVIDIA's CUDA toolkit release notes, table 3:
# minor-version compatibility within a major version).
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}

SECTIONS = ("environment", "startup", "weights", "forward", "cold_stage", "demo", "fp16", "oom_ladder")
CUDA_ONLY = ("fp16", "oom_ladder")  # skipped by --allow-cpu on a host without CUDA
MODES = {  # settings per mode; flags override
    "quick": {"warmup": 3, "iters": 10, "repeats": 1, "ladder": ("forward", "card16")},
    "full": {"warmup": 5, "iters": 30, "repeats": 3, "ladder": ("forward", "case", "card16")},
}
REPORT_NAME, TABLE_NAME = "gpu_check.json", "gpu_check.txt"
CHILD_TAG = "GPU_CHECK_CHILD "
GB = 1e9


# ------------------------------------------------------------------------------- pure helpers
def parse_version(text) -> tuple:
    """'570.86.15' -> (570, 86, 15); '12.8' -> (12, 8); None or junk -> ()."""
    if not text:
        return ()
    m = re.match(r"\s*(\d+(?:\.\d+)*)", str(text))
    return tuple(int(p) for p in m.group(1).split(".")) if m else ()


def driver_from_text(text: str):
    """The driver version from ``nvidia-smi --query-gpu=driver_version --format=csv,noheader``
    output (first line) or from /proc/driver/nvidia/version ("... Kernel Module  570.86.15 ...")."""
    if not text:
        return None
    m = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+\.\d+(?:\.\d+)?)", text)
    if m:
        return m.group(1)
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    return first if re.fullmatch(r"\d+\.\d+(?:\.\d+)?", first) else None


def min_driver_for_cuda(cuda_version):
    """Minimum Linux driver for a torch built against ``cuda_version`` ('12.8'), or None."""
    v = parse_version(cuda_version)
    return MIN_DRIVER.get(v[0]) if v else None


def driver_supports(driver, cuda_version):
    """True / False when both are known, else None."""
    need = min_driver_for_cuda(cuda_version)
    if not driver or not need:
        return None
    return parse_version(driver) >= parse_version(need)


def gpu_class(name) -> str:
    """'H100-class' for the reference GPUs of TARGETS, else 'other'."""
    return "H100-class" if name and re.search(r"\b(GH200|H100|H200|H800)\b", str(name)) else "other"


def requirement_pins(path) -> dict:
    """{package: version} of a pinned requirements file (``name==version`` lines)."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = ver.strip()
    return pins


# The image's requirements files and the CUDA major version of the torch build each pins.
IMAGE_REQUIREMENTS = {"requirements-image-cu12.txt": 12, "requirements-image.txt": 13}


def image_flavour(torch_version: str, torch_cuda, root=ROOT):
    """Which image requirements file pins this torch build ('requirements-image-cu12.txt' for
    torch '2.8.0+cu128' built for CUDA '12.8'), or None when none does (then the check does not
    run the image's torch build: a CPU build, another version or another CUDA)."""
    base, major = str(torch_version).split("+")[0], parse_version(torch_cuda)[:1]
    for name, cuda_major in IMAGE_REQUIREMENTS.items():
        p = Path(root) / name
        if p.is_file() and requirement_pins(p).get("torch") == base and major == (cuda_major,):
            return name
    return None


def no_cuda_line(torch_version, torch_cuda, driver, detail="") -> str:
    """The one line printed on a host without a usable CUDA device."""
    build = f"torch {torch_version} ({'CPU build' if not torch_cuda else f'built for CUDA {torch_cuda}'})"
    if driver:
        need = min_driver_for_cuda(torch_cuda)
        host = f"NVIDIA driver {driver}" + (f", this build needs >= {need}" if need else "")
    else:
        host = "no NVIDIA driver found"
    tail = f"; {detail}" if detail else ""
    return f"gpu_check: no CUDA device usable: {build}, {host}{tail}: nothing measured (exit 2)"


def dice_per_class(a, b, k: int) -> dict:
    """{class: Dice} for labels 1..k of two label maps of the same shape; a class absent from
    both scores 1.0."""
    import numpy as np
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    out = {}
    for c in range(1, int(k) + 1):
        ma, mb = a == c, b == c
        na, nb = int(ma.sum()), int(mb.sum())
        out[c] = 1.0 if na + nb == 0 else 2.0 * int(np.logical_and(ma, mb).sum()) / (na + nb)
    return out


def logit_agreement(low, ref) -> dict:
    """Compare logits ``low`` (fp16 path) with ``ref`` (fp32), both (C, ...) arrays: relative L2
    error, largest absolute error, fraction of voxels with the same argmax over C, and whether
    ``low`` is all finite."""
    import numpy as np
    low, ref = np.asarray(low, np.float64), np.asarray(ref, np.float64)
    finite = bool(np.isfinite(low).all())
    diff = np.where(np.isfinite(low), low, 0.0) - ref
    norm = float(np.linalg.norm(ref))
    return {"rel_l2": float(np.linalg.norm(diff)) / norm if norm > 0 else float(np.linalg.norm(diff)),
            "max_abs": float(np.abs(diff).max()) if diff.size else 0.0,
            "label_agreement": float((low.argmax(0) == ref.argmax(0)).mean()) if finite else 0.0,
            "finite": finite}


def ladder_rungs(events: list) -> list:
    """The out-of-memory rungs the predictor took, in order, from its structured events
    (``Predictor.events``: dicts with ``event == "out_of_memory"`` and the ``rung`` name)."""
    return [e["rung"] for e in events if e.get("event") == "out_of_memory"]


def mode_settings(args) -> dict:
    """The run's settings: the mode's defaults, then the flags that override them."""
    s = dict(MODES["quick" if args.quick else "full"])
    for key in ("warmup", "iters", "repeats"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    s["ladder"] = list(s["ladder"])
    s["classes"] = [int(c) for c in args.classes.split(",")]
    s["shape"] = [int(c) for c in args.shape.split(",")]
    s["sections"] = [x for x in SECTIONS if x in args.sections.split(",")]
    return s


def make_case(path, shape, k: int, seed: int = 0):
    """Write a box-stage case (organizer layout: ``imgs`` uint8, ``spacing``, ``boxes``) with K
    bright balls on noise. Ball c has radius ``RADII[c % 5] * min(shape)`` (class 1 large enough
    that its crop is zoomed out), centred at a random point that keeps it inside the volume; its
    box is the ball's bounding box (``z_min..z_max``, and the 2D box on slice ``z_mid``, all
    inclusive). Balls are drawn in their bounding boxes only (a 300 x 512 x 512 case with 5
    classes takes about a second). Returns (path, [(centre, radius), ...])."""
    import numpy as np
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    img = rng.integers(0, 40, size=shape, dtype=np.uint8)
    boxes, balls = [], []
    for c in range(1, k + 1):
        r = max(1, int(RADII[(c - 1) % len(RADII)] * min(shape)))
        r = min(r, (min(shape) - 1) // 2)
        centre = [int(rng.integers(r, s - r)) for s in shape]
        lo = [ci - r for ci in centre]
        hi = [ci + r for ci in centre]  # inclusive
        sub = tuple(slice(l, h + 1) for l, h in zip(lo, hi))
        grid = np.ogrid[tuple(slice(-r, r + 1) for _ in range(3))]
        ball = sum(g.astype(np.int64) ** 2 for g in grid) <= r * r
        img[sub][ball] = 100 + (c * 37) % 150
        boxes.append({"z_min": lo[0], "z_max": hi[0], "z_mid": centre[0], "z_mid_y_min": lo[1],
                      "z_mid_y_max": hi[1], "z_mid_x_min": lo[2], "z_mid_x_max": hi[2]})
        balls.append((centre, r))
    arr = np.empty(len(boxes), dtype=object)
    arr[:] = boxes
    np.savez(path, imgs=img, spacing=np.array([1.0, 1.0, 1.0]), boxes=arr)
    return Path(path), balls


RADII = (0.4, 0.1, 0.2, 0.06, 0.15)


def plans_block(arch: dict) -> dict:
    """A canonical architecture dict as nnU-Net's plans.json stores it (ops named by strings)."""
    kw = dict(arch, conv_op="torch.nn.modules.conv.Conv3d",
              norm_op="torch.nn.modules.instancenorm.InstanceNorm3d", dropout_op=None,
              dropout_op_kwargs=None, nonlin="torch.nn.LeakyReLU")
    return {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
            "arch_kwargs": kw, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def write_release_folder(dst, state_dict: dict, arch: dict, patch, configuration: str = "3d_fullres_ps192") -> Path:
    """Write an nnInteractive v1.0-layout release folder: ``plans.json`` (a '3d_fullres'
    configuration with the architecture, and ``configuration`` inheriting from it with
    ``patch``), ``dataset.json``, ``inference_session_class.json`` (point radius 4, decay 0.9) and
    ``fold_0/checkpoint_final.pth``: the state dict (aliased keys as given) beside the kinds of
    entries the real checkpoint holds (numpy float64 training log, init_args with the
    configuration name and a torch.device, trainer name), which ``infer.weights`` must load
    without executing anything."""
    import numpy as np
    import torch
    root = Path(dst)
    (root / "fold_0").mkdir(parents=True, exist_ok=True)
    plans = {"dataset_name": "Dataset_random", "plans_name": "nnUNetResEncUNetLPlans",
             "configurations": {
                 "3d_fullres": {"data_identifier": "random_3d_fullres", "patch_size": list(patch),
                                "spacing": [1.0, 1.0, 1.0], "architecture": plans_block(arch)},
                 configuration: {"inherits_from": "3d_fullres", "patch_size": list(patch)}}}
    dataset = {"channel_names": {"0": "image"}, "labels": {"background": 0, "object": 1},
               "numTraining": 0, "file_ending": ".nii.gz"}
    session = {"inference_class": "nnInteractiveInferenceSession", "point_radius": 4,
               "preferred_scribble_thickness": [2, 2, 2], "interaction_decay": 0.9}
    for name, obj in (("plans.json", plans), ("dataset.json", dataset),
                      ("inference_session_class.json", session)):
        (root / name).write_text(json.dumps(obj, indent=1))
    f64 = np.float64
    checkpoint = {
        "network_weights": state_dict,
        "optimizer_state": {"state": {}, "param_groups": []},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [f64(0.0)], "ema_fg_dice": [f64(0.0)], "train_losses": [f64(0.0)]},
        "_best_ema": f64(0.0),
        "current_epoch": 0,
        "init_args": {"plans": plans, "configuration": configuration, "fold": 0,
                      "dataset_json": dataset, "device": torch.device("cpu")},
        "trainer_name": "gpu_check_random_weights",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    torch.save(checkpoint, root / "fold_0" / "checkpoint_final.pth")
    return root


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def evaluate(report: dict, targets: dict = TARGETS) -> list:
    """The checks of a report: one dict per check (name, value, limit, unit, ok). A check whose
    section ran but produced no value gets ok False ("not measured"); checks of sections not in
    the run are left out."""
    secs = report.get("sections", {})
    ran = {s for s in report.get("settings", {}).get("sections", SECTIONS)
           if _get(secs, s, "status") != "skipped"}
    on_cpu = report.get("mode") == "cpu-debug"
    checks = []

    def add(section, name, value, op, limit, unit):
        if section not in ran:
            return
        if value is None:
            ok = False
        elif op == "<=":
            ok = value <= limit
        elif op == ">=":
            ok = value >= limit
        else:
            ok = bool(value) == limit
        checks.append({"name": name, "section": section, "value": value, "op": op, "limit": limit,
                       "unit": unit, "ok": ok})

    add("environment", "torch build runs on this driver", _get(secs, "environment", "device_conv_ok"),
        "==", True, "")
    patch = _get(secs, "forward", "patch") or [192]
    add("forward", f"{patch[0]}^3 forward, {'fp32 (CPU)' if on_cpu else 'fp16 autocast'} (median)",
        _get(secs, "forward", "median_ms"), "<=", targets["forward_ms"], "ms")
    k5 = _get(secs, "cold_stage", "per_k", "5", "stage_median_s")
    add("cold_stage", "cold stage K=5, sh predict.sh (median)", k5, "<=", targets["cold_stage_k5_s"], "s")
    peaks = [p for p in (_get(secs, "forward", "peak_bytes"),
                         *[_get(v, "peak_bytes") for v in (_get(secs, "cold_stage", "per_k") or {}).values()])
             if p is not None]
    if ("forward" in ran or "cold_stage" in ran) and not on_cpu:
        section = "cold_stage" if "cold_stage" in ran else "forward"
        add(section, "peak VRAM (forward, cold stages)", max(peaks) / GB if peaks else None,
            "<=", targets["peak_vram_gb"], "GB")
    add("demo", "demo model CUDA vs CPU, min Dice per class", _get(secs, "demo", "min_dice"),
        ">=", DEMO_DICE_MIN, "")
    add("fp16", "fp16 vs fp32 logits, relative L2", _get(secs, "fp16", "rel_l2"), "<=", FP16_REL_L2_MAX, "")
    add("fp16", "fp16 vs fp32 argmax agreement", _get(secs, "fp16", "label_agreement"),
        ">=", FP16_LABEL_AGREEMENT_MIN, "")
    add("oom_ladder", "OOM ladder: output written, rung logged", _get(secs, "oom_ladder", "ok"),
        "==", True, "")
    for name, sec in secs.items():  # a section that raised fails the run even without a check
        if name in ran and isinstance(sec, dict) and sec.get("status") == "failed":
            checks.append({"name": f"section {name} ran", "section": name, "value": sec.get("error"),
                           "op": "==", "limit": "ok", "unit": "", "ok": False})
    return checks


def _fmt_value(c: dict) -> str:
    v = c["value"]
    if v is None:
        return "not measured"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if c["unit"] in ("ms", "s", "GB"):
            return f"{v:.{1 if c['unit'] == 'ms' else 2}f} {c['unit']}"
        return f"{v:.4f}" if v >= 1e-3 else f"{v:.2e}"
    return str(v)[:40]


def _fmt_limit(c: dict) -> str:
    if c["op"] == "==":
        return "yes" if c["limit"] is True else str(c["limit"])
    lim = c["limit"]
    return f"{c['op']} {lim:g}{(' ' + c['unit']) if c['unit'] else ''}"


def format_table(report: dict) -> str:
    """A short plain-text summary: machine line, the checks, cold-stage figures per K."""
    env = report.get("sections", {}).get("environment", {})
    lines = [f"gpu_check ({report.get('mode', '?')}): {env.get('device_name', 'no device')} "
             f"[{env.get('gpu_class', '-')}; targets for {REFERENCE_GPU_CLASS}], driver "
             f"{env.get('driver', '-')}, torch {env.get('torch', '-')}, CUDA {env.get('torch_cuda', '-')}, "
             f"cuDNN {env.get('cudnn', '-')}"]
    checks = report.get("checks", [])
    w = max([len(c["name"]) for c in checks] + [5]) + 2
    lines.append(f"{'check':<{w}}{'value':>16}{'target':>14}  result")
    for c in checks:
        verdict = "(CPU: n/a)" if report.get("mode") == "cpu-debug" else ("ok" if c["ok"] else "MISSED")
        lines.append(f"{c['name']:<{w}}{_fmt_value(c):>16}{_fmt_limit(c):>14}  {verdict}")
    per_k = _get(report, "sections", "cold_stage", "per_k") or {}
    if per_k:
        lines.append("cold stage per K: " + "; ".join(
            f"K={k}: stage {_num(v.get('stage_median_s'), 's')}, bare import torch "
            f"{_num(v.get('bare_median_s'), 's')}, peak VRAM {_num(_div(v.get('peak_bytes'), GB), 'GB')}"
            for k, v in per_k.items()))
    st = _get(report, "sections", "startup")
    if st and st.get("cuda_ready_s") is not None:
        lines.append(f"process start -> import torch {_num(st.get('import_torch_s'), 's')}, -> CUDA ready "
                     f"{_num(st.get('cuda_ready_s'), 's')}, -> first cuDNN conv {_num(st.get('first_conv_s'), 's')}")
    lines.append(f"result: {report.get('result', 'incomplete')} (exit {report.get('exit_code', '-')})")
    return "\n".join(lines)


def _div(a, b):
    return None if a is None else a / b


def _num(v, unit):
    return "-" if v is None else f"{v:.2f} {unit}"


def exit_code(report: dict) -> int:
    """0 when every check passed, else 1 (a CPU debug run: 0 when no section failed)."""
    if report.get("mode") == "cpu-debug":
        return 1 if any(s.get("status") == "failed" for s in report.get("sections", {}).values()) else 0
    checks = report.get("checks", [])
    return 0 if checks and all(c["ok"] for c in checks) else 1


def write_report(out_dir, report: dict) -> Path:
    """Write ``out_dir/gpu_check.json`` atomically (temporary name, then rename)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_NAME
    from infer.writer import atomic_write
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=1, default=str) + "\n")
    return path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats, one OOM scenario: about 2 min on an H200 (full mode: about 3 min)")
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json / gpu_check.txt")
    p.add_argument("--weights", default=None,
                   help="the real nnInteractive v1.0 release folder or a converted artifact "
                        "(default: random weights of the v1.0 configuration)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--classes", default="1,3,5", help="class counts of the cold stages (default 1,3,5)")
    p.add_argument("--shape", default="300,512,512", help="cold-stage case shape z,y,x (default 300,512,512)")
    p.add_argument("--arch", choices=("full", "demo"), default="full",
                   help="random-weight architecture: the v1.0 configuration (192^3) or the demo one (40^3)")
    p.add_argument("--warmup", type=int, default=None, help="forward passes before timing")
    p.add_argument("--iters", type=int, default=None, help="timed forward passes")
    p.add_argument("--repeats", type=int, default=None, help="cold (bare import torch, stage) pairs per K")
    p.add_argument("--sample-inputs", default=str(ROOT / "sample_inputs"), help="cases for the demo check")
    p.add_argument("--demo-weights", default=str(ROOT / "weights" / "demo"), help="demo model for the demo check")
    p.add_argument("--allow-cpu", action="store_true",
                   help="debug: without CUDA run the pipeline on the CPU (use small --shape / --arch demo)")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary folder (weights, cases)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = [s for s in args.sections.split(",") if s not in SECTIONS]
    if bad:
        p.error(f"unknown sections {bad}; known: {','.join(SECTIONS)}")
    return args


# ------------------------------------------------------------------------------- the run
class Run:
    """State of one run: settings, work folder, device, report, progress printing."""

    def __init__(self, args, settings: dict, device: str, work: Path):
        self.args, self.s, self.device, self.work = args, settings, device, work
        self.t0 = time.monotonic()
        self.artifact = None
        self.report = {
            "tool": "scripts/gpu_check.py", "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "argv": sys.argv[1:], "mode": "cpu-debug" if device == "cpu" else ("quick" if args.quick else "full"),
            "reference_gpu_class": REFERENCE_GPU_CLASS, "targets": TARGETS,
            "limits": {"demo_dice_min": DEMO_DICE_MIN, "fp16_rel_l2_max": FP16_REL_L2_MAX,
                       "fp16_label_agreement_min": FP16_LABEL_AGREEMENT_MIN},
            "settings": settings, "sections": {}, "result": "incomplete",
        }

    def say(self, msg: str) -> None:
        print(f"[gpu_check +{time.monotonic() - self.t0:6.1f} s] {msg}", flush=True)

    def sync(self) -> None:
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()

    def save(self) -> None:
        write_report(self.args.out, self.report)


def _env_for_children() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _nvidia_driver():
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode == 0 and driver_from_text(r.stdout):
            return driver_from_text(r.stdout)
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return driver_from_text(Path("/proc/driver/nvidia/version").read_text())
    except OSError:
        return None


def section_environment(run: Run) -> dict:
    import numpy as np
    import torch
    torch_cuda = torch.version.cuda
    driver = _nvidia_driver()
    out = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
           "torch_cuda": torch_cuda, "numpy": np.__version__,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "driver": driver, "driver_needed": min_driver_for_cuda(torch_cuda),
           "driver_ok": driver_supports(driver, torch_cuda), "image_requirements": image_flavour(torch.__version__, torch_cuda),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if run.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(device_name=props.name, gpu_class=gpu_class(props.name),
                   capability=f"{props.major}.{props.minor}", total_memory_bytes=props.total_memory,
                   device_count=torch.cuda.device_count(),
                   tf32_conv_default=torch.backends.cudnn.allow_tf32)
    else:
        out.update(device_name="CPU (--allow-cpu debug run)", gpu_class="none")
    # the image's torch build runs on this driver: a fp16 cuDNN convolution gives the CPU's answer
    x = torch.randn(1, 2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    w = torch.randn(3, 2, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    ref = torch.nn.functional.conv3d(x.double(), w.double(), padding=1)
    dt = torch.float16 if run.device == "cuda" else torch.float32
    got = torch.nn.functional.conv3d(x.to(run.device, dt), w.to(run.device, dt), padding=1).double().cpu()
    err = float((got - ref).abs().max() / ref.abs().max())
    out["device_conv_rel_err"] = err
    out["device_conv_ok"] = err < 1e-2
    return out


STARTUP_CODE = r'''
import time
T = time.time()
import json, sys
dev = sys.argv[1]
import torch
t_import = time.time()
if dev == "cuda":
    torch.cuda.init()
    torch.zeros(1, device=dev)
    torch.cuda.synchronize()
t_ready = time.time()
x = torch.randn(1, 8, 16, 16, 16, device=dev)
w = torch.randn(8, 8, 3, 3, 3, device=dev)
dt = torch.float16 if dev == "cuda" else torch.float32
torch.nn.functional.conv3d(x.to(dt), w.to(dt), padding=1)
if dev == "cuda":
    torch.cuda.synchronize()
t_conv = time.time()
print("GPU_CHECK_CHILD " + json.dumps({"start": T, "import": t_import, "ready": t_ready, "conv": t_conv}), flush=True)
'''


def _child_json(proc: subprocess.CompletedProcess) -> dict:
    lines = [l for l in proc.stdout.splitlines() if l.startswith(CHILD_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child process failed (rc {proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(CHILD_TAG):])


def section_startup(run: Run) -> dict:
    """Fresh interpreter: spawn -> import torch -> CUDA context -> first cuDNN conv (median of 3)."""
    rows = []
    for _ in range(3):
        t = time.time()
        proc = subprocess.run([sys.executable, "-c", STARTUP_CODE, run.device], capture_output=True,
                              text=True, cwd=str(run.work), timeout=300)
        r = _child_json(proc)
        rows.append({"interpreter_s": r["start"] - t, "import_torch_s": r["import"] - t,
                     "cuda_ready_s": r["ready"] - t, "first_conv_s": r["conv"] - t})
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out["all"] = rows
    return out


def section_weights(run: Run) -> dict:
    import torch
    from scripts.bench import FULL_ARCH, FULL_PATCH
    from train.configs import get_config
    demo = get_config("demo")
    DEMO_ARCH, DEMO_PATCH = demo["architecture"], demo["patch_size"]
    from infer.convert import convert
    from infer.weights import find_model_root, load_model
    out = {}
    if run.args.weights:
        kind, root = find_model_root(run.args.weights)
        out.update(source=str(root), kind=kind, random=False)
        release = root if kind == "release" else None
        if kind == "artifact":
            run.artifact = root
    else:
        arch, patch = (FULL_ARCH, FULL_PATCH) if run.args.arch == "full" else (DEMO_ARCH, DEMO_PATCH)
        t = time.perf_counter()
        net = random_network(arch, run.device)
        # the module moved as a whole keeps its aliased entries sharing storage, as in a checkpoint
        # saved by nnU-Net (``v.cpu()`` per key would write each parameter up to four times)
        sd = net.to("cpu").state_dict()
        out["parameters"] = sum(p.numel() for p in net.parameters())
        del net
        release = write_release_folder(run.work / "nnInteractive_v1.0_random", sd, arch, patch)
        del sd
        out.update(source=f"random weights, {run.args.arch} configuration, patch {patch}", kind="release",
                   random=True, release_write_s=time.perf_counter() - t,
                   release_bytes=(release / "fold_0" / "checkpoint_final.pth").stat().st_size)
    if release is not None:
        # the release folder as published, loaded onto the device (the safe unpickler path) ...
        t = time.perf_counter()
        net, card = load_model(release, device=run.device)
        run.sync()
        out["release_load_s"] = time.perf_counter() - t
        out["parameters"] = sum(p.numel() for p in net.parameters())
        del net
        # ... and converted to the artifact the image holds (scripts/prepare_weights.py does this)
        t = time.perf_counter()
        run.artifact = convert(release, run.work / "artifact")
        out["convert_s"] = time.perf_counter() - t
    t = time.perf_counter()
    net, card = load_model(run.artifact, device=run.device)
    run.sync()
    out.update(artifact=str(run.artifact), artifact_load_s=time.perf_counter() - t,
               patch_size=list(card.patch_size), parameters=sum(p.numel() for p in net.parameters()),
               artifact_bytes=(Path(run.artifact) / card.weights_file).stat().st_size)
    del net
    if run.device == "cuda":
        torch.cuda.empty_cache()
    return out


def forward_input(patch, device, seed: int = 0):
    """(1, 8, *patch) float32: a z-scored noise image with a bright cube, the box+ channel set
    over the cube, the other prompt channels zero."""
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(1, 8, *patch)
    x[0, 0] = torch.randn(*patch, generator=g)
    sl = tuple(slice(p // 3, 2 * p // 3) for p in patch)
    x[(0, 0) + sl] += 2.0
    x[(0, 2) + sl] = 1.0
    return x.to(device)


def section_forward(run: Run) -> dict:
    import torch
    from infer.weights import load_model
    net, card = load_model(run.artifact, device=run.device)
    x = forward_input(card.patch_size, run.device)
    half = run.device == "cuda"

    def once():
        run.sync()
        t = time.perf_counter()
        amp = torch.autocast("cuda", dtype=torch.float16) if half else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            y = net(x)
        run.sync()
        return time.perf_counter() - t, y

    first, y = once()
    for _ in range(max(run.s["warmup"] - 1, 0)):
        once()
    if half:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = [once()[0] for _ in range(run.s["iters"])]
    out = {"patch": list(card.patch_size), "dtype": "float16 autocast" if half else "float32",
           "first_ms": first * 1e3, "median_ms": statistics.median(times) * 1e3,
           "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3, "iters": len(times),
           "warmup": run.s["warmup"], "output_shape": list(y.shape),
           "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if half:
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["weights_bytes"] = sum(p.numel() * p.element_size() for p in net.parameters())
    net = x = y = None  # free the device memory before the next section
    if half:
        torch.cuda.empty_cache()
    return out


def section_fp16(run: Run) -> dict:
    import torch
    from infer.weights import load_model
    net, card = load_model(run.artifact, device=run.device)
    random = bool(run.report["sections"].get("weights", {}).get("random"))
    if random:  # undo the timing bias: the logits then carry the whole network's signal
        seg = net.decoder.seg_layers[-1]
        g = torch.Generator(device=run.device).manual_seed(1)
        with torch.no_grad():
            seg.weight.normal_(0.0, (2.0 / seg.weight[0].numel()) ** 0.5, generator=g)
            seg.bias.zero_()
    x = forward_input(card.patch_size, run.device, seed=1)
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        with torch.inference_mode():
            ref = net(x)[0].float().cpu().numpy()
            with torch.autocast("cuda", dtype=torch.float16):
                low = net(x)[0].float().cpu().numpy()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    del net, x
    torch.cuda.empty_cache()
    out = logit_agreement(low, ref)
    out.update(seg_layer_reinitialised=random, logits_std=float(ref.std()),
               limits={"rel_l2_max": FP16_REL_L2_MAX, "label_agreement_min": FP16_LABEL_AGREEMENT_MIN})
    return out


def _predict_sh(inputs, outputs, weights, device, timeout=900) -> subprocess.CompletedProcess:
    env = _env_for_children()
    env["PYTHON"] = sys.executable
    cmd = ["sh", str(ROOT / "predict.sh"), "--inputs", str(inputs), "--outputs", str(outputs),
           "--weights", str(weights), "--device", device]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def section_demo(run: Run) -> dict:
    import numpy as np
    from infer.npz import read_case
    from infer.case import num_classes
    inputs, weights = Path(run.args.sample_inputs), Path(run.args.demo_weights)
    outs, logs = {}, {}
    for dev in ("cpu", run.device):
        dst = run.work / f"demo_{dev}_{len(outs)}"
        proc = _predict_sh(inputs, dst, weights, dev)
        if proc.returncode != 0:
            raise RuntimeError(f"sh predict.sh --device {dev} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
        outs[dev if dev not in outs else dev + "_2"] = dst
        logs[dev] = proc.stderr.strip().splitlines()[-1:]
    a_dir, b_dir = list(outs.values())
    per_case = {}
    for case_path in sorted(inputs.glob("*.npz")):
        k = num_classes(read_case(case_path, keys=("boxes", "clicks")))
        with np.load(a_dir / case_path.name) as fa, np.load(b_dir / case_path.name) as fb:
            per_case[case_path.name] = dice_per_class(fa["segs"], fb["segs"], k)
    if not per_case:
        raise RuntimeError(f"no cases in {inputs}")
    dices = [d for c in per_case.values() for d in c.values()]
    return {"compared": f"cpu vs {run.device}", "per_case": per_case,
            "min_dice": min(dices) if dices else None, "last_log_lines": logs}


def section_cold_stage(run: Run) -> dict:
    from scripts.bench import cold_stage_pairs, run_probe
    out = {"shape": run.s["shape"], "repeats": run.s["repeats"], "per_k": {},
           "weights": str(run.artifact)}
    run.report["sections"]["cold_stage"] = out
    for k in run.s["classes"]:
        folder = run.work / f"cold_k{k}"
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        case, _ = make_case(folder / f"case_k{k}.npz", run.s["shape"], k)
        gen_s = time.perf_counter() - t
        probe = run_probe(case, run.artifact, run.device, 0, folder / "probe_out.npz")
        run.say(f"  K={k}: probe: total {probe['total']:.2f} s, forward per class {probe['forward'] * 1e3:.0f} ms, "
                f"peak {(probe['peak_mem'] or 0) / GB:.2f} GB")
        pairs = cold_stage_pairs(case, run.artifact, run.device, run.s["repeats"], folder)
        out["per_k"][str(k)] = {
            "stage_median_s": pairs["stage"], "bare_median_s": pairs["bare"], "ratio": pairs["ratio"],
            "stage_all_s": pairs["stage_all"], "bare_all_s": pairs["bare_all"], "case_generation_s": gen_s,
            "peak_bytes": probe["peak_mem"], "probe": {kk: v for kk, v in probe.items() if kk != "peak_mem"}}
        run.say(f"  K={k}: cold stage {pairs['stage']:.2f} s (bare import torch {pairs['bare']:.2f} s)")
        run.save()
        shutil.rmtree(folder / "cold_in", ignore_errors=True)
    return out


def section_oom_ladder(run: Run) -> dict:
    folder = run.work / "ladder"
    folder.mkdir(exist_ok=True)
    case, _ = make_case(folder / "ladder_case.npz", run.s["shape"], 1)
    out = {"scenarios": {}}
    for scenario in run.s["ladder"]:
        cfg = {"weights": str(run.artifact), "case": str(case), "output": str(folder / f"out_{scenario}.npz"),
               "scenario": scenario}
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "ladder",
                               "--child-config", json.dumps(cfg)], capture_output=True, text=True,
                              env=_env_for_children(), cwd=str(folder), timeout=1200)
        res = _child_json(proc)
        res["seconds"] = time.perf_counter() - t
        out["scenarios"][scenario] = res
        run.say(f"  {scenario}: caps tried {[round(c / GB, 2) for c in res['caps_bytes']]} GB, rungs "
                f"{res['rungs'] or 'none'}, output {'written' if res['output_ok'] else 'MISSING'}")
    out["ok"] = all(scenario_ok(name, s) for name, s in out["scenarios"].items())
    return out


# The evaluation server's card (Quadro RTX 5000, 16 GiB) less what its driver and CUDA context keep.
CARD16_CAP = int(15.5 * 2 ** 30)


def scenario_ok(name: str, s: dict) -> bool:
    """A memory-cap scenario passed: an output of the right shape and no class left behind on an
    error; under the "card16" cap (the evaluation server's 16 GB) no out-of-memory rung either
    (the stage fits), under the others a rung named (the ladder was taken)."""
    fits = not s["rungs"] if name == "card16" else bool(s["rungs"])
    return bool(s["output_ok"]) and fits and not s["class_errors"]


def ladder_child(cfg: dict) -> dict:
    """In its own process (the memory cap is per process): predict the case once without a cap,
    measuring the peak memory outside and inside forward passes; then under caps chosen from
    those peaks (scenario "forward": the forward does not fit; "case": the volume-sized arrays
    do not fit), until the predictor's events name an out-of-memory rung."""
    import logging

    import torch
    from infer.npz import read_case
    from infer.writer import write_segs
    from infer.predictor import Predictor
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    logging.getLogger("infer").addHandler(Keep())
    logging.getLogger("infer").setLevel(logging.INFO)
    pred = Predictor.from_path(cfg["weights"], device="cuda")
    case = read_case(cfg["case"])
    stats = {"outside": 0, "before_forward": 0, "forward": 0}

    class Measured(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            stats["outside"] = max(stats["outside"], torch.cuda.max_memory_allocated())
            stats["before_forward"] = max(stats["before_forward"], torch.cuda.memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            y = self.inner(x)
            torch.cuda.synchronize()
            stats["forward"] = max(stats["forward"], torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            return y

    inner = pred.network
    pred.network = Measured(inner)
    weights_bytes = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    uncapped = pred.predict(case)
    stats["outside"] = max(stats["outside"], torch.cuda.max_memory_allocated())
    pred.network = inner
    total = torch.cuda.get_device_properties(0).total_memory
    if cfg["scenario"] == "forward":
        base, top = max(stats["outside"], stats["before_forward"]), stats["forward"]
    else:
        base, top = weights_bytes, stats["outside"]
    caps = [int(base + f * (top - base)) for f in (0.5, 0.2, 0.02)] if top > base else [int(base)]
    if cfg["scenario"] == "card16":  # the whole stage under the evaluation server's memory
        caps = [min(CARD16_CAP, total)]
    tried, rungs, errors, log_tail, output_ok, shape = [], [], [], [], False, None
    for cap in caps:
        gc_collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(cap / total, 1.0))
        records.clear()
        pred.events.clear()
        t = time.perf_counter()
        segs = pred.predict(case)
        dt = time.perf_counter() - t
        torch.cuda.set_per_process_memory_fraction(1.0)
        tried.append(cap)
        rungs = ladder_rungs(pred.events)
        errors = [r for r in records if re.search(r"class \d+: \w+(Error|Exception)", r)]
        log_tail = records[-6:]
        write_segs(cfg["output"], segs)
        output_ok = Path(cfg["output"]).is_file() and tuple(segs.shape) == tuple(case["imgs"].shape)
        shape = list(segs.shape)
        if rungs:
            break
    return {"scenario": cfg["scenario"], "weights_bytes": weights_bytes, "peak_outside_forward": stats["outside"],
            "allocated_before_forward": stats["before_forward"], "peak_in_forward": stats["forward"],
            "caps_bytes": tried, "rungs": rungs, "class_errors": errors, "log": log_tail,
            "output_ok": output_ok, "output_shape": shape, "capped_predict_s": dt,
            "dice_vs_uncapped": dice_per_class(segs, uncapped, int(uncapped.max(initial=0)) or 1)}


def gc_collect():
    import gc
    gc.collect()


RUNNERS = {"environment": section_environment, "startup": section_startup, "weights": section_weights,
           "forward": section_forward, "cold_stage": section_cold_stage, "demo": section_demo,
           "fp16": section_fp16, "oom_ladder": section_oom_ladder}
NEEDS_WEIGHTS = ("forward", "cold_stage", "fp16", "oom_ladder")


def run_sections(run: Run) -> None:
    for name in run.s["sections"]:
        if run.device == "cpu" and name in CUDA_ONLY:
            run.report["sections"][name] = {"status": "skipped", "why": "needs CUDA"}
            run.say(f"{name}: skipped (needs CUDA)")
            run.save()
            continue
        if name in NEEDS_WEIGHTS and run.artifact is None:
            if "weights" not in run.s["sections"] or run.report["sections"].get("weights", {}).get("status") == "failed":
                run.report["sections"][name] = {"status": "failed", "error": "no weights (weights section not run or failed)"}
                run.save()
                continue
        run.say(f"{name}: start")
        t = time.perf_counter()
        try:
            res = RUNNERS[name](run)
            res = dict(res, status="ok")
        except Exception as exc:
            res = dict(run.report["sections"].get(name) or {}, status="failed",
                       error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}",
                       traceback=traceback.format_exc()[-3000:])
            run.say(f"{name}: FAILED: {res['error']}")
        res["seconds"] = time.perf_counter() - t
        run.report["sections"][name] = res
        run.report["checks"] = evaluate(run.report)
        run.save()
        run.say(f"{name}: done in {res['seconds']:.1f} s" + _brief(name, res))


def _brief(name: str, res: dict) -> str:
    if res.get("status") != "ok":
        return ""
    if name == "environment":
        return (f" ({res.get('device_name')}, driver {res.get('driver')}, torch {res.get('torch')}, "
                f"CUDA {res.get('torch_cuda')}, cuDNN {res.get('cudnn')})")
    if name == "forward":
        return f" (median {res['median_ms']:.1f} ms, peak {(res.get('peak_bytes') or 0) / GB:.2f} GB)"
    if name == "startup":
        return f" (CUDA ready {res['cuda_ready_s']:.2f} s after spawn)"
    if name == "demo":
        return f" (min Dice {res['min_dice']:.4f})"
    if name == "fp16":
        return f" (rel L2 {res['rel_l2']:.2e}, argmax agreement {res['label_agreement']:.5f})"
    return ""


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child == "ladder":
        print(CHILD_TAG + json.dumps(ladder_child(json.loads(args.child_config))), flush=True)
        return 0
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure means nothing can be measured
        print(f"gpu_check: torch cannot be imported ({type(exc).__name__}: {exc}): nothing measured (exit 2)")
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.allow_cpu:
        detail = " ".join(str(caught[0].message).split())[:200] if caught else ""
        print(no_cuda_line(torch.__version__, torch.version.cuda, _nvidia_driver(), detail))
        return 2
    settings = mode_settings(args)
    device = "cuda" if has_cuda else "cpu"
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    run = Run(args, settings, device, work)
    run.say(f"{run.report['mode']} run on {device}; report: {Path(args.out) / REPORT_NAME}; work folder {work}")
    try:
        run_sections(run)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    run.report["checks"] = evaluate(run.report)
    code = exit_code(run.report)
    run.report["exit_code"] = code
    run.report["result"] = ("cpu-debug, no targets" if run.report["mode"] == "cpu-debug"
                            else ("pass" if code == 0 else "fail"))
    run.report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    table = format_table(run.report)
    run.save()
    (Path(args.out) / TABLE_NAME).write_text(table + "\n")
    print(table, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
