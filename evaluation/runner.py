"""The six stages of one case, and the ways to run the predictor for one stage.

A *stage runner* is any callable ``runner(inputs_dir: Path, outputs_dir: Path) -> float``: it
predicts the single case in ``inputs_dir`` into ``outputs_dir/<same file name>`` (key ``segs``)
and returns the seconds the stage took. A runner may also set ``last_problem`` after each call:
one line saying what went wrong in that stage (None when nothing did), which
:func:`evaluate_case` keeps in ``CaseResult.errors`` and the report shows. :func:`evaluate_case`
does not otherwise know which runner it has:

- :class:`ColdRunner`: ``sh predict.sh`` in a fresh process with ``INFER_INPUTS`` /
  ``INFER_OUTPUTS`` / ``INFER_WEIGHTS`` / ``INFER_DEVICE``, as the container runs it (what the
  organizer times, less Docker's own start-up);
- :class:`WarmRunner`: one in-process predictor (``case dict -> segs``) reused across stages and
  cases; the stage time is read + predict + write;
- :class:`DockerRunner`: ``evaluation.docker_runner.run_stage_docker`` (imported when used).

Stage bookkeeping follows the organizer's ``CVPR25_iter_eval.py`` (see ``evaluation.clicks`` for
the click rule and ``evaluation.metrics`` for the scores):

1. Box stage: the image file is copied unchanged into ``inputs/``. Without a ``boxes`` key the
   stage is skipped: no run, time 0, DSC 0, NSD 0 (and it still counts as the first of six).
2. Click stages 2..6: the previous output (``segs`` cast to uint8; zeros when missing) gives one
   click per class; the input is rewritten with ``np.savez_compressed`` holding, in this order,
   ``imgs``, ``gts`` (only when the ground truth came from the image file itself, as the organizer
   does for training-style files), ``spacing``, ``clicks``, ``clicks_order``, ``prev_pred`` (that
   uint8 output) and ``boxes`` (the original member's bytes, re-stored unchanged, when the case
   has boxes).
3. Each stage's output is scored against ``gts`` as read (not cast), with the image's ``spacing``.

Deliberate differences from the organizer's script, all in the direction of showing failures:
- ``outputs/`` is emptied before every stage (the organizer leaves it, so a crashed stage is
  scored on the previous stage's stale file);
- an unreadable output, or one whose shape differs from ``gts``, counts as a missing output (all
  zeros, like the organizer's missing file) instead of stopping the whole run;
- a case whose last stage wrote nothing is kept in the table (the organizer's CSV drops it);
- an image file that already holds ``clicks`` / ``clicks_order`` / ``prev_pred`` (a mid-session
  sample) starts from the beginning: its box-stage input is rewritten without those keys.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from .clicks import ClickState, class_labels, simulate_round
from .metrics import interaction_auc, stage_scores_per_class

__all__ = ["N_STAGES", "BUDGET_S_PER_CLASS", "CaseResult", "ColdRunner", "WarmRunner",
           "DockerRunner", "evaluate_case", "write_stage_input", "read_output", "REPO_ROOT"]

N_STAGES = 6  # box stage + 5 click stages
BUDGET_S_PER_CLASS = 90.0
SESSION_KEYS = ("clicks", "clicks_order", "prev_pred")
REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# runners
# --------------------------------------------------------------------------------------------
# A line of predictor output that reports a failure: an exception name, a traceback, or the words
# the predictor and predict.sh use for failures.
_ERROR_LINE = re.compile(r"Traceback|\w+(Error|Exception)\b|\bcannot\b|\bfailed\b|\bno output\b|"
                         r"\bnot found\b|No such file")


def first_error_line(output: str, returncode: int = 0) -> Optional[str]:
    """The first line of a stage's output that reports a failure, else (for a non-zero exit
    status) the status and the last line; None when neither. A traceback is reported by its
    last line (the exception), not by its ``Traceback`` header."""
    lines = [l.strip() for l in output.splitlines() if l.strip()]
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            rest = [l for l in lines[i + 1:] if not l.startswith(("File ", "^", "~"))]
            exc = next((l for l in rest if re.match(r"[\w.]+(Error|Exception|Exit|Interrupt)\b", l)), None)
            return exc or line
        if _ERROR_LINE.search(line):
            return line
    if returncode:
        return f"exit status {returncode}" + (f": {lines[-1]}" if lines else " (no output)")
    return None


class ColdRunner:
    """``sh predict.sh`` per stage, in a fresh process, timed from start to exit.

    ``INFER_INPUTS`` / ``INFER_OUTPUTS`` point at the stage's folders; ``INFER_WEIGHTS`` and
    ``INFER_DEVICE`` are set when given. stdout/stderr go to ``log_path`` (appended) if given;
    ``last_problem`` is the first error line of the last stage (:func:`first_error_line`).
    ``extra_args``: command-line arguments appended to ``sh predict.sh`` (predictor options).
    """

    def __init__(self, predict_sh=None, weights=None, device=None, log_path=None, cwd=None,
                 extra_args=()):
        self.predict_sh = Path(predict_sh or REPO_ROOT / "predict.sh").resolve()
        if not self.predict_sh.is_file():
            raise FileNotFoundError(f"cold mode needs {self.predict_sh}")
        self.cwd = Path(cwd or self.predict_sh.parent)
        self.weights, self.device, self.log_path = weights, device, log_path
        self.last_problem: Optional[str] = None
        self.extra_args = [str(a) for a in extra_args]

    def __call__(self, inputs_dir: Path, outputs_dir: Path) -> float:
        env = dict(os.environ, INFER_INPUTS=str(Path(inputs_dir).resolve()),
                   INFER_OUTPUTS=str(Path(outputs_dir).resolve()))
        env.setdefault("PYTHON", sys.executable)
        if self.weights:
            env["INFER_WEIGHTS"] = str(Path(self.weights).resolve())
        if self.device:
            env["INFER_DEVICE"] = self.device
        start = time.perf_counter()
        proc = subprocess.run(["sh", str(self.predict_sh), *self.extra_args], cwd=self.cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        seconds = time.perf_counter() - start
        if self.log_path:
            with open(self.log_path, "ab") as log:
                log.write(proc.stdout)
        self.last_problem = first_error_line(proc.stdout.decode(errors="replace"), proc.returncode)
        return seconds


class WarmRunner:
    """One in-process predictor for every stage: ``predict(case_dict) -> segs`` where the case
    dict is what ``infer.npz.read_case`` returns. An exception is logged and leaves no output
    (scored as a missing output), like a crashed container."""

    def __init__(self, predict: Callable, log: Callable = print):
        from infer.npz import read_case  # the image's own reader and writer
        from infer.writer import write_segs
        self.predict, self.log = predict, log
        self._read, self._write = read_case, write_segs
        self.last_problem: Optional[str] = None

    @classmethod
    def from_weights(cls, weights, device=None, log: Callable = print, **predictor_kwargs):
        """``predictor_kwargs`` go to ``Predictor.from_path`` (see ``evaluation.predict_args``)."""
        from infer.predictor import Predictor
        return cls(Predictor.from_path(weights, device=device, **predictor_kwargs).predict, log=log)

    def __call__(self, inputs_dir: Path, outputs_dir: Path) -> float:
        start = time.perf_counter()
        self.last_problem = None
        for path in sorted(Path(inputs_dir).glob("*.npz")):
            try:
                segs = self.predict(self._read(path))
                self._write(Path(outputs_dir) / path.name, np.asarray(segs))
            except Exception as exc:  # noqa: BLE001 - a failing stage is scored, not fatal
                message = f"{path.name}: warm predictor failed: {type(exc).__name__}: {exc}"
                self.last_problem = self.last_problem or message
                self.log(message)
        return time.perf_counter() - start


class DockerRunner:
    """One ``docker run`` per stage through ``evaluation.docker_runner.run_stage_docker``."""

    def __init__(self, image_tag: str, gpus: bool, network_none: bool = False, gpu_device: str = "0"):
        try:
            from .docker_runner import run_stage_docker
        except ImportError as exc:
            raise RuntimeError("docker mode needs evaluation/docker_runner.py "
                               "(run_stage_docker)") from exc
        self._run, self.image_tag = run_stage_docker, image_tag
        self.gpus, self.network_none, self.gpu_device = gpus, network_none, str(gpu_device)

    def __call__(self, inputs_dir: Path, outputs_dir: Path) -> float:
        return float(self._run(self.image_tag, Path(inputs_dir), Path(outputs_dir),
                               gpus=self.gpus, network_none=self.network_none,
                               gpu_device=self.gpu_device))


# --------------------------------------------------------------------------------------------
# stage files
# --------------------------------------------------------------------------------------------
def write_stage_input(path, imgs, spacing, state: Optional[ClickState], prev_pred=None,
                      boxes_npy: Optional[bytes] = None, gts=None) -> None:
    """Write one stage's input as the organizer does (``np.savez_compressed``, keys in its order).

    ``state`` None writes a box-stage input (imgs, [gts], spacing, boxes). ``boxes_npy`` is the
    raw ``boxes.npy`` member of the original file, stored back byte for byte (never unpickled).
    """
    arrays = {"imgs": imgs}
    if gts is not None:
        arrays["gts"] = gts
    arrays["spacing"] = spacing
    if state is not None:
        arrays.update(clicks=state.clicks, clicks_order=state.clicks_order, prev_pred=prev_pred)
    np.savez_compressed(path, **arrays)
    if boxes_npy is not None:
        with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("boxes.npy", boxes_npy)


def read_output(path, shape) -> tuple:
    """``(segs, problem)``: the ``segs`` array of an output file, or None and a one-line reason
    (missing file, unreadable, no ``segs`` key, wrong shape)."""
    path = Path(path)
    if not path.is_file():
        return None, "no output file"
    try:
        with np.load(path, allow_pickle=False) as f:
            if "segs" not in f.files:
                return None, f"no 'segs' in output (keys {f.files})"
            segs = f["segs"]
    except Exception as exc:  # noqa: BLE001 - any unreadable output is a failed stage
        return None, f"unreadable output ({type(exc).__name__}: {exc})"
    if segs.shape != tuple(shape):
        return None, f"output shape {segs.shape} != gts {tuple(shape)}"
    return segs, None


def _empty_dir(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------
@dataclass
class CaseResult:
    """Per-stage times and scores of one case (stage 1 = box stage)."""
    name: str
    n_classes: int
    has_boxes: bool
    times: List[float] = field(default_factory=lambda: [0.0] * N_STAGES)
    dsc: List[float] = field(default_factory=lambda: [0.0] * N_STAGES)
    nsd: List[float] = field(default_factory=lambda: [0.0] * N_STAGES)
    ran: List[bool] = field(default_factory=lambda: [False] * N_STAGES)
    missing: List[Optional[str]] = field(default_factory=lambda: [None] * N_STAGES)
    errors: List[Optional[str]] = field(default_factory=lambda: [None] * N_STAGES)  # runner's report
    notes: List[str] = field(default_factory=list)
    clicks: List[list] = field(default_factory=list)  # per click stage: Click or None per class
    class_dsc: List[list] = field(default_factory=lambda: [[] for _ in range(N_STAGES)])  # per stage
    # and class (label order) the Dice that ``dsc`` averages; [] for a stage that did not run
    segs: List[np.ndarray] = field(default_factory=list)  # kept only when asked

    @property
    def total_time(self) -> float:
        return float(sum(self.times))

    @property
    def budget_s(self) -> float:
        return BUDGET_S_PER_CLASS * self.n_classes

    @property
    def over_budget(self) -> bool:
        """Organizer: ``real_running_time > 90 * (len(unique_gts) - 1)``."""
        return self.total_time > self.budget_s

    @property
    def dsc_auc(self) -> float:
        return interaction_auc(self.dsc)

    @property
    def nsd_auc(self) -> float:
        return interaction_auc(self.nsd)

    @property
    def n_missing(self) -> int:
        return sum(1 for k in range(N_STAGES) if self.ran[k] and self.missing[k])


def _read_plain(path) -> dict:
    """Plain (non-object) members of an npz plus its key list; object members are never read."""
    with np.load(path, allow_pickle=False) as f:
        keys = list(f.files)
        out = {"keys": keys}
        for key in ("imgs", "spacing", "gts"):
            if key in keys:
                out[key] = f[key]
    return out


def _raw_member(path, key) -> Optional[bytes]:
    with zipfile.ZipFile(path) as zf:
        name = key + ".npy"
        return zf.read(name) if name in zf.namelist() else None


def evaluate_case(image_path, gts_path, runner: Callable, workdir, log: Callable = print,
                  keep_segs: bool = False, n_clicks: int = N_STAGES - 1) -> CaseResult:
    """Run the box stage and ``n_clicks`` click stages of one case and score each.

    Args:
        image_path: the case ``.npz`` (``imgs``, ``spacing``, optional ``boxes``).
        gts_path: the ground-truth ``.npz`` (key ``gts``), or None to take ``gts`` from the image
            file (training layout).
        runner: a stage runner (see module docstring).
        workdir: a folder for this case's ``inputs/`` and ``outputs/`` (created, emptied).
        log: one-line messages (e.g. ``tqdm.write``).
        keep_segs: keep every stage's output (uint8) in ``result.segs``.
    """
    image_path, workdir = Path(image_path), Path(workdir)
    name = image_path.name
    image = _read_plain(image_path)
    if "imgs" not in image or "spacing" not in image:
        raise ValueError(f"{name}: image file needs 'imgs' and 'spacing' (has {image['keys']})")
    if gts_path is not None:
        with np.load(gts_path, allow_pickle=False) as f:
            gts = f["gts"]
        gts_in_input = None
    elif "gts" in image:
        gts = gts_in_input = image["gts"]
    else:
        raise ValueError(f"{name}: no ground truth (no --gts file and no 'gts' key in the image)")
    labels = class_labels(gts)
    has_boxes = "boxes" in image["keys"]
    boxes_npy = _raw_member(image_path, "boxes") if has_boxes else None
    spacing = image["spacing"]
    result = CaseResult(name=name, n_classes=len(labels), has_boxes=has_boxes)
    inputs, outputs = workdir / "inputs", workdir / "outputs"
    _empty_dir(inputs)
    _empty_dir(outputs)
    in_path = inputs / name
    stale = [k for k in SESSION_KEYS if k in image["keys"]]
    if stale:
        note = (f"{name} already holds {', '.join(stale)} (a mid-session sample): evaluating it from "
                f"the beginning ({'box stage' if has_boxes else 'first click stage'}), ignoring those")
        result.notes.append(note)
        log(note)
    if not has_boxes:
        result.notes.append("no boxes: box stage skipped (scored 0, not run)")

    state = ClickState.empty(len(labels))
    prev = None  # raw segs of the previous stage, None when missing
    n_stages = 1 + n_clicks
    for k in range(n_stages):
        if k == 0:
            if not has_boxes:
                continue
            if stale:
                write_stage_input(in_path, image["imgs"], spacing, None,
                                  boxes_npy=boxes_npy, gts=gts_in_input)
            else:
                shutil.copyfile(image_path, in_path)
        else:
            segs_u8 = np.zeros(gts.shape, np.uint8) if prev is None else prev.astype(np.uint8)
            result.clicks.append(simulate_round(segs_u8, gts, state, labels))
            write_stage_input(in_path, image["imgs"], spacing, state, prev_pred=segs_u8,
                              boxes_npy=boxes_npy, gts=gts_in_input)
        _empty_dir(outputs)
        result.times[k] = float(runner(inputs, outputs))
        result.ran[k] = True
        result.errors[k] = getattr(runner, "last_problem", None)
        prev, problem = read_output(outputs / name, gts.shape)
        if problem:
            result.missing[k] = problem
            log(f"{name} stage {k + 1}: {problem}; scored as an all-zero prediction")
        scored = np.zeros(gts.shape, np.uint8) if prev is None else prev
        result.dsc[k], result.nsd[k], result.class_dsc[k] = stage_scores_per_class(
            gts, scored, spacing, labels)
        if keep_segs:
            result.segs.append(scored.astype(np.uint8))
    return result
