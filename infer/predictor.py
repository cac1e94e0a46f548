"""The predictor: load a model once, then ``predict(case) -> segs`` for one case.

Per class: choose a crop around the prompt (box stage: the box; click stage: centred on the newest
click, zoomed out so that the class's previous mask and box fit), resample image and prompts to the
network patch on the device, forward, resample the foreground probability back into the volume,
and merge the classes by probability (background = product of (1 - p_c), label = argmax) with
three running volumes, whatever the number of classes. When the prediction touches a crop face
that lies inside the volume, the crop is zoomed out (x1.5 steps up to ``max_zoom``) and predicted
again, while the time budget allows.

Guards: before every forward pass the predictor checks that the pass (timed on the previous
one) still fits before the deadline, else it keeps what it has (the smaller-zoom result, or the
class's previous mask). A device out-of-memory error retries the class at zoom 1 without
autozoom, then (on a GPU) on the CPU; one on the whole case (image or merge volumes) reruns the
case on the CPU.
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
from .geometry import Crop, bbox_of, crop_to_patch, make_crop, patch_to_region, touches_border, zoom_for_extent
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


def normalize_image(imgs: np.ndarray, device: torch.device) -> torch.Tensor:
    """(D, H, W) any numeric dtype -> float32 on ``device``, z-scored with mean and (unbiased)
    std over the bounding box of the non-zero voxels, 0 outside that box (nnInteractive v1.0).
    NaN and inf become 0 first; a constant box gets std 1."""
    img = torch.from_numpy(np.ascontiguousarray(_within_float32(imgs))).to(device)
    if img.dtype == torch.bool:
        img = img.to(torch.uint8)
    is_float = img.is_floating_point()
    img = img.to(torch.float32)
    if is_float and not bool(torch.isfinite(img).all()):  # integers are always finite
        img = torch.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0)
    box = bbox_of(img)
    if box is None:
        return torch.zeros_like(img)
    (z0, y0, x0), (z1, y1, x1) = box
    inner = img[z0:z1, y0:y1, x0:x1]
    mean = inner.mean(dtype=torch.float64)
    std = inner.double().std() if inner.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    std = std if bool(std > 1e-8) and bool(torch.isfinite(std)) else torch.tensor(1.0, dtype=torch.float64)
    out = torch.zeros_like(img)
    out[z0:z1, y0:y1, x0:x1] = (inner - float(mean)) / float(std)
    return out


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


class Predictor:
    """Load once, then ``predict(case)`` per case.

    ``network``: module mapping (1, C, *patch) -> (1, 2, *patch) logits; ``card``: its model card.
    """

    def __init__(self, network: torch.nn.Module, card: ModelCard, device: Optional[str | torch.device] = None,
                 autozoom: bool = True, max_zoom: float = 4.0, context: float = 1 / 3,
                 refine: bool = True, max_refine_patches: int = 27):
        self.device = pick_device(device) if not isinstance(device, torch.device) else device
        self.network = network.to(self.device).eval()
        self.card = card
        self.patch = tuple(int(p) for p in card.patch_size)
        self.autozoom = autozoom
        self.max_zoom = float(max_zoom)
        self.context = float(context)
        self.refine = refine
        self.max_refine_patches = int(max_refine_patches)
        self.half = self.device.type == "cuda"
        # the card names the network's input channels: image first, then prompt channels by name
        self.prompt_index = [CHANNELS.index(c) for c in card.channels[1:]]
        self.forward_s = 0.0  # duration of the last forward pass (the ``clock`` given to predict)
        self.cpu_fallback = self.device.type != "cpu"  # retry out-of-memory classes on the CPU
        self.encode_rate: Optional[float] = None  # seconds per drawn click (perf_counter)
        self.encode_n = 0  # clicks drawn in the last pass (its cost is part of forward_s)

    @classmethod
    def from_path(cls, path, device: Optional[str] = None, **kw) -> "Predictor":
        """Load a converted artifact folder or an nnInteractive release folder (see ``infer.weights``)."""
        from .weights import load_model
        dev = pick_device(device)
        network, card = load_model(path, device=dev)
        return cls(network, card, dev, **kw)

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
            image = normalize_image(imgs, self.device)
            prev = case.get("prev_pred")
            prev_t = None
            if prev is not None and tuple(prev.shape) == shape:
                prev_t = torch.from_numpy(np.ascontiguousarray(prev)).to(self.device)
                if prev_t.dtype == torch.bool or (k_total > 255 and prev_t.dtype == torch.uint8):
                    prev_t = prev_t.to(torch.int32)  # `uint8 == 300` would wrap to `== 44`
            elif prev is not None:
                log.warning("%s: prev_pred shape %s != imgs shape %s: ignored", name, prev.shape, shape)
            merge = _Merge(shape, k_total, self.device)
            for k in range(1, k_total + 1):
                prev_k = (prev_t == k) if prev_t is not None else None
                pbox = bbox_of(prev_k) if prev_k is not None else None
                try:
                    prompts = class_prompts(case, k, self.card.box_style)
                    if not self._fits(deadline, clock, prompts):
                        raise TimeoutError("time budget spent: keeping the previous mask")
                    region = self._predict_class_guarded(image, prompts, prev_k, deadline, clock, name, k, pbox)
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

    def _predict_class_guarded(self, image, prompts, prev_k, deadline, clock, name, k, pbox=None) -> Optional[Region]:
        """``predict_class`` with the out-of-memory ladder: as planned, then at zoom 1 without
        autozoom on the same device, then (device not the CPU) at zoom 1 on the CPU."""
        try:
            return self.predict_class(image, prompts, prev_k, deadline, clock, prev_box=pbox)
        except torch.OutOfMemoryError as exc:
            log.warning("%s: class %d: device out of memory (%s): retrying at zoom 1 without autozoom",
                        name, k, _first_line(exc))
        _free_device(self.device)
        try:
            return self.predict_class(image, prompts, prev_k, deadline, clock, max_zoom=1.0, prev_box=pbox)
        except torch.OutOfMemoryError as exc:
            if not self.cpu_fallback:
                raise
            log.warning("%s: class %d: device out of memory again (%s): retrying on the CPU",
                        name, k, _first_line(exc))
        _free_device(self.device)
        with self._on_cpu() as cpu:
            region = cpu.predict_class(image.cpu(), prompts, None if prev_k is None else prev_k.cpu(),
                                       deadline, clock, max_zoom=1.0, prev_box=pbox)
        return None if region is None else (region[0].to(self.device), region[1], region[2])

    def _on_cpu(self):
        """Context manager: a twin predictor on the CPU (float32) sharing this network, which is
        moved to the CPU for the duration and back to the device afterwards."""
        from contextlib import contextmanager

        @contextmanager
        def twin():
            self.network.to("cpu")
            try:
                cpu = Predictor(self.network, self.card, torch.device("cpu"), autozoom=self.autozoom,
                                max_zoom=self.max_zoom, context=self.context, refine=self.refine,
                                max_refine_patches=self.max_refine_patches)
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
    def _merge_class(self, merge: _Merge, k: int, region: Optional[Region], prev_k: Optional[torch.Tensor],
                     pbox=None) -> None:
        """Merge one class: its new probabilities over ``region`` and its previous mask elsewhere
        (``pbox``: the previous mask's bounding box, as ``bbox_of(prev_k)``)."""
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
            prob[tuple(slice(a - l, b - l) for a, b, l in zip(rlo, rhi, lo))] = vals.float()
        merge.add(k, prob, lo, hi)

    def initial_view(self, prompts: ClassPrompts, prev_k: Optional[torch.Tensor],
                     prev_box=None) -> Tuple[list, float]:
        """(centre, zoom) of the first crop. Box stage: centred on the box's 3D extent, zoomed so it
        fits with context. Click stage: centred on the newest click, zoomed so that the previous
        mask and the box fit around it too. ``prev_box``: ``bbox_of(prev_k)`` when already known."""
        if not prompts.clicks:
            lo, hi = prompts.extent  # type: ignore[misc]
            center = [(l + h - 1) / 2.0 for l, h in zip(lo, hi)]
            return center, zoom_for_extent([h - l for l, h in zip(lo, hi)], self.patch, self.context, 1.0, self.max_zoom)
        c = prompts.clicks[-1][1]
        if prev_box is None and prev_k is not None:
            prev_box = bbox_of(prev_k)
        boxes = [b for b in (prompts.extent, prev_box) if b is not None]
        # half-width around the click that covers every box, as a full extent
        ext = [2 * max([0] + [max(c[a] - b[0][a], b[1][a] - 1 - c[a]) for b in boxes]) + 1 for a in range(3)]
        return list(c), zoom_for_extent(ext, self.patch, self.context, 1.0, self.max_zoom)

    def predict_class(self, image: torch.Tensor, prompts: ClassPrompts, prev_k: Optional[torch.Tensor],
                      deadline: Optional[float] = None, clock: Callable[[], float] = time.monotonic,
                      max_zoom: Optional[float] = None, prev_box=None) -> Optional[Region]:
        """Predict one class. Returns ``(prob, lo, hi)``: foreground probability over the part
        ``[lo, hi)`` of the volume that the final crop covers, or None to keep the previous mask
        (class marked done, nothing to prompt with, or no time for a forward pass).

        ``max_zoom`` given: the zoom is capped there and autozoom is off (the out-of-memory retry).
        A device out-of-memory error during an autozoom step keeps the previous, smaller-zoom
        result."""
        if prompts.done or (not prompts.clicks and prompts.extent is None):
            return None
        shape = tuple(image.shape)
        autozoom = self.autozoom and max_zoom is None
        max_zoom = self.max_zoom if max_zoom is None else min(max_zoom, self.max_zoom)
        center, zoom = self.initial_view(prompts, prev_k, prev_box)
        crop = make_crop(center, min(zoom, max_zoom), self.patch)
        prob = None
        while self._fits(deadline, clock, prompts):
            try:
                t = clock()
                new = self.forward(image, prompts, prev_k, crop)
                self._sync()
                self.forward_s = max(clock() - t, 0.0)
            except torch.OutOfMemoryError:
                if prob is None:
                    raise
                log.warning("device out of memory at zoom %.2f: keeping the smaller zoom", max(crop.scale))
                _free_device(self.device)
                break
            if prob is not None and bool((prob > 0.5).any()) and not bool((new > 0.5).any()):
                log.warning("zooming out to %.2f lost the object: keeping the smaller zoom", max(crop.scale))
                break
            prob, last = new, crop
            zoom = max(crop.scale)
            if not autozoom or zoom >= max_zoom - 1e-6 or not touches_border(prob > 0.5, crop, shape):
                break
            crop = make_crop(center, min(zoom * 1.5, max_zoom), self.patch)
        if prob is None:
            raise TimeoutError("no time left for a forward pass: keeping the previous mask")
        region = patch_to_region(prob, last, shape)
        if self.refine and max(last.scale) > 1 + 1e-6:
            region = self.refine_region(image, prompts, prev_k, region, deadline, clock)
        return region

    def refine_region(self, image: torch.Tensor, prompts: ClassPrompts, prev_k: Optional[torch.Tensor],
                      region: Region, deadline: Optional[float] = None,
                      clock: Callable[[], float] = time.monotonic) -> Region:
        """Full-resolution refinement of a zoomed-out prediction (optional work, as nnInteractive's
        AutoZoom does): patches at zoom 1 tile the coarse object's bounding box, each predicted with
        the coarse mask as its previous mask, and overwrite the coarse probabilities they cover.
        Skipped when the object needs more than ``max_refine_patches`` patches; stops when the
        time budget runs out (the coarse values stay)."""
        vals, lo, hi = region
        box = bbox_of(vals > 0.5)
        if box is None:
            return region
        blo = [lo[a] + box[0][a] for a in range(3)]
        bhi = [lo[a] + box[1][a] for a in range(3)]
        starts = []
        for a in range(3):
            ext, p = bhi[a] - blo[a], self.patch[a]
            # one tile when the object fits, else enough tiles to overlap by at least a fifth
            n = 1 if ext <= p else 1 + -(-(ext - p) // max(int(p * 0.8), 1))
            span = max(ext - p, 0)
            starts.append([blo[a] + (round(span * i / (n - 1)) if n > 1 else (ext - p) // 2) for i in range(n)])
        tiles = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
        if len(tiles) > self.max_refine_patches:
            return region
        shape = tuple(image.shape)
        coarse = torch.zeros(shape, dtype=torch.bool, device=self.device) if prev_k is None else prev_k.clone()
        coarse[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = vals > 0.5
        out = vals.clone()
        for t in tiles:
            if not self._fits(deadline, clock, prompts):
                break
            crop = Crop(lo=tuple(t), size=self.patch, patch=self.patch)
            t0 = clock()
            prob = self.forward(image, prompts, coarse, crop)
            self._sync()
            self.forward_s = max(clock() - t0, 0.0)
            pv, plo, phi = patch_to_region(prob, crop, shape)
            # the tile's part inside the coarse region
            a0 = [max(plo[a], lo[a]) for a in range(3)]
            a1 = [min(phi[a], hi[a]) for a in range(3)]
            if any(e <= b for b, e in zip(a0, a1)):
                continue
            out[tuple(slice(a0[a] - lo[a], a1[a] - lo[a]) for a in range(3))] = \
                pv[tuple(slice(a0[a] - plo[a], a1[a] - plo[a]) for a in range(3))]
        return out, lo, hi

    def make_input(self, image: torch.Tensor, prompts: ClassPrompts, prev_k: Optional[torch.Tensor],
                   crop: Crop) -> torch.Tensor:
        """The network input for ``crop``: (1, C, *patch) float32 = the resampled image, then the
        prompt channels the model card names, in its order (training builds its inputs here too)."""
        img = crop_to_patch(image, crop)
        t = time.perf_counter()
        chans = encode(prompts, crop, prev_k, int(round(self.card.click_radius)), self.card.prompt_decay, self.device)
        self.encode_n = clicks_drawn(prompts)
        if self.encode_n >= 8:  # enough clicks that their cost dominates the fixed part
            self._sync()
            self.encode_rate = (time.perf_counter() - t) / self.encode_n
        if self.prompt_index != list(range(len(CHANNELS))):
            chans = chans[self.prompt_index]
        return torch.cat([img[None], chans], 0)[None]

    def forward(self, image: torch.Tensor, prompts: ClassPrompts, prev_k: Optional[torch.Tensor],
                crop: Crop) -> torch.Tensor:
        """One network pass on ``crop``: returns the foreground probability, (*patch) float32."""
        x = self.make_input(image, prompts, prev_k, crop)
        if self.half:
            with torch.autocast("cuda", dtype=torch.float16):
                logits = self.network(x)
        else:
            logits = self.network(x)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        return torch.softmax(logits[0].float(), 0)[1]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _free_device(device: torch.device) -> None:
    """Drop what an out-of-memory error left behind (its traceback's tensors) and the cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
