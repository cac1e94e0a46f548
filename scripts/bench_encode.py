"""Time ``infer.prompts.encode`` with many clicks on one class (the 60 000-click robustness case).

    .venv/bin/python -m scripts.bench_encode [--patch 192] [--clicks 60000]

Prints seconds per encode for: identical repeated clicks, distinct clicks scattered over a
64-voxel object, and clicks at the volume's corners, far outside the crop, at zoom 1 and 4 (patch ``--patch``^3).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from infer.geometry import make_crop
from infer.prompts import ClassPrompts, encode


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", type=int, default=192)
    ap.add_argument("--clicks", type=int, default=60_000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, p = args.clicks, args.patch
    shape = big = (9 * p, 9 * p, 9 * p)  # a crop at zoom 4 covers less than half of each axis
    c = tuple(s // 2 for s in shape)
    rng = np.random.default_rng(0)
    scattered = [(bool(i % 2), tuple(int(v) for v in c + rng.integers(-32, 32, 3))) for i in range(n)]
    cases = {
        "identical": [(True, c)] * n,
        "scattered": scattered,
        "far": [(True, (0, 0, 0))] * (n // 2) + [(False, tuple(s - 1 for s in big))] * (n // 2),
    }
    for zoom in (1.0, 4.0):
        crop = make_crop(c, zoom, (p, p, p))
        for name, clicks in cases.items():
            t = time.perf_counter()
            out = encode(ClassPrompts(clicks=clicks), crop, None, radius=4, decay=0.9, shape=shape)
            dt = time.perf_counter() - t
            print(f"zoom {zoom:3.1f} {name:10s} {n} clicks: {dt:6.2f} s  (point mass {float(out[3:5].sum()):.1f})")


if __name__ == "__main__":
    main()
