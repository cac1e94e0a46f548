"""The predictor: load a model once, then ``predict(case) -> segs`` for one case.

Per case: normalise the image, take the policy's frame (``infer.frame``), and for each class
build its prompts and run it (``infer.interaction.run_class``, which asks the interaction
policy, ``infer.policy``, for every decision and has the engine, ``infer.engine``, run each
view), then merge the classes (``infer.region``: by probability with three running volumes
whatever the number of classes, or by labels with one).

Guards: a view starts only if, timed like the previous one, it ends before the deadline
(``infer.budget.Budget``), else the class keeps what it has (the smaller-zoom result, or its
previous mask). A device out-of-memory error climbs a ladder written as data (``CLASS_RUNGS``:
as planned, then zoom 1 without zooming out, then, on a GPU, the CPU); one on the whole case
(image or merge volumes) reruns the case on the CPU. Each rung taken is a structured event in
``Predictor.events`` (besides a log line).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import numpy as np
import torch

from .budget import Budget
from .card import ModelCard
from .case import Case, as_case
from .engine import Engine, free_device
from .frame import Frame
from .geometry import bbox_of
from .interaction import ClassInput, run_class
from .policy import Policy, mirror_flips, policy_for, with_overrides
from .region import MERGES, Region, class_values
from .writer import to_labels

log = logging.getLogger("infer")


def pick_device(name: Optional[str] = None) -> torch.device:
    """``name`` when given ("cpu", "cuda", "cuda:1"), else CUDA when present, else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def normalize_image(imgs: np.ndarray, device: torch.device, with_box: bool = False):
    """(D, H, W) any numeric dtype -> float32 on ``device``, z-scored with mean and (unbiased)
    std over the bounding box of the non-zero voxels, 0 outside that box (nnInteractive v1.0).
    NaN and inf become 0 first; a constant box gets std 1. ``with_box``: return ``(image, box)``,
    ``box`` the half-open non-zero box (None for an all-zero image; the z-scored image's own
    non-zero box can differ: zeros inside the box become negative)."""
    img = _as_float(imgs, device)
    box = bbox_of(img)
    if box is None:
        out = torch.zeros_like(img)
        return (out, None) if with_box else out
    (z0, y0, x0), (z1, y1, x1) = box
    inner = img[z0:z1, y0:y1, x0:x1]
    mean = inner.mean(dtype=torch.float64)
    std = inner.double().std() if inner.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    std = std if bool(std > 1e-8) and bool(torch.isfinite(std)) else torch.tensor(1.0, dtype=torch.float64)
    out = torch.zeros_like(img)
    out[z0:z1, y0:y1, x0:x1] = (inner - float(mean)) / float(std)
    return (out, box) if with_box else out


def _as_float(imgs: np.ndarray, device: torch.device) -> torch.Tensor:
    """(D, H, W) any numeric dtype -> float32 on ``device``, NaN and inf as 0."""
    img = torch.from_numpy(np.ascontiguousarray(_within_float32(imgs))).to(device)
    if img.dtype == torch.bool:
        img = img.to(torch.uint8)
    is_float = img.is_floating_point()
    img = img.to(torch.float32)
    if is_float and not bool(torch.isfinite(img).all()):  # integers are always finite
        img = torch.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0)
    return img


def _within_float32(imgs: np.ndarray) -> np.ndarray:
    """A float64 volume whose finite values exceed float32's range, divided by a power of two
    that brings them within it (z-scoring is scale-free), so that casting does not make them
    inf (and then 0); any other volume unchanged."""
    if imgs.dtype != np.float64 or imgs.size == 0:
        return imgs
    finite = np.isfinite(imgs)
    top = float(np.abs(imgs, where=finite, out=np.zeros_like(imgs)).max())
    if top <= float(np.finfo(np.float32).max) / 2:
        return imgs
    return imgs / 2.0 ** (math.frexp(top)[1] - 64)


@dataclass(frozen=True)
class Rung:
    """One rung of the out-of-memory ladder: the class run again with the zoom capped at
    ``max_zoom`` and no zooming out (None: as planned), on the CPU when ``cpu``. ``name``: the
    event reported when the ladder climbs to it; ``says``: the log line's words for it."""

    name: str
    max_zoom: Optional[float] = None
    cpu: bool = False
    says: str = ""

    def policy(self, policy: Policy) -> Policy:
        if self.max_zoom is None:
            return policy
        return policy.replace(max_zoom=max(1.0, min(self.max_zoom, policy.max_zoom)), zoom_out="none")


CLASS_RUNGS = (Rung("planned"), Rung("zoom_1", 1.0, says="retrying at zoom 1 without autozoom"),
               Rung("cpu_class", 1.0, cpu=True, says="retrying on the CPU"))


