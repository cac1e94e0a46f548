"""The predictor: load a model once, then ``predict(case) -> segs`` for one case.

It executes an interaction policy (``infer.policy``: a preset such as "project" or "reference",
or a ``Policy``), which decides everything about the loop: the first crop of each class, when to
zoom out, how a zoomed-out prediction comes back into the volume, which zoom-1 tiles refine it,
and whether classes merge by probability or paste labels. The predictor resamples image and
prompts to the network patch on the device, runs the network (``forward``), pastes the results
back, and merges the classes (by probability with three running volumes whatever the number of
classes, or by labels with one).

Guards: before every forward pass the predictor checks that the pass (timed on the previous
one) still fits before the deadline, else it keeps what it has (the smaller-zoom result, or the
class's previous mask). A device out-of-memory error retries the class at zoom 1 without
zooming out, then (on a GPU) on the CPU; one on the whole case (image or merge volumes) reruns
the case on the CPU.
"""
from __future__ import annotations

import gc
import logging
import math
import time
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch

from .card import ModelCard
from .geometry import Crop, bbox_of, crop_to_patch, crop_to_patch_nearest, make_crop, patch_to_region
from .policy import (Policy, initial_view, lasso, mirror_flips, parse_policy, refine_tiles, refines, to_frame,
                     upsample, wants_zoom_out, zoom_step)
from .io import label_dtype
from .prompts import CHANNELS, ClassPrompts, class_prompts, clicks_drawn, encode, num_classes

log = logging.getLogger("infer")

Region = Tuple[torch.Tensor, Tuple[int, int, int], Tuple[int, int, int]]
KEEP = 1.0 + 1e-3  # merge weight of a kept (previous) mask voxel
CPU_SLOWDOWN = 100.0  # assumed cost of a CPU forward pass relative to the device's, for the budget


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


class _Merge:
    """Running class merge: label = argmax(background, p_1 .. p_K), background = prod(1 - p_c).

    Holds three volumes (background product, best probability, best label) whatever K is. A class
    contributes its probabilities on the box where they can be non-zero."""

    def __init__(self, shape: Sequence[int], k: int, device: torch.device):
        self.bg = torch.ones(tuple(shape), dtype=torch.float32, device=device)
        self.best = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
        self.label = torch.zeros(tuple(shape), dtype=torch.int16 if k < 2 ** 15 else torch.int32, device=device)

    def add(self, k: int, prob: torch.Tensor, lo: Sequence[int], hi: Sequence[int]) -> None:
        sl = tuple(slice(l, h) for l, h in zip(lo, hi))
        self.bg[sl] *= 1 - prob.clamp(max=1.0)
        better = prob > self.best[sl]
        self.best[sl] = torch.where(better, prob, self.best[sl])
        self.label[sl] = torch.where(better, torch.full_like(self.label[sl], k), self.label[sl])

    def result(self, k: int) -> np.ndarray:
        lab = torch.where(self.best > self.bg, self.label, torch.zeros_like(self.label))
        return lab.cpu().numpy().astype(label_dtype(k), copy=False)


class _LabelMerge:
    """Class merge by labels (nnInteractive's challenge script): each class writes its label where
    its mask is set, in class order, so a later class overwrites an earlier one. One volume."""

    def __init__(self, shape: Sequence[int], k: int, device: torch.device):
        self.label = torch.zeros(tuple(shape), dtype=torch.int16 if k < 2 ** 15 else torch.int32, device=device)

    def add(self, k: int, prob: torch.Tensor, lo: Sequence[int], hi: Sequence[int]) -> None:
        sl = tuple(slice(l, h) for l, h in zip(lo, hi))
        self.label[sl] = torch.where(prob > 0.5, torch.full_like(self.label[sl], k), self.label[sl])

    def result(self, k: int) -> np.ndarray:
        return self.label.cpu().numpy().astype(label_dtype(k), copy=False)


