"""``python -m scripts.bench``: where the time of one cold stage goes (a benchmark, not a test).

    python -m scripts.bench [--full] [--device cpu|cuda] [--classes 1,3,5] [--shape 160,160,160]
                          [--weights DIR] [--stage box|click] [--repeats 3] [--json PATH]

For each class count K it writes one synthetic case (``scripts/cases.py``: uint8 image, K
spheres, organizer-style boxes) and then, in fresh interpreters:

1. a *probe* process (``scripts/bench_probe.py``) that does what ``python -m infer`` does through
   the predictor's public API, timing each step from the outside: interpreter start (spawn to
   first statement), ``import torch``, ``import infer`` (the modules ``python -m infer``
   imports), weight loading, npz read, per class the network passes (forward hooks) and the rest
   of ``predict`` (normalisation, crops, prompt channels, resampling, merge), output write,
   total; then the same case ``--warm`` more times in the same process (first-call costs of the
   backend show as cold minus warm);
2. ``--repeats`` interleaved pairs of a bare ``python -c "import torch"`` and a full cold stage
   through ``sh predict.sh`` (one case in the inputs folder), medians and the median of the
   per-pair ratios: the ratio is measured in one run, so machine load affects both sides.

Then ``write_segs`` on a 300 x 512 x 512 uint8 label map (``--write-shape``), median of
``--repeats``.

Weights: ``--weights DIR`` (any artifact or release folder), else the bundled ``weights/demo``
when present, else a random-weight artifact of the demo configuration (``train/configs.py``)
written to a temporary folder. ``--full``: the nnInteractive v1.0 configuration (102 M parameters, patch 192^3) with
random weights, written once to a temporary folder. Random-weight artifacts get a seg-layer bias
that makes every voxel background, so each class takes exactly one forward pass (no autozoom);
with real weights the number of passes per class is printed.

Outside the image: ``scripts/`` is not part of the runtime; ``python -m infer`` imports nothing
from it.
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
if str(REPO) not in sys.path:  # also as ``python scripts/bench.py``
    sys.path.insert(0, str(REPO))

from scripts.cases import make_case  # noqa: E402
from train.configs import get_config  # noqa: E402

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
    ("forward", "forward per class"),
    ("passes", "forward passes per class"),
    ("rest", "rest of predict per class"),
    ("write", "output write"),
    ("total", "total (spawn to written)"),
    ("exit", "probe wall (+ warm runs, exit)"),
    ("warm_forward", "warm forward per pass"),
    ("warm_case", "warm predict (whole case)"),
    ("peak_mem", "peak device memory"),
]
COLD_ROWS = [
    ("bare", 'bare python -c "import torch"'),
    ("stage", "cold stage: sh predict.sh"),
    ("ratio", "ratio stage / bare"),
]
WRITE_LABEL = "output write {shape} uint8"


def random_network(arch: dict, device="cpu", seed: int = 0, background_bias: bool = True):
    """The network of ``arch`` (8 input channels, 2 classes) with He-normal convolutions, unit
    norms and zero biases, built on the meta device and materialised on ``device``.
    ``background_bias``: the last seg layer's weights scaled by 0.01 and its bias (4, -4), so that
    every voxel is background and each class takes exactly one forward pass (timing: no autozoom,
    no refinement)."""
    import torch
    from infer.network import build_network
    with torch.device("meta"):
        net = build_network(arch, 8, 2)
    net = net.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".norm." in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, (2.0 / (p[0].numel() if p.dim() > 1 else 1)) ** 0.5, generator=gen)
        if background_bias:
            seg = net.decoder.seg_layers[-1]
            seg.weight.mul_(0.01)
            seg.bias.copy_(torch.tensor([4.0, -4.0]))
    return net.eval()


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def run_probe(case: Path, weights: Path, device: str, warm: int, output: Path) -> dict:
    """One cold probe process (``scripts/bench_probe.py``): the per-step timings (seconds)
    described in the module doc."""
    from scripts import bench_probe
    cfg = {"case": str(case), "weights": str(weights), "device": device, "warm": warm, "output": str(output)}
    t_spawn = time.time()
    # cwd: a scratch folder, so that no ``infer`` folder in the caller's directory shadows REPO's
    proc = subprocess.run([sys.executable, "-m", "scripts.bench_probe", json.dumps(cfg)], env=_env(),
                          cwd=str(Path(output).parent), capture_output=True, text=True)
    t_exit = time.time()
    line = [l for l in proc.stdout.splitlines() if l.startswith(bench_probe.MARK)]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"probe failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    raw = json.loads(line[-1][len(bench_probe.MARK):])
    cold, warm_runs = raw["runs"][0], raw["runs"][1:]
    k = max(cold["k"], 1)
    return {
        "interpreter": raw["t_start"] - t_spawn,
        "import_torch": raw["import_torch"],
        "import_infer": raw["import_infer"],
        "weights": raw["weights"],
        "npz_read": cold["npz_read"],
        "forward": cold["net"] / k,
        "passes": cold["calls"] / k,
        "rest": (cold["predict"] - cold["net"]) / k,
        "write": cold["write"],
        "total": raw["t_written"] - t_spawn,
        "exit": t_exit - t_spawn,
        "warm_forward": (statistics.median(r["net"] / max(r["calls"], 1) for r in warm_runs)
                         if warm_runs else None),
        "warm_case": statistics.median(r["npz_read"] + r["predict"] for r in warm_runs) if warm_runs else None,
        "peak_mem": raw["peak_mem"],
        "threads": raw["threads"],
        "classes": cold["k"],
    }


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
    from infer.writer import write_segs
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


# ---------------------------------------------------------------------------------------- weights
def make_random_artifact(dst: Path, arch: dict, patch, device: str = "cpu") -> Path:
    """A random-weight artifact (float32) of ``arch``: built on the meta device, materialised on
    ``device`` with small normal weights, unit norms, and a seg-layer bias that makes every voxel
    background (one forward pass per class, no autozoom)."""
    from infer.card import ModelCard
    from infer.convert import write_artifact
    net = random_network(arch, device, seed=0, background_bias=True)
    card = ModelCard(architecture=net.arch, input_channels=8, num_classes=2, patch_size=list(patch),
                     box_style="2d", demo=True, source="scripts/bench.py: random weights, timing only")
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
    p = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--full", action="store_true", help="nnInteractive v1.0 configuration, random weights")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--classes", default=None,
                   help="class counts, comma-separated (None: 1,3,5; with --full on CPU: 1)")
    p.add_argument("--shape", default="160,160,160", help="case shape z,y,x")
    p.add_argument("--weights", default=None,
                   help="model folder (None: weights/demo, else the demo configuration with random weights)")
    p.add_argument("--stage", choices=("box", "click"), default="box", help="box stage or a click stage case")
    p.add_argument("--repeats", type=int, default=3, help="cold (bare, stage) pairs and output writes")
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
            weights = Path(args.weights).resolve()  # the probe runs in another folder
            wdesc = str(weights)
        elif (REPO / "weights" / "demo").is_dir():
            weights = REPO / "weights" / "demo"
            wdesc = "bundled weights/demo"
        else:
            demo = get_config("demo")
            weights = make_random_artifact(work / "demo", demo["architecture"], demo["patch_size"])
            wdesc = f"demo configuration with random weights (weights/demo not present), patch {demo['patch_size']}"
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