class Predictor:
    """Load once, then ``predict(case)`` per case.

    ``network``: module mapping (1, C, *patch) -> (1, 2, *patch) logits; ``card``: its model card;
    ``policy``: the interaction policy (``infer.policy``: a preset name, a spec such as
    ``"reference,refine=none"``, or a ``Policy``); default: the card's ``policy`` field, else
    ``"project"``. ``overrides``: the keywords ``autozoom`` (False: ``zoom_out="none"``),
    ``refine`` (False: ``refine="none"``), ``max_zoom``, ``context`` and ``max_refine_patches``
    override the policy's knobs of those names (``infer.policy.with_overrides``; another keyword
    is a TypeError). ``events``: structured reports, as dicts: the
    out-of-memory rungs taken (``infer.engine.Engine.report``) and the gated-mirroring outcomes
    (``infer.engine.Engine.gated``).
    """

    def __init__(self, network: torch.nn.Module, card: ModelCard, device: Optional[str | torch.device] = None,
                 policy: Optional[str | Policy] = None, **overrides):
        self.device = pick_device(device) if not isinstance(device, torch.device) else device
        self.policy = with_overrides(policy_for(card, policy), **overrides)
        self.engine = Engine(network.to(self.device).eval(), card, self.device, mirror_flips(self.policy))
        self.cpu_fallback = self.device.type != "cpu"  # retry out-of-memory classes on the CPU

    network = property(lambda self: self.engine.network,
                       lambda self, net: setattr(self.engine, "network", net))
    card = property(lambda self: self.engine.card, lambda self, card: setattr(self.engine, "card", card))
    patch = property(lambda self: self.engine.patch)
    events = property(lambda self: self.engine.events)
    max_zoom = property(lambda self: self.policy.max_zoom)

    @classmethod
    def from_path(cls, path, device: Optional[str] = None, policy: Optional[str | Policy] = None,
                  **kw) -> "Predictor":
        """Load a converted artifact folder or an nnInteractive release folder (see ``infer.weights``)."""
        from .weights import load_model
        dev = pick_device(device)
        network, card = load_model(path, device=dev)
        return cls(network, card, dev, policy=policy, **kw)

    # ------------------------------------------------------------------ public API
    def predict(self, case: Case | Mapping, deadline: Optional[float] = None,
                clock: Callable[[], float] = time.monotonic) -> np.ndarray:
        """Segment every class of ``case`` (an ``infer.case.Case``, or a dict in the layout
        ``infer.npz.read_case`` returns, parsed once here).

        Returns ``segs``: (D, H, W) uint8 (uint16 when K > 255), labels 0..K. A class that fails
        keeps its previous mask (zeros in the box stage) and the error is logged. ``deadline``
        (a ``clock()`` value): a forward pass that would end past it is not started; remaining
        classes keep their previous masks and no autozoom is tried. A device out-of-memory error
        outside the classes (the whole volume does not fit) reruns the case on the CPU.
        """
        budget = Budget(deadline, clock)
        case = as_case(case)
        name = case.name
        try:
            return self._predict(case, budget, self.engine)
        except torch.OutOfMemoryError as exc:
            if not self.cpu_fallback:
                raise
            log.warning("%s: device out of memory for the whole case (%s): running it on the CPU",
                        name, _first_line(exc))
            self.engine.where = {"case": name}
            self.engine.report("cpu_case")
        free_device(self.device)
        with self.engine.on_cpu() as cpu:
            return self._predict(case, budget, cpu)

    def _predict(self, case: Case, budget: Budget, engine: Engine) -> np.ndarray:
        imgs = case.imgs
        shape = tuple(imgs.shape)
        k_total = case.num_classes
        asked = case.asked()
        if len(asked) < k_total or not k_total:
            _say_unprompted(case, k_total, len(asked))
        with torch.inference_mode():
            image, nonzero = normalize_image(imgs, engine.device, with_box=True)
            frame = Frame.of_box(nonzero if self.policy.crop_nonzero else None, shape)
            image = frame.cut(image)
            prev_t, present = _prev_labels(case, shape, k_total, engine.device)
            merge = MERGES[self.policy.merge](shape, k_total, engine.device)
            # a class with neither prompts nor a previous mask has nothing to add: no work at all
            for k in sorted(set(asked) | present):
                prev_k = (prev_t == k) if prev_t is not None else None
                pbox = bbox_of(prev_k) if prev_k is not None else None
                region = self._class(case, k, engine, budget, (image, frame, prev_k, pbox))
                values = class_values(region, prev_k, pbox, engine.device)
                if values is not None:
                    merge.add(k, *values)
            return merge.result(k_total)

    def _class(self, case: Case, k: int, engine: Engine, budget: Budget, scene) -> Optional[Region]:
        """Class ``k``'s region, or None (keeps its previous mask) when it fails: the error is
        logged in one line and the other classes go on. ``scene``: (image in the frame, frame,
        the class's previous mask in the volume, its box)."""
        image, frame, prev_k, pbox = scene
        name = case.name
        engine.where = {"case": name, "class": k}
        try:
            prompts = case.prompts(k, self.card.box_style)
            if not engine.fits(budget, prompts):
                raise TimeoutError("time budget spent: keeping the previous mask")
            fprev = frame.cut(prev_k)
            fbox = bbox_of(fprev) if fprev is not None and not frame.is_whole else pbox
            return self._ladder(engine, ClassInput(image, frame.prompts(prompts), fprev, fbox), budget, frame)
        except Exception as exc:  # one class never stops the others
            log.error("%s: class %d: %s: %s", name, k, type(exc).__name__, _first_line(exc))
            if isinstance(exc, torch.OutOfMemoryError):
                engine.report("class_failed")
            engine.events.append({"event": "class_kept_previous", "why": type(exc).__name__, **engine.where})
            return None

    def _ladder(self, engine: Engine, x: ClassInput, budget: Budget, frame: Frame) -> Optional[Region]:
        """``run_class`` on the rungs of ``CLASS_RUNGS`` in order until one does not run out of
        device memory; the CPU rung only when this predictor falls back to the CPU and ``engine``
        is its own (not already the CPU twin of a whole-case rerun)."""
        fallback = self.cpu_fallback and engine is self.engine
        for i, rung in enumerate(CLASS_RUNGS):
            try:
                if rung.cpu:
                    with engine.on_cpu() as cpu:
                        region = run_class(cpu, rung.policy(self.policy), _to_cpu(x), budget, frame)
                    return None if region is None else Region(region.values.to(engine.device), region.lo, region.hi)
                return run_class(engine, rung.policy(self.policy), x, budget, frame)
            except torch.OutOfMemoryError as exc:
                nxt = CLASS_RUNGS[i + 1] if i + 1 < len(CLASS_RUNGS) else None
                if nxt is None or (nxt.cpu and not fallback):
                    raise
                log.warning("%s: class %d: device out of memory%s (%s): %s", engine.where.get("case"),
                            engine.where.get("class"), " again" if i else "", _first_line(exc), nxt.says)
                engine.report(nxt.name)
            free_device(engine.device)
        return None  # not reached: the last rung returns or raises