def network_input(image: torch.Tensor, prompts: ClassPrompts, prev_k: Optional[torch.Tensor], crop: Crop,
                  card: ModelCard, device: torch.device, box_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The network input for ``crop``: (1, C, *patch) float32 = the resampled image, then the
    prompt channels ``card`` names, in its order. ``box_mask``: (D, H, W) mask that the box+
    channel is restricted to (pseudo-lasso), or None. Training builds its inputs here too."""
    img = crop_to_patch(image, crop)
    chans = encode(prompts, crop, prev_k, int(round(card.click_radius)), card.prompt_decay, device,
                   shape=image.shape[-3:])
    if box_mask is not None:
        chans[CHANNELS.index("box+")] = lasso(chans[CHANNELS.index("box+")], crop_to_patch(box_mask, crop))
    index = [CHANNELS.index(c) for c in card.channels[1:]]
    if index != list(range(len(CHANNELS))):
        chans = chans[index]
    return torch.cat([img[None], chans], 0)[None]


class Predictor:
    """Load once, then ``predict(case)`` per case.

    ``network``: module mapping (1, C, *patch) -> (1, 2, *patch) logits; ``card``: its model card;
    ``policy``: the interaction policy (``infer.policy``: a preset name, a spec such as
    ``"reference,refine=none"``, or a ``Policy``); default: the card's ``policy`` field, else
    ``"project"``. The keyword arguments ``autozoom`` (False: ``zoom_out="none"``), ``refine``
    (False: ``refine="none"``), ``max_zoom``, ``context`` and ``max_refine_patches`` override
    the policy's knobs of those names.
    """

    def __init__(self, network: torch.nn.Module, card: ModelCard, device: Optional[str | torch.device] = None,
                 policy: Optional[str | Policy] = None, autozoom: Optional[bool] = None,
                 max_zoom: Optional[float] = None, context: Optional[float] = None,
                 refine: Optional[bool] = None, max_refine_patches: Optional[int] = None):
        self.device = pick_device(device) if not isinstance(device, torch.device) else device
        self.network = network.to(self.device).eval()
        self.card = card
        self.patch = tuple(int(p) for p in card.patch_size)
        pol = parse_policy(policy if policy is not None else getattr(card, "policy", None))
        kw = {k: v for k, v in (("max_zoom", max_zoom), ("context", context),
                                ("max_refine_patches", max_refine_patches)) if v is not None}
        if autozoom is False:
            kw["zoom_out"] = "none"
        if refine is False:
            kw["refine"] = "none"
        self.policy = pol.replace(**kw) if kw else pol
        self.half = self.device.type == "cuda"
        self.forward_s = 0.0  # duration of the last forward pass (the ``clock`` given to predict)
        self.cpu_fallback = self.device.type != "cpu"  # retry out-of-memory classes on the CPU
        self.encode_rate: Optional[float] = None  # seconds per drawn click (perf_counter)
        self.encode_n = 0  # clicks drawn in the last pass (its cost is part of forward_s)

    @property
    def max_zoom(self) -> float:
        return self.policy.max_zoom

    @classmethod
    def from_path(cls, path, device: Optional[str] = None, policy: Optional[str | Policy] = None,
                  **kw) -> "Predictor":
        """Load a converted artifact folder or an nnInteractive release folder (see ``infer.weights``)."""
        from .weights import load_model
        dev = pick_device(device)
        network, card = load_model(path, device=dev)
        return cls(network, card, dev, policy=policy, **kw)

    # ------------------------------------------------------------------ public API
    def predict(self, case: dict, deadline: Optional[float] = None,
                clock: Callable[[], float] = time.monotonic) -> np.ndarray:
        """Segment every class of ``case`` (a dict as ``infer.io.read_case`` returns).

        Returns ``segs``: (D, H, W) uint8 (uint16 when K > 255), labels 0..K. A class that fails
        keeps its previous mask (zeros in the box stage) and the error is logged. ``deadline``
        (a ``clock()`` value): a forward pass that would end past it is not started; remaining
        classes keep their previous masks and no autozoom is tried. A device out-of-memory error
        outside the classes (the whole volume does not fit) reruns the case on the CPU.
        """
        try:
            return self._predict(case, deadline, clock)
        except torch.OutOfMemoryError as exc:
            if not self.cpu_fallback:
                raise
            log.warning("%s: device out of memory for the whole case (%s): running it on the CPU",
                        case.get("name", "case"), _first_line(exc))
        _free_device(self.device)
        with self._on_cpu() as cpu:
            return cpu._predict(case, deadline, clock)

    def _predict(self, case: dict, deadline: Optional[float], clock: Callable[[], float]) -> np.ndarray:
        imgs = case["imgs"]
        shape = tuple(imgs.shape)
        k_total = num_classes(case)
        name = case.get("name", "case")
        with torch.inference_mode():
            image, nonzero = normalize_image(imgs, self.device, with_box=True)
            nonzero = nonzero if self.policy.crop_nonzero else None
            frame = None
            if nonzero is not None:
                frame = (nonzero[0], shape)  # origin of the frame, shape of the whole volume
                image = image[tuple(slice(l, h) for l, h in zip(*nonzero))]
            fsl = tuple(slice(l, h) for l, h in zip(*nonzero)) if frame is not None else None
            prev = case.get("prev_pred")
            prev_t = None
            if prev is not None and tuple(prev.shape) == shape:
                prev_t = torch.from_numpy(np.ascontiguousarray(prev)).to(self.device)
                if prev_t.dtype == torch.bool or (k_total > 255 and prev_t.dtype == torch.uint8):
                    prev_t = prev_t.to(torch.int32)  # `uint8 == 300` would wrap to `== 44`
            elif prev is not None:
                log.warning("%s: prev_pred shape %s != imgs shape %s: ignored", name, prev.shape, shape)
            merge = (_LabelMerge if self.policy.paste == "label" else _Merge)(shape, k_total, self.device)
            for k in range(1, k_total + 1):
                prev_k = (prev_t == k) if prev_t is not None else None
                pbox = bbox_of(prev_k) if prev_k is not None else None
                try:
                    prompts = class_prompts(case, k, self.card.box_style)
                    if not self._fits(deadline, clock, prompts):
                        raise TimeoutError("time budget spent: keeping the previous mask")
                    fprev, fbox = prev_k, pbox
                    if frame is not None:
                        prompts = to_frame(prompts, frame[0], image.shape)
                        fprev = prev_k[fsl] if prev_k is not None else None
                        fbox = bbox_of(fprev) if fprev is not None else None
                    region = self._predict_class_guarded(image, prompts, fprev, deadline, clock, name, k, fbox,
                                                         frame)
                except Exception as exc:  # one class never stops the others
                    log.error("%s: class %d: %s: %s", name, k, type(exc).__name__, _first_line(exc))
                    region = None
                self._merge_class(merge, k, region, prev_k, pbox)
            return merge.result(k_total)

    # ------------------------------------------------------------------ guards
    def _fits(self, deadline: Optional[float], clock: Callable[[], float],
              prompts: Optional[ClassPrompts] = None) -> bool:
        """Whether one more forward pass (as long as the last one, with the prompt drawing
        scaled to ``prompts``' clicks) ends before ``deadline``."""
        return deadline is None or clock() + self.forward_s + self._drawing_extra(prompts) <= deadline

    def _drawing_extra(self, prompts: Optional[ClassPrompts]) -> float:
        """Seconds that drawing ``prompts``' clicks costs beyond the drawing in the last pass
        (negative when it has fewer clicks). Drawing grows with the clicks (one ball each), so a
        class with 60 000 clicks must not be timed like one with 3. The rate per click comes
        from passes that drew at least 8 clicks; a class with more than 64 clicks and no rate
        known yet first times the drawing of its 8 newest clicks."""
        n = clicks_drawn(prompts) if prompts is not None else 0
        if n > 64 and self.encode_rate is None:
            sample = ClassPrompts(clicks=prompts.clicks[-8:])
            crop = make_crop(list(prompts.clicks[-1][1]), 1.0, self.patch)
            t = time.perf_counter()
            encode(sample, crop, None, int(round(self.card.click_radius)), self.card.prompt_decay, self.device)
            self._sync()
            self.encode_rate = (time.perf_counter() - t) / 8
        if self.encode_rate is None or prompts is None:
            return 0.0
        return self.encode_rate * (n - self.encode_n)

    def _predict_class_guarded(self, image, prompts, prev_k, deadline, clock, name, k, pbox=None,
                               frame=None) -> Optional[Region]:
        """``predict_class`` with the out-of-memory ladder: as planned, then at zoom 1 without
        autozoom on the same device, then (device not the CPU) at zoom 1 on the CPU."""
        try:
            return self.predict_class(image, prompts, prev_k, deadline, clock, prev_box=pbox, frame=frame)
        except torch.OutOfMemoryError as exc:
            log.warning("%s: class %d: device out of memory (%s): retrying at zoom 1 without autozoom",
                        name, k, _first_line(exc))
        _free_device(self.device)
        try:
            return self.predict_class(image, prompts, prev_k, deadline, clock, max_zoom=1.0, prev_box=pbox,
                                      frame=frame)
        except torch.OutOfMemoryError as exc:
            if not self.cpu_fallback:
                raise
            log.warning("%s: class %d: device out of memory again (%s): retrying on the CPU",
                        name, k, _first_line(exc))
        _free_device(self.device)
        with self._on_cpu() as cpu:
            region = cpu.predict_class(image.cpu(), prompts, None if prev_k is None else prev_k.cpu(),
                                       deadline, clock, max_zoom=1.0, prev_box=pbox, frame=frame)
        return None if region is None else (region[0].to(self.device), region[1], region[2])

    def _on_cpu(self):
        """Context manager: a twin predictor on the CPU (float32) sharing this network, which is
        moved to the CPU for the duration and back to the device afterwards."""
        from contextlib import contextmanager

        @contextmanager
        def twin():
            self.network.to("cpu")
            try:
                cpu = Predictor(self.network, self.card, torch.device("cpu"), policy=self.policy)
                cpu.cpu_fallback = False
                # a CPU pass is far slower than the device's: let the budget guard know up front
                cpu.forward_s = self.forward_s * CPU_SLOWDOWN
                yield cpu
                self.forward_s = max(self.forward_s, cpu.forward_s)
            finally:
                self.network.to(self.device)
        return twin()

    def _sync(self) -> None:
        """Wait for the device, so that a clock read after a forward pass measures the pass."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ steps
    def _merge_class(self, merge, k: int, region: Optional[Region], prev_k: Optional[torch.Tensor],
                     pbox=None) -> None:
        """Merge one class: its new values over ``region`` (NaN: not predicted, the previous mask
        stays) and its previous mask elsewhere (``pbox``: the previous mask's bounding box, as
        ``bbox_of(prev_k)``)."""
        if region is None and pbox is None:
            return
        boxes = [b for b in (pbox, region and (region[1], region[2])) if b is not None]
        lo = tuple(min(b[0][a] for b in boxes) for a in range(3))
        hi = tuple(max(b[1][a] for b in boxes) for a in range(3))
        sl = tuple(slice(l, h) for l, h in zip(lo, hi))
        # kept masks enter just above certainty, so that a saturated prediction of another class
        # (softmax == 1.0 in float32) cannot take voxels from a class the harness called perfect
        prob = prev_k[sl].float() * KEEP if prev_k is not None else torch.zeros(
            tuple(h - l for l, h in zip(lo, hi)), device=self.device)
        if region is not None:
            vals, rlo, rhi = region
            sub = tuple(slice(a - l, b - l) for a, b, l in zip(rlo, rhi, lo))
            vals = vals.float()
            prob[sub] = torch.where(torch.isnan(vals), prob[sub], vals)
        merge.add(k, prob, lo, hi)

    def initial_view(self, prompts: ClassPrompts, prev_k: Optional[torch.Tensor],
                     prev_box=None) -> Tuple[list, float]:
        """(centre, zoom) of the first crop: ``infer.policy.initial_view`` with this predictor's
        policy. ``prev_box``: ``bbox_of(prev_k)`` when already known."""
        if prev_box is None and prev_k is not None and prompts.clicks:
            prev_box = bbox_of(prev_k)
        return initial_view(self.policy, prompts, prev_box, self.patch)

    def _timed_forward(self, image, prompts, prev_k, crop, clock, box_mask=None) -> torch.Tensor:
        t = clock()
        prob = self.forward(image, prompts, prev_k, crop) if box_mask is None else \
            self.forward(image, prompts, prev_k, crop, box_mask=box_mask)
        self._sync()
        self.forward_s = max(clock() - t, 0.0)
        return prob

    def predict_class(self, image: torch.Tensor, prompts: ClassPrompts, prev_k: Optional[torch.Tensor],
                      deadline: Optional[float] = None, clock: Callable[[], float] = time.monotonic,
                      max_zoom: Optional[float] = None, prev_box=None, policy: Optional[Policy] = None,
                      frame=None) -> Optional[Region]:
        """Predict one class. Returns ``(values, lo, hi)``: the class's new values (foreground
        probability, or 0/1 labels for ``upsample="label"``; NaN where the previous mask stays)
        over ``[lo, hi)`` of the volume, or None to keep the previous mask (class marked done,
        nothing to prompt with, or no time for a forward pass).

        ``image``, ``prompts``, ``prev_k``, ``prev_box`` are in the frame the policy works in (the
        whole volume, or its non-zero crop); ``frame``: None (the whole volume) or ``(origin,
        volume shape)`` of that crop, and the result is in volume coordinates. ``policy``: this
        call's policy instead of the predictor's. ``max_zoom`` given: the zoom is capped there and
        there is no zooming out (the out-of-memory retry). A device out-of-memory error during a
        zoom-out step keeps the previous, smaller-zoom result."""
        pol = policy or self.policy
        if max_zoom is not None:
            pol = pol.replace(max_zoom=max(1.0, min(max_zoom, pol.max_zoom)), zoom_out="none")
        view_box = prompts.box if pol.box_view == "box" else prompts.extent  # what a box stage centres on
        if prompts.done or (not prompts.clicks and view_box is None):
            return None
        shape = tuple(image.shape)
        origin, vshape = frame if frame is not None else ((0, 0, 0), shape)
        if prev_box is None and prev_k is not None and prompts.clicks and pol.click_zoom == "fit":
            prev_box = bbox_of(prev_k)
        center, zoom = initial_view(pol, prompts, prev_box, self.patch)
        crop = make_crop(center, zoom, self.patch)
        prob = None
        while self._fits(deadline, clock, prompts):
            try:
                new = self._timed_forward(image, prompts, prev_k, crop, clock)
            except torch.OutOfMemoryError:
                if prob is None:
                    raise
                log.warning("device out of memory at zoom %.2f: keeping the smaller zoom", max(crop.scale))
                _free_device(self.device)
                break
            if pol.keep_lost and prob is not None and bool((prob > 0.5).any()) and not bool((new > 0.5).any()):
                log.warning("zooming out to %.2f lost the object: keeping the smaller zoom", max(crop.scale))
                break
            prob, last, last_zoom = new, crop, zoom
            if pol.zoom_out == "none":
                break
            nxt = zoom_step(pol, center, zoom, crop, self.patch)
            if nxt is None:
                break
            prev_patch = None
            if pol.zoom_out == "border_change" and prev_k is not None:
                prev_patch = crop_to_patch_nearest(prev_k, crop)
            if not wants_zoom_out(pol, prob, crop, shape, prev_patch):
                break
            zoom, crop = nxt
        if prob is None:
            raise TimeoutError("no time left for a forward pass: keeping the previous mask")
        region = upsample(pol, prob, _shift(last, origin), vshape)
        if refines(pol, last_zoom, last):
            region = self._refine(pol, image, prompts, prev_k, region, origin, vshape, center, deadline, clock)
        return region

    def _refine(self, pol: Policy, image, prompts, prev_k, region: Region, origin, vshape, center,
                deadline, clock) -> Region:
        """Full-resolution refinement of a zoomed-out prediction ``region`` (volume coordinates):
        zoom-1 tiles where ``infer.policy.refine_tiles`` puts them, each predicted with the coarse
        mask pasted into the previous mask (pseudo-lasso on box+ when ``pol.lasso``). "tiles":
        tiles overwrite the coarse values they cover; "diff": the previous mask is updated tile by
        tile and only the tiles are pasted (NaN elsewhere). Tiles stop when the time budget runs
        out (what is left keeps the coarse values, or the previous mask)."""
        vals, lo, hi = region
        shape = tuple(image.shape)
        # the coarse values inside the frame, frame coordinates
        flo = [max(l - o, 0) for l, o in zip(lo, origin)]
        fhi = [max(min(h - o, s), a) for h, o, s, a in zip(hi, origin, shape, flo)]
        inner = vals[tuple(slice(a + o - l, b + o - l) for a, b, o, l in zip(flo, fhi, origin, lo))]
        rng = np.random.RandomState(0)  # the cover's random fallback: reproducible
        tiles = refine_tiles(pol, inner, flo, fhi, prev_k, shape, self.patch,
                             [int(round(c)) for c in center], rng)
        if not tiles:
            return region
        running = torch.zeros(shape, dtype=torch.bool, device=self.device) if prev_k is None else prev_k.clone()
        running[tuple(slice(a, b) for a, b in zip(flo, fhi))] = inner > 0.5
        box_mask = running.clone() if pol.lasso and prompts.box is not None else None
        crops = [Crop(lo=tuple(t), size=self.patch, patch=self.patch) for t in tiles]
        if pol.refine == "diff":
            wins = [w for w in (_shift(c, origin).inside(vshape) for c in crops)
                    if all(h > l for l, h in zip(*w))]
            if wins:
                lo = tuple(min(w[0][a] for w in wins) for a in range(3))
                hi = tuple(max(w[1][a] for w in wins) for a in range(3))
            out = torch.full(tuple(h - l for l, h in zip(lo, hi)), float("nan"), device=self.device)
        else:
            out = vals.clone()
        prev_for_tiles = running
        for crop in crops:
            if not self._fits(deadline, clock, prompts):
                break
            prob = self._timed_forward(image, prompts, prev_for_tiles, crop, clock, box_mask=box_mask)
            if pol.refine == "diff":
                pv, plo, phi = patch_to_region(prob, crop, shape)
                running[tuple(slice(a, b) for a, b in zip(plo, phi))] = pv > 0.5
            pv, plo, phi = patch_to_region(prob, _shift(crop, origin), vshape)
            # the tile's part inside the output box
            a0 = [max(plo[a], lo[a]) for a in range(3)]
            a1 = [min(phi[a], hi[a]) for a in range(3)]
            if any(e <= b for b, e in zip(a0, a1)):
                continue
            out[tuple(slice(a0[a] - lo[a], a1[a] - lo[a]) for a in range(3))] = \
                pv[tuple(slice(a0[a] - plo[a], a1[a] - plo[a]) for a in range(3))]
        return out, lo, hi

    def make_input(self, image: torch.Tensor, prompts: ClassPrompts, prev_k: Optional[torch.Tensor],
                   crop: Crop, box_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The network input for ``crop`` (:func:`network_input` with this predictor's card). Times
        the pass's prompt drawing for the budget: ``encode_n`` clicks drawn, ``encode_rate``
        seconds per click (from passes with at least 8 clicks)."""
        t = time.perf_counter()
        x = network_input(image, prompts, prev_k, crop, self.card, self.device, box_mask)
        self.encode_n = clicks_drawn(prompts)
        if self.encode_n >= 8:  # enough clicks that their cost dominates the fixed part
            self._sync()
            self.encode_rate = (time.perf_counter() - t) / self.encode_n
        return x

    def forward(self, image: torch.Tensor, prompts: ClassPrompts, prev_k: Optional[torch.Tensor],
                crop: Crop, box_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One network pass on ``crop``: returns the foreground probability, (*patch) float32
        (with ``policy.mirror``: the mean over the axis flips of the input, ``mirror_flips``)."""
        x = self.make_input(image, prompts, prev_k, crop, box_mask)
        flips = mirror_flips(self.policy)
        total = None
        for dims in flips:
            xi = torch.flip(x, dims) if dims else x
            if self.half:
                with torch.autocast("cuda", dtype=torch.float16):
                    logits = self.network(xi)
            else:
                logits = self.network(xi)
            if isinstance(logits, (list, tuple)):
                logits = logits[0]
            p = _fg_prob(logits[0].float())
            p = torch.flip(p, tuple(d - 2 for d in dims)) if dims else p
            total = p if total is None else total + p
        return total if len(flips) == 1 else total / len(flips)


def _fg_prob(logits: torch.Tensor) -> torch.Tensor:
    """Foreground probability from (2, *patch) logits, nudged by one float step where needed so
    that ``p > 0.5`` is exactly the argmax (foreground iff ``logits[1] > logits[0]``): logits one
    float step apart give a softmax of exactly 0.5, which ``> 0.5`` would call background."""
    p = torch.softmax(logits, 0)[1]
    fg = logits[1] > logits[0]
    half = torch.tensor(0.5, dtype=p.dtype, device=p.device)
    p = torch.where(fg & (p <= 0.5), torch.nextafter(half, torch.ones_like(half)), p)
    return torch.where(~fg & (p > 0.5), half, p)


def _shift(crop: Crop, origin: Sequence[int]) -> Crop:
    """``crop`` moved by ``origin`` (frame -> volume coordinates)."""
    if not any(origin):
        return crop
    return Crop(lo=tuple(l + o for l, o in zip(crop.lo, origin)), size=crop.size, patch=crop.patch)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _free_device(device: torch.device) -> None:
    """Drop what an out-of-memory error left behind (its traceback's tensors) and the cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
