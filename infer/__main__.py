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

from .limits import DEFAULT_MEMORY_GB, GB, bytes_per_voxel  # noqa: E402 (no numpy: --help needs none)


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
                   help="host memory the run may use (GB of 2^30 bytes); a case whose modelled peak "
                        f"(infer/limits.py: bytes per voxel from the dtypes of imgs and prev_pred, "
                        f"{bytes_per_voxel(1):g} for a uint8 image) exceeds it is refused from its "
                        "headers (the harness's container has 32 GB)")
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
    from .case import num_classes
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


def _no_output_reason(src: str, limits) -> str:
    """Why a case gets no output at all: its image is over the memory limit (then even an
    all-zero output of its shape is refused), or not even its image shape is readable."""
    import dataclasses
    from .npz import imgs_shape
    shape = imgs_shape(src, dataclasses.replace(limits, max_bytes=2**62))
    if shape is None:
        return "not even a usable image shape is readable"
    return (f"its image ({'x'.join(map(str, shape))}) is over the memory limit "
            f"({limits.max_bytes / GB:g} GB, --memory-gb): not even an all-zero output of its "
            "shape is written")


def _device(name):
    """The device to load on: ``name``, except CUDA on a host without it (logged, CPU used)."""
    import torch
    if name and name.startswith("cuda") and not torch.cuda.is_available():
        log.warning("--device %s: CUDA is not available on this host: running on the CPU", name)
        return "cpu"
    return name


def _settings_ok(args: argparse.Namespace) -> bool:
    """Whether every setting is valid; each invalid one is logged."""
    problems = check_settings(args)
    for problem in problems:
        log.error("invalid setting: %s", problem)
    if problems:
        log.error("nothing was read or written (exit status 2); sh predict.sh --help lists every setting")
    return not problems


def _case_names(folder: str) -> list:
    """The ``.npz`` names in ``folder`` (any case: ``CASE.NPZ`` is a case too, its output keeps
    its name), sorted; its other files are named in one warning."""
    entries = sorted(os.listdir(folder))
    names = [n for n in entries if n.lower().endswith(".npz")]
    skipped = [n for n in entries if not n.lower().endswith(".npz") and os.path.isfile(os.path.join(folder, n))]
    if skipped:
        log.warning(_skipped_line(skipped))
    return names


def _outputs_ready(folder: str) -> bool:
    """Whether outputs can be written to ``folder`` (logged when not); then removes the temporary
    files an earlier run left there when it was stopped while writing."""
    problem = _outputs_problem(folder)
    if problem:
        log.error("cannot write outputs to %s: %s (--outputs / INFER_OUTPUTS)", shown(folder), problem)
        return False
    from .writer import remove_stale_temporaries
    stale = remove_stale_temporaries(folder)
    if stale:
        log.info("removed %d temporary file(s) left in %s by an earlier run that was stopped while writing",
                 stale, shown(folder))
    return True


def _load_predictor(args: argparse.Namespace):
    """The predictor the settings name, or None (logged) when its weights do not load."""
    from .predictor import Predictor
    try:
        return Predictor.from_path(args.weights, device=_device(args.device),
                                   autozoom=not args.no_autozoom, refine=not args.no_refine,
                                   policy=args.policy)
    except Exception as exc:
        log.error("cannot load weights from %s: %s", shown(str(args.weights)), _one_line(exc))
        log.error("check --weights / INFER_WEIGHTS: a folder holding model_card.json + weights.pt "
                  "(scripts/prepare_weights.py) or an nnInteractive release (plans.json, "
                  "fold_0/checkpoint_final.pth); every case gets its fallback output, exit status 3")
        return None


