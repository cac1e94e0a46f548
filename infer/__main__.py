"""``python -m infer``: segment every ``*.npz`` case of an input folder into an output folder.

Every input gets an output (``segs``, written atomically); one bad case or class never stops the
others; a time budget per case (``--seconds-per-class`` x K from process start) makes late classes
keep their previous masks instead of running over.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

T0 = time.monotonic()

log = logging.getLogger("infer")


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m infer", description=__doc__.splitlines()[0])
    p.add_argument("--inputs", default=env("INFER_INPUTS", "/workspace/inputs"), help="folder of case .npz files")
    p.add_argument("--outputs", default=env("INFER_OUTPUTS", "/workspace/outputs"), help="folder for the outputs")
    p.add_argument("--weights", default=env("INFER_WEIGHTS", "/workspace/weights"),
                   help="converted artifact folder (model_card.json) or nnInteractive release folder")
    p.add_argument("--device", default=env("INFER_DEVICE") or None, help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--seconds-per-class", type=float, default=float(env("INFER_SECONDS_PER_CLASS", "14")),
                   help="time budget of one stage per class, from process start (the harness allows 90 s "
                        "per class for all six stages together; default 14)")
    p.add_argument("--no-autozoom", action="store_true", help="never zoom out and predict again")
    p.add_argument("--threads", type=int, default=int(env("INFER_THREADS", "0")), help="CPU threads (0: all cores)")
    return p.parse_args(argv)


def _fallback_segs(path, case):
    """Zeros of the image's shape (or its previous prediction) for a case that could not be segmented."""
    import numpy as np
    from .io import imgs_shape
    if case is not None:
        prev = case.get("prev_pred")
        if prev is not None:
            return prev.astype(np.uint8 if prev.max(initial=0) <= 255 else np.uint16)
        return np.zeros(case["imgs"].shape, np.uint8)
    shape = imgs_shape(path)
    return None if shape is None else np.zeros(shape, np.uint8)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="infer: %(message)s", stream=sys.stderr)
    names = sorted(n for n in os.listdir(args.inputs) if n.endswith(".npz")) if os.path.isdir(args.inputs) else []
    if not names:
        log.error("no .npz cases in %s", args.inputs)
        return 1 if not os.path.isdir(args.inputs) else 0
    os.makedirs(args.outputs, exist_ok=True)

    import torch
    from .io import read_case, write_segs
    from .predictor import Predictor
    from .prompts import num_classes
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        predictor = Predictor.from_path(args.weights, device=args.device, autozoom=not args.no_autozoom)
    except Exception as exc:
        log.error("cannot load weights from %s: %s", args.weights, exc)
        predictor = None
    log.info("model ready on %s after %.2f s", predictor.device if predictor else "-", time.monotonic() - T0)

    failures = 0
    for name in names:
        src, dst = os.path.join(args.inputs, name), os.path.join(args.outputs, name)
        t_case = time.monotonic()
        case = segs = None
        try:
            case = read_case(src)
            if predictor is None:
                raise RuntimeError("no model loaded")
            k = num_classes(case)
            deadline = (T0 if name == names[0] else t_case) + args.seconds_per_class * max(k, 1)
            segs = predictor.predict(case, deadline=deadline)
        except Exception as exc:
            failures += 1
            log.error("%s: %s: %s", name, type(exc).__name__, exc)
            try:
                segs = _fallback_segs(src, case)
            except Exception as exc2:  # unreadable even for its shape
                log.error("%s: no output possible: %s", name, exc2)
        if segs is not None:
            try:
                write_segs(dst, segs)
            except Exception as exc:
                failures += 1
                log.error("%s: writing %s failed: %s", name, dst, exc)
                continue
            log.info("%s: written (labels up to %d), %.2f s", name, int(segs.max(initial=0)), time.monotonic() - t_case)
    log.info("done: %d case(s), %d problem(s), %.2f s in all", len(names), failures, time.monotonic() - T0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
