"""Peak host memory of ``python -m infer`` on a 300 x 512 x 512 case with 10 classes.

A measurement, not a test: it builds a CT-sized case with ``scripts/cases.py`` (uint8 image with
10 spheres and their boxes; for the click stage also clicks, clicks_order and a previous
prediction), a tiny converted model (scripts/tinymodel.py), runs ``python -m infer`` on it in a
subprocess and reports the child's peak resident set size (``ru_maxrss`` from ``os.wait4``), the wall time and the log summary.
Target: under 8 GB (the container has 32 GB). The tiny model keeps network memory negligible, so
the figure is what the volume-sized arrays (image, normalised image, merge volumes, previous
mask, output) cost; a real 192^3 model adds its weights and, on CPU, its activations.

``--dtype`` stores ``imgs`` as another dtype (the uint8 values cast), ``--prev-dtype`` the click
stage's ``prev_pred``: the coefficients of the byte model in ``infer/limits.py`` come from runs
over these (docs/HARDENING.md). Each line also gives the peak in bytes per voxel.

    .venv/bin/python scripts/memory_bench.py [--shape 300 512 512] [--classes 10] [--device cpu]
        [--dtype uint8] [--prev-dtype uint8] [--stages box click]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.cases import make_case  # noqa: E402


def run(inputs: Path, outputs: Path, weights: Path, device: str, seconds_per_class: float):
    """-> (peak RSS bytes, wall seconds, exit status, stderr)."""
    cmd = [sys.executable, "-m", "infer", "--inputs", str(inputs), "--outputs", str(outputs),
           "--weights", str(weights), "--device", device, "--seconds-per-class", str(seconds_per_class)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024, time.monotonic() - t0, proc.returncode, stderr  # Linux: KiB


def recast(path: Path, dtype: str, prev_dtype: str) -> None:
    """Rewrite the case at ``path`` with ``imgs`` as ``dtype`` and ``prev_pred`` (if any) as
    ``prev_dtype``; the other members as they were."""
    with np.load(path, allow_pickle=True) as z:
        members = {k: z[k] for k in z.files}
    members["imgs"] = members["imgs"].astype(dtype)
    if "prev_pred" in members:
        members["prev_pred"] = members["prev_pred"].astype(prev_dtype)
    np.savez(path, **members)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/memory_bench.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("D", "H", "W"),
                   help="case shape z y x")
    p.add_argument("--classes", type=int, default=10, help="number of classes K")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--stages", nargs="+", default=["box", "click"], choices=["box", "click"],
                   help="which stages to measure")
    p.add_argument("--seconds-per-class", type=float, default=1000.0,
                   help="large by default: measure the full work, not what the time budget lets through")
    p.add_argument("--dtype", default="uint8", help="dtype of imgs (uint8, int16, float32, float64, ...)")
    p.add_argument("--prev-dtype", default="uint8", help="dtype of prev_pred in the click stage")
    p.add_argument("--limit-gb", type=float, default=8.0, help="peak RSS above this fails (exit 1)")
    args = p.parse_args(argv)

    from scripts.tinymodel import make_artifact
    shape = tuple(args.shape)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = make_artifact(tmp / "model")
        for stage in args.stages:
            inputs, outputs = tmp / f"in_{stage}", tmp / f"out_{stage}"
            inputs.mkdir()
            make_case(inputs / "case.npz", shape, args.classes, stage)
            if (args.dtype, args.prev_dtype) != ("uint8", "uint8"):
                recast(inputs / "case.npz", args.dtype, args.prev_dtype)
            peak, wall, rc, stderr = run(inputs, outputs, weights, args.device, args.seconds_per_class)
            with np.load(outputs / "case.npz") as z:
                segs = z["segs"]
                good = segs.shape == shape and int(segs.max()) <= args.classes
            summary = [l for l in stderr.splitlines() if l.startswith("infer: case.npz: ")]
            gb = peak / 1e9
            ok &= rc == 0 and good and gb < args.limit_gb
            prev = f", prev_pred {args.prev_dtype}" if stage == "click" else ""
            print(f"{stage} stage: shape {'x'.join(map(str, shape))}, imgs {args.dtype}{prev}, K={args.classes}: "
                  f"peak RSS {gb:.2f} GB = {peak / np.prod(shape):.1f} B/voxel ({peak} B; image alone "
                  f"{np.prod(shape) * np.dtype(args.dtype).itemsize / 1e9:.2f} GB), {wall:.1f} s, exit {rc}, "
                  f"output ok {good}")
            for line in summary[-3:]:
                print("   ", line)
    print(f"{'PASS' if ok else 'FAIL'}: limit {args.limit_gb} GB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
