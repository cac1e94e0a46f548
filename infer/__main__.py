"""``python -m infer``: segment every ``*.npz`` case of an input folder into an output folder.

Every input gets an output (``segs``, written atomically); one bad case or class never stops the
others; a time budget per case (``--seconds-per-class`` x K from process start) makes late classes
keep their previous masks instead of running over.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time

T0 = time.monotonic()

# Idle OpenMP workers sleep instead of spinning (set before torch is imported: libgomp reads it
# once). Spinning workers on a CPU shared with other processes slowed forward passes 5-40x
# (docs/PERFORMANCE.md); an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("infer")

from .limits import BYTES_PER_VOXEL, DEFAULT_MEMORY_GB  # noqa: E402 (no numpy: --help needs none)


_EPILOG = """\
environment (read when the option is not given; the option wins):
  INFER_INPUTS, INFER_OUTPUTS, INFER_WEIGHTS, INFER_DEVICE, INFER_SECONDS_PER_CLASS,
  INFER_RESERVE_SECONDS, INFER_THREADS, INFER_MEMORY_GB, INFER_POLICY
  PYTHON  interpreter predict.sh runs (default: python3, else python)

exit status: 0 when every class of every case was predicted as asked; 1 when the inputs or
outputs folder is unusable; 2 when a setting (option or INFER_* variable) is not valid: nothing is read or written;
3 when the model could not be loaded (every readable case still gets its fallback output);
4 when some case or class was not predicted as asked: a case fell back to its previous mask or
zeros, or got no output, or a class kept its previous mask (an error, or the time budget); the
log names each, and every other output is written.
"""

# Numeric settings: (dest, option, environment variable, type, test, what a valid value is).
# Options and variables arrive as text and are checked by check_settings before anything runs.
NUMERIC = (
    ("seconds_per_class", "--seconds-per-class", "INFER_SECONDS_PER_CLASS", float, lambda v: v > 0,
     "a finite number of seconds > 0"),
    ("reserve_seconds", "--reserve-seconds", "INFER_RESERVE_SECONDS", float, lambda v: v >= 0,
     "a finite number of seconds >= 0"),
    ("memory_gb", "--memory-gb", "INFER_MEMORY_GB", float, lambda v: v > 0,
     "a finite number of GB > 0"),
    ("threads", "--threads", "INFER_THREADS", int, lambda v: v >= 0, "a whole number >= 0"),
)
DEVICES = re.compile(r"cpu|cuda(:\d+)?")


def _number(text: str, kind):
    """``text`` as ``kind`` (float or int), or None when it is not one or not finite."""
    try:
        value = kind(str(text).strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def check_settings(args: argparse.Namespace) -> list:
    """Convert the numeric settings in place; return one message per invalid setting, naming
    the option and its environment variable (empty when every setting is valid)."""
    problems = []
    for dest, option, var, kind, ok, what in NUMERIC:
        value = _number(getattr(args, dest), kind)
        if value is None or not ok(value):
            problems.append(f"{option} / {var} = {getattr(args, dest)!r}: expected {what}")
        else:
            setattr(args, dest, value)
    if args.device is not None and not DEVICES.fullmatch(args.device):
        problems.append(f"--device / INFER_DEVICE = {args.device!r}: expected cpu, cuda or cuda:N")
    if args.policy is not None:
        from .policy import parse_policy
        try:
            parse_policy(args.policy)
        except ValueError as exc:
            problems.append(f"--policy / INFER_POLICY = {args.policy!r}: {exc}")
    return problems


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="predict.sh", usage="sh predict.sh [options]",
                                description="Segment every *.npz case of the inputs folder into the outputs folder "
                                            "(python -m infer).", epilog=_EPILOG,
                                formatter_class=_Formatter)
    p.add_argument("--inputs", default=env("INFER_INPUTS", "/workspace/inputs"), help="folder of case .npz files")
    p.add_argument("--outputs", default=env("INFER_OUTPUTS", "/workspace/outputs"),
                   help="folder for the outputs (created if missing)")
    p.add_argument("--weights", default=env("INFER_WEIGHTS", "/workspace/weights"),
                   help="converted artifact folder (model_card.json) or nnInteractive release folder, "
                        "or a folder holding exactly one of them (the log names the one used)")
    p.add_argument("--device", default=env("INFER_DEVICE") or None,
                   help="cpu, cuda or cuda:N; unset (None): cuda when present, else cpu; cuda on a host "
                        "without CUDA logs one line and runs on the cpu")
    p.add_argument("--seconds-per-class", default=env("INFER_SECONDS_PER_CLASS", "15.0"),
                   help="time budget of one stage per class (the harness allows 90 s per class for all "
                        "six stages together)")
    p.add_argument("--reserve-seconds", default=env("INFER_RESERVE_SECONDS", "5.0"),
                   help="taken off each stage's budget for what happens outside the predictor: container "
                        "and interpreter start before this process counts, writing, exit")
    p.add_argument("--memory-gb", default=env("INFER_MEMORY_GB", str(float(DEFAULT_MEMORY_GB))),
                   help=f"host memory the run may use; images above memory / {BYTES_PER_VOXEL} bytes "
                        "per voxel are refused from their header (the harness's container has 32 GB)")
    p.add_argument("--no-autozoom", action="store_true", help="never zoom out and predict again")
    p.add_argument("--no-refine", action="store_true",
                   help="keep zoomed-out predictions as they are (no full-resolution refinement patches)")
    p.add_argument("--policy", default=env("INFER_POLICY") or None,
                   help="interaction policy: preset[,knob=value...] (infer/policy.py; default: the model card's, else project) [INFER_POLICY]")
    p.add_argument("--threads", default=env("INFER_THREADS", "0"), help="CPU threads (0: all cores)")
    return p.parse_args(argv)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default shown; the epilog kept as written."""


