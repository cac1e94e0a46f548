"""``python -m infer.bench``: where the time of one cold stage goes (a benchmark, not a test).

    python -m infer.bench [--full] [--device cpu|cuda] [--classes 1,3,5] [--shape 160,160,160]
                          [--weights DIR] [--stage box|click] [--repeats 3] [--json PATH]

For each class count K it writes one synthetic case (uint8 image, K spheres, organizer-style
boxes) and then, in fresh interpreters:

1. a *probe* process that does what ``python -m infer`` does, timing each step: interpreter
   start (spawn to first statement), ``import torch``, ``import infer`` (the modules
   ``python -m infer`` imports), weight loading, npz read, image normalisation, per class
   preprocessing (crop, resample, prompt channels) / forward / postprocessing (paste back),
   merge, label-map download, output write, total; then the same case ``--warm`` more times in
   the same process (first-call costs of the backend show as cold minus warm);
2. ``--repeats`` interleaved pairs of a bare ``python -c "import torch"`` and a full cold stage
   through ``sh predict.sh`` (one case in the inputs folder), medians and the median of the
   per-pair ratios: the ratio is measured in one run, so machine load affects both sides.

Then ``write_segs`` on a 300 x 512 x 512 uint8 label map (``--write-shape``), median of
``--repeats``.

Weights: ``--weights DIR`` (any artifact or release folder), else the bundled ``weights/demo``
when present, else a random-weight artifact of the demo architecture written to a temporary
folder. ``--full``: the nnInteractive v1.0 configuration (102 M parameters, patch 192^3) with
random weights, written once to a temporary folder. Random-weight artifacts get a seg-layer bias
that makes every voxel background, so each class takes exactly one forward pass (no autozoom);
with real weights the number of passes per class is printed.

Standard library at import time (torch and numpy are imported inside functions, so the probe
measures ``import torch`` itself); ``python -m infer`` never imports this module.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# the demo model's architecture (train/configs.py "demo"): 0.61 M parameters, patch 40^3
DEMO_ARCH = {
    "n_stages": 4, "features_per_stage": [8, 16, 32, 64], "kernel_sizes": [[3, 3, 3]] * 4,
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "n_blocks_per_stage": [1, 2, 2, 2],
    "n_conv_per_stage_decoder": [1, 1, 1], "conv_bias": True,
    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "nonlin_kwargs": {"inplace": True},
}
DEMO_PATCH = [40, 40, 40]
# nnInteractive v1.0 (ResEnc-L), patch 192^3
FULL_ARCH = {
    "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320], "kernel_sizes": [[3, 3, 3]] * 6,
    "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
    "n_conv_per_stage_decoder": [1, 1, 1, 1, 1], "conv_bias": True,
    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "nonlin_kwargs": {"inplace": True},
}
FULL_PATCH = [192, 192, 192]

# Rows of the per-stage table, in order: (key, label). The test checks that each label is printed.
ROWS = [
    ("interpreter", "interpreter start"),
    ("import_torch", "import torch"),
    ("import_infer", "import infer"),
    ("weights", "weight loading"),
    ("npz_read", "npz read"),
    ("normalise", "image upload + normalisation"),
    ("pre", "preprocessing per class"),
    ("forward", "forward per class"),
    ("post", "postprocessing per class"),
    ("passes", "forward passes per class"),
    ("merge", "merge (all classes)"),
    ("download", "label map to host"),
    ("write", "output write"),
    ("total", "total (spawn to written)"),
    ("exit", "probe wall (+ warm runs, exit)"),
    ("warm_forward", "warm forward per class"),
    ("warm_case", "warm predict (whole case)"),
    ("peak_mem", "peak device memory"),
]
COLD_ROWS = [
    ("bare", 'bare python -c "import torch"'),
    ("stage", "cold stage: sh predict.sh"),
    ("ratio", "ratio stage / bare"),
]
WRITE_LABEL = "output write {shape} uint8"


# ---------------------------------------------------------------------------------------- probe
# Runs in a fresh interpreter (python -c PROBE): stdlib first, so "import torch" is timed alone.
PROBE = r'''
import time
T_START = time.time()
import json, os, sys
cfg = json.loads(os.environ["INFER_BENCH_PROBE"])
out = {"t_start": T_START}
# the order of python -m infer: its __main__ module (stdlib only; it may set up the environment
# that torch reads when loaded), then torch, then the rest of infer
t = time.perf_counter()
import infer.__main__
t_main = time.perf_counter() - t
t = time.perf_counter()
import torch
out["import_torch"] = time.perf_counter() - t
t = time.perf_counter()
from infer.io import read_case, write_segs
from infer.predictor import Predictor
from infer.prompts import num_classes
import infer.predictor as P
out["import_infer"] = time.perf_counter() - t + t_main
dev = torch.device(cfg["device"])
def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
clock = time.perf_counter
acc = {}
def add(key, dt):
    acc.setdefault(key, []).append(dt)
def timed(key, fn):
    def wrapper(*a, **kw):
        sync(); t0 = clock()
        try:
            return fn(*a, **kw)
        finally:
            sync(); add(key, clock() - t0)
    return wrapper
t = clock()
pred = Predictor.from_path(cfg["weights"], device=cfg["device"])
sync()
out["weights"] = clock() - t
out["threads"] = [torch.get_num_threads(), torch.get_num_interop_threads()]
net = pred.network
class Timed(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, x):
        sync(); t0 = clock()
        y = self.inner(x)
        sync(); add("net", clock() - t0)
        return y
pred.network = Timed(net)
pred.forward = timed("fwd_call", pred.forward)
pred.predict_class = timed("class_call", pred.predict_class)
pred._merge_class = timed("merge", pred._merge_class)
P.normalize_image = timed("normalise", P.normalize_image)
P._Merge.result = timed("download", P._Merge.result)
if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats(dev)
runs = []
for run in range(1 + cfg["warm"]):
    acc.clear()
    t = clock()
    case = read_case(cfg["case"])
    t_read = clock() - t
    k = num_classes(case)
    t = clock()
    segs = pred.predict(case)
    sync()
    t_pred = clock() - t
    r = {k2: sum(v) for k2, v in acc.items()}
    r["npz_read"], r["predict"], r["k"] = t_read, t_pred, k
    r["calls"] = len(acc.get("net", []))
    r["classes_run"] = len(acc.get("class_call", []))
    if run == 0:
        t = clock()
        write_segs(cfg["output"], segs)
        r["write"] = clock() - t
        out["t_written"] = time.time()
    runs.append(r)
out["runs"] = runs
out["peak_mem"] = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
out["labels"] = int(segs.max())
print("INFER_BENCH " + json.dumps(out), flush=True)
'''


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def run_probe(case: Path, weights: Path, device: str, warm: int, output: Path) -> dict:
    """One cold probe process: returns the per-step timings (seconds) described in the module doc."""
    cfg = {"case": str(case), "weights": str(weights), "device": device, "warm": warm, "output": str(output)}
    t_spawn = time.time()
    # cwd: a scratch folder, so that no ``infer`` folder in the caller's directory shadows REPO's
    proc = subprocess.run([sys.executable, "-c", PROBE], env=_env({"INFER_BENCH_PROBE": json.dumps(cfg)}),
                          cwd=str(Path(output).parent), capture_output=True, text=True)
    t_exit = time.time()
    line = [l for l in proc.stdout.splitlines() if l.startswith("INFER_BENCH ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"probe failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    raw = json.loads(line[-1][len("INFER_BENCH "):])
    cold, warm_runs = raw["runs"][0], raw["runs"][1:]
    k = max(cold["classes_run"], 1)
    res = {
        "interpreter": raw["t_start"] - t_spawn,
        "import_torch": raw["import_torch"],
        "import_infer": raw["import_infer"],
        "weights": raw["weights"],
        "npz_read": cold["npz_read"],
        "normalise": cold.get("normalise"),
        # forward() = crop + prompt channels + network + softmax; predict_class() = forward() calls
        # + choosing the crop + autozoom checks + paste back
        "pre": (cold.get("fwd_call", 0) - cold.get("net", 0)) / k,
        "forward": cold.get("net", 0) / k,
        "post": (cold.get("class_call", 0) - cold.get("fwd_call", 0)) / k,
        "passes": cold["calls"] / k,
        "merge": cold.get("merge"),
        "download": cold.get("download"),
        "write": cold.get("write"),
        "total": raw["t_written"] - t_spawn,
        "exit": t_exit - t_spawn,
        "warm_forward": (statistics.median(r.get("net", 0) / max(r["calls"], 1) for r in warm_runs)
                         if warm_runs else None),
        "warm_case": statistics.median(r["npz_read"] + r["predict"] for r in warm_runs) if warm_runs else None,
        "peak_mem": raw["peak_mem"],
        "threads": raw["threads"],
        "classes_run": cold["classes_run"],
    }
    return res


def _wall(cmd, env=None, cwd=None) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return dt


def cold_stage_pairs(case: Path, weights: Path, device: str, repeats: int, work: Path) -> dict:
    """``repeats`` interleaved (bare ``import torch``, ``sh predict.sh``) pairs -> medians and the
    median of the per-pair ratios."""
    inputs, outputs = work / "cold_in", work / "cold_out"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    shutil.copy(case, inputs / case.name)
    script = REPO / "predict.sh"
    env = _env({"PYTHON": sys.executable})
    if script.is_file() and shutil.which("sh"):
        stage_cmd = ["sh", str(script)]
    else:  # installed without predict.sh: the same command it runs
        stage_cmd = [sys.executable, "-m", "infer"]
    stage_cmd += ["--inputs", str(inputs), "--outputs", str(outputs), "--weights", str(weights),
                  "--device", device]
    bare, stage = [], []
    for _ in range(repeats):
        bare.append(_wall([sys.executable, "-c", "import torch"], cwd=str(work)))
        shutil.rmtree(outputs, ignore_errors=True)
        stage.append(_wall(stage_cmd, env=env, cwd=str(work)))
        if not (outputs / case.name).is_file():
            raise RuntimeError(f"{' '.join(stage_cmd)} wrote no output")
    return {"bare": statistics.median(bare), "stage": statistics.median(stage),
            "ratio": statistics.median(s / b for s, b in zip(stage, bare)),
            "bare_all": bare, "stage_all": stage}


def time_write(shape, repeats: int, folder: Path) -> tuple[float, list]:
    """Median seconds of ``write_segs`` for a (shape) uint8 label map with a few labels."""
    import numpy as np
    from infer.io import write_segs
    segs = np.zeros(shape, np.uint8)
    d = shape[0]
    segs[d // 4: d // 2] = 1
    segs[d // 2: 3 * d // 4, : shape[1] // 2] = 2
    times = []
    for i in range(repeats):
        dst = folder / f"write_{i}.npz"
        t = time.perf_counter()
        write_segs(dst, segs)
        times.append(time.perf_counter() - t)
        dst.unlink()
    return statistics.median(times), times


# ---------------------------------------------------------------------------------------- inputs
def make_case(path: Path, shape, k: int, stage: str = "box", seed: int = 0) -> Path:
    """A synthetic case: uint8 image (noise + K bright spheres) with organizer-style boxes; a click
    stage adds ``prev_pred`` (the spheres, slightly too small), one fg click per class and
    ``clicks_order``."""
    import numpy as np
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    img = rng.integers(0, 40, size=shape, dtype=np.uint8)
    prev = np.zeros(shape, np.uint8)
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    boxes, clicks, order = [], [], []
    for c in range(1, k + 1):
        r = max(2, min(shape) // (4 + k))
        center = [int(rng.integers(r, s - r)) for s in shape]
        d2 = sum((g - ci) ** 2 for g, ci in zip(grids, center))
        img[d2 <= r * r] = 100 + (c * 37) % 150
        prev[d2 <= (0.8 * r) ** 2] = c
        lo = [max(ci - r, 0) for ci in center]
        hi = [min(ci + r, s - 1) for ci, s in zip(center, shape)]
        boxes.append({"z_min": lo[0], "z_max": hi[0], "z_mid": center[0], "z_mid_y_min": lo[1],
                      "z_mid_y_max": hi[1], "z_mid_x_min": lo[2], "z_mid_x_max": hi[2]})
        clicks.append({"fg": [[int(v) for v in center]], "bg": []})
        order.append(["fg"])
    arrays = {"imgs": img, "spacing": np.array([1.0, 1.0, 1.0]), "boxes": np.array(boxes, dtype=object)}
    if stage == "click":
        arrays.update(prev_pred=prev, clicks=np.array(clicks, dtype=object),
                      clicks_order=np.array(order + [None], dtype=object)[:-1])
    np.savez(path, **arrays)
    return path


def make_random_artifact(dst: Path, arch: dict, patch, device: str = "cpu") -> Path:
    """A random-weight artifact (float32) of ``arch``: built on the meta device, materialised on
    ``device`` with small normal weights, unit norms, and a seg-layer bias that makes every voxel
    background (one forward pass per class, no autozoom)."""
    import torch
    from infer.card import ModelCard
    from infer.convert import write_artifact
    from infer.network import build_network
    with torch.device("meta"):
        net = build_network(arch, 8, 2)
    net = net.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".norm." in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
        seg = net.decoder.seg_layers[-1]
        seg.weight.mul_(0.01)
        seg.bias.copy_(torch.tensor([4.0, -4.0]))
    card = ModelCard(architecture=net.arch, input_channels=8, num_classes=2, patch_size=list(patch),
                     box_style="2d", demo=True, source="infer.bench: random weights, timing only")
    sd = {k: v.cpu() for k, v in net.state_dict().items()}
    return write_artifact(dst, sd, card)


# ---------------------------------------------------------------------------------------- report
def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key == "passes":
        return f"{v:.1f}"
    if key == "ratio":
        return f"{v:.2f} x"
    if key == "peak_mem":
        return f"{v / 2 ** 30:.2f} GiB"
    return f"{v:.3f} s" if v >= 0.01 else f"{v * 1000:.1f} ms"


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    text = (f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def print_table(title: str, cols: list, rows: list, data: dict, file=sys.stdout) -> None:
    w0 = max(len(label) for _, label in rows) + 2
    print(title, file=file)
    print(" " * w0 + "".join(f"{c:>12}" for c in cols), file=file)
    for key, label in rows:
        print(f"{label:<{w0}}" + "".join(f"{_fmt(key, data[c].get(key)):>12}" for c in cols), file=file)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infer.bench", description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="nnInteractive v1.0 configuration, random weights")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--classes", default=None, help="class counts, comma-separated (default 1,3,5; --full on CPU: 1)")
    p.add_argument("--shape", default="160,160,160", help="case shape z,y,x (default 160,160,160)")
    p.add_argument("--weights", default=None, help="model folder (default: weights/demo, else random demo-architecture)")
    p.add_argument("--stage", choices=("box", "click"), default="box", help="box stage or a click stage case")
    p.add_argument("--repeats", type=int, default=3, help="cold (bare, stage) pairs and output writes (default 3)")
    p.add_argument("--warm", type=int, default=2, help="extra predictions of the case in the probe process")
    p.add_argument("--write-shape", default="300,512,512", help="label map shape for the output write row")
    p.add_argument("--no-cold", action="store_true", help="skip the sh predict.sh / bare import pairs")
    p.add_argument("--json", default=None, help="also write all figures to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = [int(s) for s in args.shape.split(",")]
    wshape = [int(s) for s in args.write_shape.split(",")]
    classes = [int(c) for c in (args.classes or ("1" if args.full and args.device == "cpu" else "1,3,5")).split(",")]
    with tempfile.TemporaryDirectory(prefix="infer-bench-") as tmp:
        work = Path(tmp)
        if args.full:
            weights = make_random_artifact(work / "full", FULL_ARCH, FULL_PATCH)
            wdesc = f"nnInteractive v1.0 configuration, random weights, patch {FULL_PATCH}"
        elif args.weights:
            weights = Path(args.weights)
            wdesc = str(weights)
        elif (REPO / "weights" / "demo").is_dir():
            weights = REPO / "weights" / "demo"
            wdesc = "bundled weights/demo"
        else:
            weights = make_random_artifact(work / "demo", DEMO_ARCH, DEMO_PATCH)
            wdesc = f"demo architecture with random weights (weights/demo not present), patch {DEMO_PATCH}"
        print(f"machine: {machine()}")
        print(f"weights: {wdesc}; device {args.device}; case {'x'.join(map(str, shape))} uint8, {args.stage} stage")
        results, cold = {}, {}
        for k in classes:
            case = make_case(work / f"bench_k{k}.npz", shape, k, args.stage)
            results[k] = run_probe(case, weights, args.device, args.warm, work / f"probe_out_k{k}.npz")
            if not args.no_cold:
                cold[k] = cold_stage_pairs(case, weights, args.device, args.repeats, work)
        cols = [f"K={k}" for k in classes]
        threads = results[classes[0]]["threads"]
        print_table(f"\none cold probe process per K (torch threads intra/inter-op {threads[0]}/{threads[1]}):",
                    cols, ROWS, {f"K={k}": results[k] for k in classes})
        if cold:
            print_table(f"\ncold stage, median of {args.repeats} interleaved pairs (ratio: median of per-pair ratios):",
                        cols, COLD_ROWS, {f"K={k}": cold[k] for k in classes})
        w, wall = time_write(wshape, args.repeats, work)
        label = WRITE_LABEL.format(shape="x".join(map(str, wshape)))
        print(f"\n{label} (median of {args.repeats}, to {work}): {_fmt('write', w)}")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "machine": machine(), "weights": wdesc, "device": args.device, "shape": shape,
                "stage": args.stage, "probe": results, "cold": cold, "write": {"shape": wshape, "median": w, "all": wall},
            }, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
