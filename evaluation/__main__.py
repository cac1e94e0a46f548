"""python -m evaluation: score a predictor the way the organizer does, on a folder of cases.

    python -m evaluation --images DIR [--gts DIR] --out DIR [--warm | --docker IMAGE_OR_TARBALL]
                         [--weights PATH] [--device cpu|cuda] [--workers 1]

Folders follow the organizer's validation layout: ``--images`` holds ``<case>.npz`` (``imgs``,
``spacing``, optional ``boxes``), ``--gts`` the same file names with ``gts``; without ``--gts``
each image file must hold its own ``gts`` (training layout). Cases run in sorted name order.
Writes ``OUT/metrics.csv`` and ``OUT/report.png`` and prints one summary line.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from .report import plot_report, summary_line, write_csv
from .runner import REPO_ROOT, ColdRunner, DockerRunner, WarmRunner, evaluate_case


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, type=Path, help="folder of <case>.npz inputs")
    p.add_argument("--gts", type=Path, help="folder of <case>.npz holding 'gts' (default: 'gts' "
                   "inside each image file)")
    p.add_argument("--out", required=True, type=Path, help="where metrics.csv and report.png go")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--warm", action="store_true", help="one in-process Predictor for all "
                      "stages (fast; default is cold: 'sh predict.sh' per stage)")
    mode.add_argument("--docker", metavar="IMAGE_OR_TARBALL", help="one 'docker run' per stage")
    p.add_argument("--weights", default=os.environ.get("INFER_WEIGHTS", str(REPO_ROOT / "weights")),
                   help="weights folder for cold and warm modes (default $INFER_WEIGHTS or weights/)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="passed as INFER_DEVICE / device=")
    p.add_argument("--predict-sh", type=Path, default=REPO_ROOT / "predict.sh", help="cold mode script")
    p.add_argument("--workers", type=int, default=1, help="cases run at once (cold and docker "
                   "modes; timings are only representative with 1)")
    p.add_argument("--network-none", action="store_true", help="docker mode: run with --network none")
    gpus = p.add_mutually_exclusive_group()
    gpus.add_argument("--gpus", dest="gpus", action="store_true", default=None,
                      help="docker mode: pass the GPU (default: when nvidia-smi lists one)")
    gpus.add_argument("--no-gpus", dest="gpus", action="store_false")
    p.add_argument("--ignore-budget", action="store_true", help="report the scores of cases over "
                   "90 s x K instead of 0 (they are flagged either way)")
    p.add_argument("--limit", type=int, help="only the first N cases")
    p.add_argument("--keep-work", action="store_true", help="keep OUT/work/<case>/inputs|outputs")
    return p


def make_runner(args, log):
    if args.warm:
        return WarmRunner.from_weights(args.weights, device=args.device, log=log), "warm"
    if args.docker:
        from .docker_runner import host_has_gpu, load_image  # Docker mode only
        gpus = args.gpus if args.gpus is not None else host_has_gpu()
        return DockerRunner(load_image(args.docker), gpus=gpus,
                            network_none=args.network_none), "docker"
    return ColdRunner(args.predict_sh, weights=args.weights, device=args.device,
                      log_path=args.out / "predict.log"), "cold"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cases = sorted(p for p in args.images.glob("*.npz") if p.is_file())[:args.limit]
    if not cases:
        print(f"no .npz files in {args.images}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    log = tqdm.write
    runner, mode = make_runner(args, log)
    workers = 1 if mode == "warm" else max(1, args.workers)
    work_root = args.out / "work" if args.keep_work else Path(tempfile.mkdtemp(prefix="eval-"))

    def one(image):
        gts = args.gts / image.name if args.gts else None
        if gts is not None and not gts.is_file():
            log(f"{image.name}: no ground truth {gts}; skipped")
            return None
        try:
            return evaluate_case(image, gts, runner, work_root / image.stem, log=log)
        except (ValueError, OSError, KeyError) as exc:
            log(f"{image.name}: not evaluated: {exc}")
            return None

    results = []
    bar = tqdm(total=len(cases), desc=f"evaluating ({mode})", unit="case")
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for r in pool.map(one, cases):
                bar.update(1)
                if r is not None:
                    results.append(r)
                    bar.set_postfix(DSC_Final=f"{r.dsc[-1]:.3f}", time=f"{r.total_time:.0f}s")
    finally:
        bar.close()
        if not args.keep_work:
            shutil.rmtree(work_root, ignore_errors=True)
    zero = not args.ignore_budget
    write_csv(results, args.out / "metrics.csv", zero_over_budget=zero)
    line = summary_line(results, zero_over_budget=zero, mode=mode)
    plot_report(results, args.out / "report.png", title=line)
    print(line)
    print(f"wrote {args.out / 'metrics.csv'} and {args.out / 'report.png'}")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