def shown(name: str) -> str:
    """A case name as it goes into the log: as is when printable, else its escaped repr (no raw
    newlines or control characters can split a log line)."""
    return name if name.isprintable() else ascii(name)


def _fallback_segs(path, case, limits):
    """The best output for a case that could not be segmented: its previous prediction (labels
    above K dropped; K unknown: above 65535) or zeros of the image's shape; None when not even a
    sane shape is readable. ``case``: what ``read_case`` returned, or None when it failed (then
    the file is read again for imgs and prev_pred only, and last for the shape in the imgs
    header)."""
    import numpy as np
    from .npz import imgs_shape, read_case
    from .writer import label_dtype, to_labels
    from .prompts import num_classes
    k = None
    if case is not None:
        k = min(num_classes(case), 65535)
    else:
        try:
            case = read_case(path, keys=("prev_pred",), limits=limits)
        except Exception:
            case = None
    if case is not None:
        prev = case.get("prev_pred")
        if prev is not None and prev.shape == case["imgs"].shape:
            return to_labels(prev, k)
        return np.zeros(case["imgs"].shape, label_dtype(k or 0))
    shape = imgs_shape(path, limits)
    return None if shape is None else np.zeros(shape, np.uint8)


def _one_line(exc: BaseException) -> str:
    from .errors import exc_text as _exc_text
    text = _exc_text(exc, 300)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _outputs_problem(folder: str):
    """Why ``folder`` cannot take outputs (None when it can): created when missing, then a
    probe file is created exclusively and removed."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        return "it exists and is not a folder"
    try:
        os.makedirs(folder, exist_ok=True)
        # the writer's random temporary name, created exclusively: PIDs repeat in containers,
        # and a probe left by a killed run must not make every later run fail
        from .writer import temp_name
        probe = temp_name(folder) + "-probe"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600))
        os.unlink(probe)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return None


def _skipped_line(skipped) -> str:
    """One log line naming the files of the inputs folder that are not ``.npz`` cases (the first
    five), with the command that turns NIfTI scans into cases when there are any."""
    shown_names = ", ".join(shown(n) for n in skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
    line = f"skipped {len(skipped)} file(s) that are not .npz cases: {shown_names}"
    if any(n.endswith((".nii", ".nii.gz")) for n in skipped):
        line += ("; NIfTI scans become cases with: python -m scripts.nifti to-case --scan FILE "
                 "[--labels SEG] --out DIR (from the repository, outside the image)")
    return line


def _device(name):
    """The device to load on: ``name``, except CUDA on a host without it (logged, CPU used)."""
    import torch
    if name and name.startswith("cuda") and not torch.cuda.is_available():
        log.warning("--device %s: CUDA is not available on this host: running on the CPU", name)
        return "cpu"
    return name


def main(argv=None, clock=None) -> int:
    """Run the folder loop. ``clock``: a monotonic clock in seconds for the time budget. Default:
    time.monotonic, and the first case's budget counts from process start (module import), so
    in-process callers should pass a large ``--seconds-per-class`` or their own clock, whose first
    reading then starts the budget."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="infer: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)  # one summary line per case, whatever the root logger's level
    problems = check_settings(args)
    if problems:
        for problem in problems:
            log.error("invalid setting: %s", problem)
        log.error("nothing was read or written (exit status 2); sh predict.sh --help lists every setting")
        return 2
    start = T0 if clock is None else clock()
    clock = clock or time.monotonic
    if not os.path.isdir(args.inputs):
        log.error("inputs folder %s does not exist or is not a folder (--inputs / INFER_INPUTS)",
                  shown(args.inputs))
        return 1
    entries = sorted(os.listdir(args.inputs))
    names = [n for n in entries if n.endswith(".npz")]
    skipped = [n for n in entries if not n.endswith(".npz") and os.path.isfile(os.path.join(args.inputs, n))]
    if skipped:
        log.warning(_skipped_line(skipped))
    if not names:
        log.error("no .npz cases in %s", shown(args.inputs))
        return 0
    problem = _outputs_problem(args.outputs)
    if problem:
        log.error("cannot write outputs to %s: %s (--outputs / INFER_OUTPUTS)", shown(args.outputs), problem)
        return 1

    from .writer import remove_stale_temporaries
    stale = remove_stale_temporaries(args.outputs)
    if stale:
        log.info("removed %d temporary file(s) left in %s by an earlier run that was stopped while writing",
                 stale, shown(args.outputs))
    import torch
    from .npz import Limits, read_case
    from .writer import label_dtype, write_segs
    from .predictor import Predictor
    from .prompts import num_classes
    limits = Limits.for_memory(args.memory_gb)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rc = 0
    try:
        predictor = Predictor.from_path(args.weights, device=_device(args.device),
                                        autozoom=not args.no_autozoom, refine=not args.no_refine,
                                        policy=args.policy)
    except Exception as exc:
        log.error("cannot load weights from %s: %s", shown(str(args.weights)), _one_line(exc))
        log.error("check --weights / INFER_WEIGHTS: a folder holding model_card.json + weights.pt "
                  "(scripts/prepare_weights.py) or an nnInteractive release (plans.json, "
                  "fold_0/checkpoint_final.pth); every case gets its fallback output, exit status 3")
        predictor, rc = None, 3
    log.info("model ready on %s after %.2f s", predictor.device if predictor else "-", clock() - start)

    failed, kept = set(), 0  # cases with a fallback or no output; classes that kept their mask
    for name in names:
        src, dst, label = os.path.join(args.inputs, name), os.path.join(args.outputs, name), shown(name)
        t_case = clock()
        case = segs = None
        k, how, note = "?", "segmented", ""
        try:
            case = read_case(src, limits=limits)
            case["name"] = label
            for warning in case.get("warnings", []):
                log.warning("%s: %s", label, warning)
            k = num_classes(case)
            label_dtype(k)  # more than 65535 classes cannot be written
            if predictor is None:
                raise RuntimeError("no model loaded")
            deadline = ((start if name == names[0] else t_case) + args.seconds_per_class * max(k, 1)
                        - args.reserve_seconds)
            seen = len(predictor.events)
            segs = predictor.predict(case, deadline=deadline, clock=clock)
            fell = sum(e.get("event") == "class_kept_previous" for e in predictor.events[seen:])
            if fell:
                kept += fell
                note = f"; {fell} of {k} class(es) kept their previous mask (see above)"
        except Exception as exc:
            failed.add(name)
            log.error("%s: %s", label, _one_line(exc))
            try:
                segs = _fallback_segs(src, case, limits)
                how = "fallback (previous mask or zeros)"
            except Exception as exc2:  # unreadable even for its shape
                log.error("%s: fallback failed: %s", label, _one_line(exc2))
        if segs is None:
            failed.add(name)
            log.error("%s: no output: not even a usable image shape is readable", label)
            continue
        try:
            write_segs(dst, segs)
        except Exception as exc:
            failed.add(name)
            log.error("%s: no output: writing %s failed: %s", label, shown(dst), _one_line(exc))
            continue
        log.info("%s: %s, K=%s, shape %s %s, labels up to %d, %.2f s%s", label, how, k,
                 "x".join(map(str, segs.shape)), segs.dtype, int(segs.max(initial=0)), clock() - t_case, note)
    log.info("done: %d case(s), %d problem(s), %d class(es) kept their previous mask, %.2f s in all",
             len(names), len(failed), kept, clock() - start)
    if rc:
        log.error("the model did not load (see above): outputs are fallbacks only")
        return rc
    return 4 if failed or kept else 0


if __name__ == "__main__":
    rc = main()
    # Every output is written and closed: skip the interpreter's teardown of torch (0.5-1 s of
    # freeing modules, which a bare `python -c "import torch"` pays too); the container exits.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
