"""python -m evaluation: score a predictor the way the organizer does, on a folder of cases.

    python -m evaluation --images DIR [--gts DIR] --out DIR [--warm | --docker IMAGE_OR_TARBALL]
                         [--weights PATH] [--device cpu|cuda] [--workers N]
                         [--shard I/N | --merge-shards N]

Folders follow the organizer's validation layout: ``--images`` holds ``<case>.npz`` (``imgs``,
``spacing``, optional ``boxes``), ``--gts`` the same file names with ``gts``; without ``--gts``
each image file must hold its own ``gts`` (training layout). Cases run in sorted name order.
Writes ``OUT/metrics.csv`` and ``OUT/report.png`` and prints one summary line.

``--workers N`` shards the cases over N worker processes (one GPU each when there are GPUs) and
merges their results into the report one worker writes (``evaluation.shard``); ``--shard I/N``
runs one such share (e.g. on another machine) and ``--merge-shards N`` writes the report from
the shares under ``OUT/shards/``.

``--predict-arg ARGS`` (repeatable) passes ``python -m infer`` options to the predictor
(``evaluation.predict_args``); each case's stages are drawn in ``OUT/cases/<case>.png``
(``evaluation.pictures``) unless ``--no-pictures``; the click-harm line (``evaluation.harm``)
follows the summary line.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Idle OpenMP threads sleep rather than spin in warm mode too (python -m infer sets it for itself;
# a warm evaluation never imports infer.__main__): on a CPU shared with other jobs a spinning warm
# evaluation ran a real-CT case in 202 s against 16-20 s; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .harm import harm_summary_line
from .pictures import draw_picture
from .predict_args import split_predict_args, warm_options
from .report import error_summary, plot_report, split_summary_line, summary_line, write_csv
from .runner import REPO_ROOT, ColdRunner, DockerRunner, WarmRunner, evaluate_case
from . import shard as sharding


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
    p.add_argument("--device", choices=("cpu", "cuda"), help="passed as INFER_DEVICE / device= "
                   "(default: the predictor's choice, cuda when present)")
    p.add_argument("--predict-sh", type=Path, default=REPO_ROOT / "predict.sh",
                   help="cold mode script (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, each scoring its "
                   "share of the cases on its own GPU (CPU processes without GPUs); the report is "
                   "the one-worker report, but timings are only representative with 1 (default: %(default)s)")
    shards = p.add_mutually_exclusive_group()
    shards.add_argument("--shard", metavar="I/N", help="score only cases I, I+N, I+2N, ... and "
                        "write OUT/shards/shard-I-of-N.json and .csv (no report)")
    shards.add_argument("--merge-shards", type=int, metavar="N", help="write the report from "
                        "OUT/shards/shard-*-of-N.json (after --shard runs) without running cases")
    p.add_argument("--network-none", action="store_true", help="docker mode: run with --network none")
    p.add_argument("--docker-gpu-device", default="0", metavar="ID",
                   help="docker mode: the host GPU given to the container (default 0, the organizer's)")
    gpus = p.add_mutually_exclusive_group()
    gpus.add_argument("--gpus", dest="gpus", action="store_true", default=None,
                      help="docker mode: pass the GPU (default: when nvidia-smi lists one)")
    gpus.add_argument("--no-gpus", dest="gpus", action="store_false", help="docker mode: run without GPU")
    p.add_argument("--ignore-budget", action="store_true", help="report the scores of cases over "
                   "90 s x K instead of 0 (they are flagged either way)")
    p.add_argument("--limit", type=int, help="only the first N cases (default: all)")
    p.add_argument("--keep-work", action="store_true", help="keep OUT/work/<case>/inputs|outputs")
    p.add_argument("--predict-arg", action="append", metavar="ARGS", help="python -m infer "
                   "options for the predictor, e.g. --predict-arg=--no-refine or --predict-arg="
                   "'--policy reference' (repeatable; cold: appended to predict.sh; warm: as "
                   "Predictor arguments; not in docker mode; see evaluation/predict_args.py)")
    p.add_argument("--no-pictures", action="store_true", help="skip OUT/cases/<case>.png")
    return p


def make_runner(args, log):
    extra = split_predict_args(args.predict_arg)
    if args.warm:
        kwargs, threads = warm_options(extra)
        if threads:
            import torch
            torch.set_num_threads(threads)
        device = kwargs.pop("device", args.device)
        return WarmRunner.from_weights(args.weights, device=device, log=log, **kwargs), "warm"
    if args.docker:
        if extra:
            raise SystemExit("--predict-arg cannot be used with --docker: the organizer's command "
                             "is a plain 'sh predict.sh'")
        from .docker_runner import host_has_gpu, load_image  # Docker mode only
        gpus = args.gpus if args.gpus is not None else host_has_gpu()
        return DockerRunner(load_image(args.docker), gpus=gpus, network_none=args.network_none,
                            gpu_device=args.docker_gpu_device), "docker"
    return ColdRunner(args.predict_sh, weights=args.weights, device=args.device,
                      log_path=args.out / "predict.log", extra_args=extra), "cold"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cases = sorted(p for p in args.images.glob("*.npz") if p.is_file())[:args.limit]
    if not cases:
        print(f"no .npz files in {args.images}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge_shards:
        return merge(args, cases)
    shard = sharding.parse_shard(args.shard) if args.shard else None
    if shard is None and args.workers > 1:
        return run_sharded(args, argv, cases)
    if shard is not None:
        cases = sharding.shard_cases(cases, *shard)
    log = tqdm.write
    runner, mode = make_runner(args, log)
    work_root = args.out / "work" if args.keep_work else Path(tempfile.mkdtemp(prefix="eval-"))

    def one(image):
        gts = args.gts / image.name if args.gts else None
        if gts is not None and not gts.is_file():
            log(f"{image.name}: no ground truth {gts}; skipped")
            return None
        try:
            r = evaluate_case(image, gts, runner, work_root / image.stem, log=log,
                              keep_segs=not args.no_pictures)
        except (ValueError, OSError, KeyError) as exc:
            log(f"{image.name}: not evaluated: {exc}")
            return None
        if not args.no_pictures:
            draw_picture(r, image, gts, args.out / "cases" / f"{image.stem}.png", log)
        return r

    results = []
    bar = tqdm(total=len(cases), desc=f"evaluating ({mode})", unit="case", disable=shard is not None)
    try:
        with logging_redirect_tqdm():  # the predictor's own log lines (warm mode) above the bar
            for image in cases:
                r = one(image)
                bar.update(1)
                if shard is not None:
                    print(sharding.DONE_MARK + image.name, flush=True)
                if r is not None:
                    results.append(r)
                    bar.set_postfix(DSC_Final=f"{r.dsc[-1]:.3f}", time=f"{r.total_time:.0f}s")
    finally:
        bar.close()
        if not args.keep_work:
            shutil.rmtree(work_root, ignore_errors=True)
    if shard is not None:
        sharding.write_shard(args.out, *shard, mode, [c.name for c in cases], results)
        write_csv(results, sharding.shard_file(args.out, *shard, ".csv"),
                  zero_over_budget=not args.ignore_budget)
        return 0
    return report(args, results, mode)


def report(args, results, mode: str) -> int:
    """metrics.csv, report.png and the summary line of ``results``; 0 when there are any."""
    zero = not args.ignore_budget
    write_csv(results, args.out / "metrics.csv", zero_over_budget=zero)
    line = summary_line(results, zero_over_budget=zero, mode=mode)
    plot_report(results, args.out / "report.png", title=line)
    print(line)
    print(split_summary_line(results, zero_over_budget=zero))
    print(harm_summary_line(results))
    errors = error_summary(results)
    if errors:  # e.g. every stage fell back to zeros: say why, and where the whole output is
        log = args.out / "predict.log"
        print(errors + (f" (all predictor output: {log})" if mode == "cold" and log.is_file() else ""))
    print(f"wrote {args.out / 'metrics.csv'} and {args.out / 'report.png'}")
    return 0 if results else 1


def merge(args, cases, n=None) -> int:
    """The report of the shard files of ``n`` (default ``--merge-shards``) workers under OUT."""
    n = n or args.merge_shards
    results, mode, missing = sharding.merge_shards(args.out, n)
    if missing:
        print(f"no result file from shard(s) {missing} of {n} in {args.out / 'shards'}: "
              f"their cases are not in the report", file=sys.stderr)
    unknown = {r.name for r in results} - {c.name for c in cases}
    if unknown:
        print(f"shard results for cases not in {args.images}: {sorted(unknown)}", file=sys.stderr)
    code = report(args, results, mode or "merged")
    return 1 if missing else code


def run_sharded(args, argv, cases) -> int:
    """``--workers N``: N ``--shard I/N`` processes, then their merged report."""
    n = min(args.workers, len(cases))
    mode = "warm" if args.warm else "docker" if args.docker else "cold"
    tag = gpus_flag = None
    if mode == "docker":  # load the tarball once; the workers get the tag
        from .docker_runner import host_has_gpu, load_image
        tag = load_image(args.docker)
        gpus_flag = args.gpus if args.gpus is not None else host_has_gpu()
    gpus = sharding.visible_gpus(args.device)
    for i in range(n):  # stale results of an earlier run must not be merged
        sharding.shard_file(args.out, i, n).unlink(missing_ok=True)
    commands = [sharding.worker_args(argv, i, n, gpus, mode, tag, gpus_flag) for i in range(n)]
    envs = [sharding.worker_env(i, n, gpus, mode) for i in range(n)]
    where = (f"GPUs {', '.join(gpus[i % len(gpus)] for i in range(n))}" if gpus and
             (mode != "docker" or gpus_flag) else "CPU")
    tqdm.write(f"{len(cases)} cases on {n} workers ({where})")
    bar = tqdm(total=len(cases), desc=f"evaluating ({mode}, {n} workers)", unit="case")
    try:
        codes = sharding.run_workers(commands, envs, lambda k, name: bar.update(1), tqdm.write)
    finally:
        bar.close()
    failed = [i for i, c in enumerate(codes) if c != 0]
    if failed:
        print(f"worker(s) {failed} exited with {[codes[i] for i in failed]}", file=sys.stderr)
    code = merge(args, cases, n)
    return 1 if failed else code


if __name__ == "__main__":
    sys.exit(main())