def _to_cpu(x: ClassInput) -> ClassInput:
    return ClassInput(x.image.cpu(), x.prompts, None if x.prev is None else x.prev.cpu(), x.prev_box)


def _prev_labels(case: Case, shape, k_total: int, device: torch.device):
    """``(labels, present)``: the case's ``prev_pred`` as labels on ``device`` (int32 where uint8
    could not be compared with labels above 255) and the set of its labels 1..K, found once; or
    ``(None, set())`` when absent or of another shape than ``imgs`` (logged). One label rule for
    every path (``infer.writer.to_labels``, as the fallback output uses it): a signed, float or
    boolean map has its negatives, NaN and labels above K as background and fractions rounded;
    an unsigned map is used as it is (its labels above K are never a class's)."""
    prev = case.prev_pred
    if prev is None:
        return None, set()
    if tuple(prev.shape) != tuple(shape):
        log.warning("%s: prev_pred shape %s != imgs shape %s: ignored", case.name, prev.shape, shape)
        return None, set()
    if prev.dtype not in (np.uint8, np.uint16):
        prev = to_labels(prev, k_total)
    present = present_labels(prev, k_total)
    prev_t = torch.from_numpy(np.ascontiguousarray(prev)).to(device)
    if k_total > 255 and prev_t.dtype == torch.uint8:
        prev_t = prev_t.to(torch.int32)  # `uint8 == 300` would wrap to `== 44`
    return prev_t, present


def present_labels(labels: np.ndarray, k_total: int, slab_voxels: int = 1 << 22) -> set:
    """The labels 1..``k_total`` that occur in a uint8 or uint16 map, counted slab by slab (no
    volume-sized temporary)."""
    counts = np.zeros(int(np.iinfo(labels.dtype).max) + 1, np.int64)
    flat = labels.reshape(-1)
    for start in range(0, flat.size, slab_voxels):
        counts += np.bincount(flat[start:start + slab_voxels], minlength=counts.size)
    return {int(v) for v in np.flatnonzero(counts[1:k_total + 1]) + 1}


def _say_unprompted(case: Case, k_total: int, asked: int) -> None:
    """One warning for a case that prompts none of its classes (or has none), one line of debug
    for a case that leaves some out."""
    name = case.name
    if not asked:
        log.warning("%s: no boxes and no clicks for any class: every class keeps its previous mask "
                    "(zeros without prev_pred)", name)
    else:
        log.debug("%s: %d of %d classes have neither a box nor clicks: they keep their previous "
                  "masks", name, k_total - asked, k_total)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
