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

# Idle OpenMP workers sleep instead of spinning (set before torch is imported: libgomp reads it
# once). Spinning workers on a CPU shared with other processes slowed forward passes 5-40x
# (docs/PERFORMANCE.md); an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("infer")


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m infer", description=__doc__.splitlines()[0])
    p.add_argument("--inputs", default=env("INFER_INPUTS", "/workspace/inputs"), help="folder of case .npz files")
    p.add_argument("--outputs", default=env("INFER_OUTPUTS", "/workspace/outputs"), help="folder for the outputs")
    p.add_argument("--weights", default=env("INFER_WEIGHTS", "/workspace/weights"),
                   help="converted artifact folder (model_card.json) or nnInteractive release folder")
    p.add_argument("--device", default=env("INFER_DEVICE") or None, help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--seconds-per-class", type=float, default=float(env("INFER_SECONDS_PER_CLASS", "15")),
                   help="time budget of one stage per class (the harness allows 90 s per class for all "
                        "six stages together; default 15)")
    p.add_argument("--reserve-seconds", type=float, default=float(env("INFER_RESERVE_SECONDS", "5")),
                   help="taken off each stage's budget for what happens outside the predictor: container "
                        "and interpreter start before this process counts, writing, exit (default 5)")
    p.add_argument("--no-autozoom", action="store_true", help="never zoom out and predict again")
    p.add_argument("--no-refine", action="store_true",
                   help="keep zoomed-out predictions as they are (no full-resolution refinement patches)")
    p.add_argument("--policy", default=env("INFER_POLICY") or None,
                   help="interaction policy: preset[,knob=value...] (infer/policy.py; default: the model card's, else project)")
    p.add_argument("--threads", type=int, default=int(env("INFER_THREADS", "0")), help="CPU threads (0: all cores)")
    return p.parse_args(argv)


def _labels(arr, k=None):
    """Any numeric (D, H, W) array -> uint8 / uint16 labels: NaN and negatives become 0, values
    are rounded, and labels above ``k`` (when known) become 0."""
    import numpy as np
    a = np.asarray(arr)
    if a.dtype.kind == "f":
        a = np.rint(np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0))
    a = a.astype(np.int64, copy=False) if a.dtype.kind in "fb" else a
    top = 65535 if k is None else int(k)
    a = np.where((a < 0) | (a > top), 0, a)
    return a.astype(np.uint8 if int(a.max(initial=0)) <= 255 and (k is None or k <= 255) else np.uint16)


def _fallback_segs(path, case):
    """The best output for a case that could not be segmented: its previous prediction (labels
    above K dropped) or zeros of the image's shape; None when not even the shape is readable.
    ``case``: what ``read_case`` returned, or None when it failed (then the file is read again
    for imgs and prev_pred only, and last for the shape in the imgs header)."""
    import numpy as np
    from .io import imgs_shape, read_case
    from .prompts import num_classes
    k = None
    if case is not None:
        k = num_classes(case)
    else:
        try:
            case = read_case(path, keys=("prev_pred",))
        except Exception:
            case = None
    if case is not None:
        prev = case.get("prev_pred")
        if prev is not None and prev.shape == case["imgs"].shape:
            return _labels(prev, k)
        return np.zeros(case["imgs"].shape, np.uint8 if k is None or k <= 255 else np.uint16)
    shape = imgs_shape(path)
    return None if shape is None else np.zeros(shape, np.uint8)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def main(argv=None, clock=None) -> int:
    """Run the folder loop. ``clock``: a monotonic clock in seconds for the time budget. Default:
    time.monotonic, and the first case's budget counts from process start (module import), so
    in-process callers should pass a large ``--seconds-per-class`` or their own clock, whose first
    reading then starts the budget."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="infer: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)  # one summary line per case, whatever the root logger's level
    start = T0 if clock is None else clock()
    clock = clock or time.monotonic
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
        predictor = Predictor.from_path(args.weights, device=args.device, autozoom=not args.no_autozoom,
                                           refine=not args.no_refine, policy=args.policy)
    except Exception as exc:
        log.error("cannot load weights from %s: %s", args.weights, _one_line(exc))
        predictor = None
    log.info("model ready on %s after %.2f s", predictor.device if predictor else "-", clock() - start)

    failures = 0
    for name in names:
        src, dst = os.path.join(args.inputs, name), os.path.join(args.outputs, name)
        t_case = clock()
        case = segs = None
        k, how = "?", "segmented"
        try:
            case = read_case(src)
            k = num_classes(case)
            if predictor is None:
                raise RuntimeError("no model loaded")
            deadline = ((start if name == names[0] else t_case) + args.seconds_per_class * max(k, 1)
                        - args.reserve_seconds)
            segs = predictor.predict(case, deadline=deadline, clock=clock)
        except Exception as exc:
            failures += 1
            log.error("%s: %s", name, _one_line(exc))
            try:
                segs = _fallback_segs(src, case)
                how = "fallback (previous mask or zeros)"
            except Exception as exc2:  # unreadable even for its shape
                log.error("%s: fallback failed: %s", name, _one_line(exc2))
        if segs is None:
            log.error("%s: no output: not even the image shape is readable", name)
            continue
        try:
            write_segs(dst, segs)
        except Exception as exc:
            failures += 1
            log.error("%s: no output: writing %s failed: %s", name, dst, _one_line(exc))
            continue
        log.info("%s: %s, K=%s, shape %s %s, labels up to %d, %.2f s", name, how, k,
                 "x".join(map(str, segs.shape)), segs.dtype, int(segs.max(initial=0)), clock() - t_case)
    log.info("done: %d case(s), %d problem(s), %.2f s in all", len(names), failures, clock() - start)
    return 0


if __name__ == "__main__":
    rc = main()
    # Every output is written and closed: skip the interpreter's teardown of torch (0.5-1 s of
    # freeing modules, which a bare `python -c "import torch"` pays too); the container exits.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