class _CaseLoop:
    """The folder loop over cases: each one read, predicted within its time budget (or given its
    fallback output after an error), written, and reported in one line. ``predictor``: None when
    the weights did not load (every case gets its fallback); ``start``: when the first case's
    budget starts. ``failed``: cases with a fallback or no output; ``kept``: classes that kept
    their previous mask."""

    def __init__(self, args: argparse.Namespace, predictor, limits, clock, start: float):
        self.args, self.predictor, self.limits, self.clock, self.start = args, predictor, limits, clock, start
        self.failed: set = set()
        self.kept = 0

    def segment(self, name: str, src: str, label: str, budget_from: float):
        """``(segs, k, how, note)`` of one case: the predictor's labels, or after an error the
        fallback's (``segs`` None when not even an image shape is readable)."""
        from .case import Case, num_classes
        from .npz import read_case
        from .writer import label_dtype
        raw, k = None, "?"
        try:
            raw = read_case(src, limits=self.limits)
            for warning in raw["warnings"]:
                log.warning("%s: %s", label, warning)
            k = num_classes(raw)
            label_dtype(k)  # more than 65535 classes cannot be written
            if self.predictor is None:
                raise RuntimeError("no model loaded")
            case = Case.from_mapping(raw, name=label)  # parsed once, as read
            deadline = budget_from + self.args.seconds_per_class * max(k, 1) - self.args.reserve_seconds
            seen = len(self.predictor.events)
            segs = self.predictor.predict(case, deadline=deadline, clock=self.clock)
            fell = sum(e.get("event") == "class_kept_previous" for e in self.predictor.events[seen:])
            self.kept += fell
            note = f"; {fell} of {k} class(es) kept their previous mask (see above)" if fell else ""
            return segs, k, "segmented", note
        except Exception as exc:
            self.failed.add(name)
            log.error("%s: %s", label, _one_line(exc))
            try:
                return _fallback_segs(src, raw, self.limits), k, "fallback (previous mask or zeros)", ""
            except Exception as exc2:  # unreadable even for its shape
                log.error("%s: fallback failed: %s", label, _one_line(exc2))
                return None, k, "", ""

    def run(self, name: str, first: bool) -> None:
        """Segment and write case ``name``; ``first``: its budget counts from ``start``."""
        from .writer import write_segs
        src, dst, label = os.path.join(self.args.inputs, name), os.path.join(self.args.outputs, name), shown(name)
        t_case = self.clock()
        segs, k, how, note = self.segment(name, src, label, self.start if first else t_case)
        if segs is None:
            self.failed.add(name)
            log.error("%s: no output: %s", label, _no_output_reason(src, self.limits))
            return
        try:
            write_segs(dst, segs)
        except Exception as exc:
            self.failed.add(name)
            log.error("%s: no output: writing %s failed: %s", label, shown(dst), _one_line(exc))
            return
        log.info("%s: %s, K=%s, shape %s %s, labels up to %d, %.2f s%s", label, how, k,
                 "x".join(map(str, segs.shape)), segs.dtype, int(segs.max(initial=0)),
                 self.clock() - t_case, note)


def main(argv=None, clock=None) -> int:
    """Run the folder loop. ``clock``: a monotonic clock in seconds for the time budget. Default:
    time.monotonic, and the first case's budget counts from process start (module import), so
    in-process callers should pass a large ``--seconds-per-class`` or their own clock, whose first
    reading then starts the budget."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="infer: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)  # one summary line per case, whatever the root logger's level
    if not _settings_ok(args):
        return 2
    start = T0 if clock is None else clock()
    clock = clock or time.monotonic
    if not os.path.isdir(args.inputs):
        log.error("inputs folder %s does not exist or is not a folder (--inputs / INFER_INPUTS)",
                  shown(args.inputs))
        return 1
    names = _case_names(args.inputs)
    if not names:
        log.error("no .npz cases in %s", shown(args.inputs))
        return 0
    if not _outputs_ready(args.outputs):
        return 1
    import torch
    from .npz import Limits
    limits = Limits.for_memory(args.memory_gb)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    predictor = _load_predictor(args)
    log.info("model ready on %s after %.2f s", predictor.device if predictor else "-", clock() - start)
    loop = _CaseLoop(args, predictor, limits, clock, start)
    for name in names:
        loop.run(name, first=name == names[0])
    log.info("done: %d case(s), %d problem(s), %d class(es) kept their previous mask, %.2f s in all",
             len(names), len(loop.failed), loop.kept, clock() - start)
    if predictor is None:
        log.error("the model did not load (see above): outputs are fallbacks only")
        return 3
    return 4 if loop.failed or loop.kept else 0


if __name__ == "__main__":
    rc = main()
    # Every output is written and closed: skip the interpreter's teardown of torch (0.5-1 s of
    # freeing modules, which a bare `python -c "import torch"` pays too); the container exits.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
