"""The predictor: load a model once, then ``predict(case) -> segs`` for one case.

Per class: choose a crop around the prompt (box stage: the box; click stage: centred on the newest
click, zoomed out so that the class's previous mask and box fit), resample image and prompts to the
network patch on the device, forward, resample the foreground probability back into the volume,
and merge the classes by probability (background = product of (1 - p_c), label = argmax) with
three running volumes, whatever the number of classes. When the prediction touches a crop face
that lies inside the volume, the crop is zoomed out (x1.5 steps up to ``max_zoom``) and predicted
again, while the time budget allows.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch

from .card import ModelCard
from .geometry import Crop, bbox_of, crop_to_patch, make_crop, patch_to_region, touches_border, zoom_for_extent
from .prompts import CHANNELS, ClassPrompts, class_prompts, encode, num_classes

log = logging.getLogger("infer")

Region = Tuple[torch.Tensor, Tuple[int, int, int], Tuple[int, int, int]]


def pick_device(name: Optional[str] = None) -> torch.device:
    """``name`` when given ("cpu", "cuda", "cuda:1"), else CUDA when present, else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def normalize_image(imgs: np.ndarray, device: torch.device) -> torch.Tensor:
    """(D, H, W) any numeric dtype -> float32 on ``device``, z-scored with mean and (unbiased)
    std over the bounding box of the non-zero voxels, 0 outside that box (nnInteractive v1.0).
    NaN and inf become 0 first; a constant box gets std 1."""
    img = torch.from_numpy(np.ascontiguousarray(imgs)).to(device)
    if img.dtype == torch.bool:
        img = img.to(torch.uint8)
    img = img.to(torch.float32)
    if not bool(torch.isfinite(img).all()):
        img = torch.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0)
    box = bbox_of(img != 0)
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
        self.bg[sl] *= 1 - prob
        better = prob > self.best[sl]
        self.best[sl] = torch.where(better, prob, self.best[sl])
        self.label[sl] = torch.where(better, torch.full_like(self.label[sl], k), self.label[sl])

    def result(self, k: int) -> np.ndarray:
        lab = torch.where(self.best > self.bg, self.label, torch.zeros_like(self.label))
        dtype = np.uint8 if k <= 255 else np.uint16
        return lab.cpu().numpy().astype(dtype, copy=False)


class Predictor:
    """Load once, then ``predict(case)`` per case.

    ``network``: module mapping (1, C, *patch) -> (1, 2, *patch) logits; ``card``: its model card.
    """

    def __init__(self, network: torch.nn.Module, card: ModelCard, device: Optional[str | torch.device] = None,
                 autozoom: bool = True, max_zoom: float = 4.0, context: float = 1 / 3):
        self.device = pick_device(device) if not isinstance(device, torch.device) else device
        self.network = network.to(self.device).eval()
        self.card = card
        self.patch = tuple(int(p) for p in card.patch_size)
        self.autozoom = autozoom
        self.max_zoom = float(max_zoom)
        self.context = float(context)
        self.half = self.device.type == "cuda"
        # the card names the network's input channels: image first, then prompt channels by name
        self.prompt_index = [CHANNELS.index(c) for c in card.channels[1:]]

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
        (a ``clock()`` value): past it, remaining classes keep their previous masks and no
        autozoom is tried.
        """
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
            elif prev is not None:
                log.warning("%s: prev_pred shape %s != imgs shape %s: ignored", name, prev.shape, shape)
            merge = _Merge(shape, k_total, self.device)
            for k in range(1, k_total + 1):
                prev_k = (prev_t == k) if prev_t is not None else None
                late = deadline is not None and clock() > deadline
                try:
                    if late:
                        raise TimeoutError("time budget spent: keeping the previous mask")
                    prompts = class_prompts(case, k, self.card.box_style)
                    region = self.predict_class(image, prompts, prev_k, deadline, clock)
                except Exception as exc:  # one class never stops the others
                    log.error("%s: class %d: %s: %s", name, k, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                    region = None
                self._merge_class(merge, k, region, prev_k)
            return merge.result(k_total)

    # ------------------------------------------------------------------ steps
    def _merge_class(self, merge: _Merge, k: int, region: Optional[Region], prev_k: Optional[torch.Tensor]) -> None:
        """Merge one class: its new probabilities over ``region`` and its previous mask elsewhere."""
        pbox = bbox_of(prev_k) if prev_k is not None else None
        if region is None and pbox is None:
            return
        boxes = [b for b in (pbox, region and (region[1], region[2])) if b is not None]
        lo = tuple(min(b[0][a] for b in boxes) for a in range(3))
        hi = tuple(max(b[1][a] for b in boxes) for a in range(3))
        sl = tuple(slice(l, h) for l, h in zip(lo, hi))
        prob = prev_k[sl].float() if prev_k is not None else torch.zeros(
            tuple(h - l for l, h in zip(lo, hi)), device=self.device)
        if region is not None:
            vals, rlo, rhi = region
            prob[tuple(slice(a - l, b - l) for a, b, l in zip(rlo, rhi, lo))] = vals.float()
        merge.add(k, prob, lo, hi)

    def initial_view(self, prompts: ClassPrompts, prev_k: Optional[torch.Tensor]) -> Tuple[list, float]:
        """(centre, zoom) of the first crop. Box stage: centred on the box's 3D extent, zoomed so it
        fits with context. Click stage: centred on the newest click, zoomed so that the previous
        mask and the box fit around it too."""
        if not prompts.clicks:
            lo, hi = prompts.extent  # type: ignore[misc]
            center = [(l + h - 1) / 2.0 for l, h in zip(lo, hi)]
            return center, zoom_for_extent([h - l for l, h in zip(lo, hi)], self.patch, self.context, 1.0, self.max_zoom)
        c = prompts.clicks[-1][1]
        boxes = [b for b in (prompts.extent, bbox_of(prev_k) if prev_k is not None else None) if b is not None]
        # half-width around the click that covers every box, as a full extent
        ext = [2 * max([0] + [max(c[a] - b[0][a], b[1][a] - 1 - c[a]) for b in boxes]) + 1 for a in range(3)]
        return list(c), zoom_for_extent(ext, self.patch, self.context, 1.0, self.max_zoom)

    def predict_class(self, image: torch.Tensor, prompts: ClassPrompts, prev_k: Optional[torch.Tensor],
                      deadline: Optional[float] = None, clock: Callable[[], float] = time.monotonic) -> Optional[Region]:
        """Predict one class. Returns ``(prob, lo, hi)``: foreground probability over the part
        ``[lo, hi)`` of the volume that the final crop covers, or None to keep the previous mask
        (class marked done, or nothing to prompt with)."""
        if prompts.done or (not prompts.clicks and prompts.extent is None):
            return None
        shape = tuple(image.shape)
        center, zoom = self.initial_view(prompts, prev_k)
        crop = make_crop(center, zoom, self.patch)
        while True:
            prob = self.forward(image, prompts, prev_k, crop)
            zoom = max(crop.scale)
            out_of_time = deadline is not None and clock() > deadline
            if (not self.autozoom or zoom >= self.max_zoom - 1e-6 or out_of_time
                    or not touches_border(prob > 0.5, crop, shape)):
                break
            crop = make_crop(center, min(zoom * 1.5, self.max_zoom), self.patch)
        return patch_to_region(prob, crop, shape)

    def forward(self, image: torch.Tensor, prompts: ClassPrompts, prev_k: Optional[torch.Tensor],
                crop: Crop) -> torch.Tensor:
        """One network pass on ``crop``: returns the foreground probability, (*patch) float32."""
        img = crop_to_patch(image, crop)
        chans = encode(prompts, crop, prev_k, int(round(self.card.click_radius)), self.card.prompt_decay, self.device)
        if self.prompt_index != list(range(len(CHANNELS))):
            chans = chans[self.prompt_index]
        x = torch.cat([img[None], chans], 0)[None]
        if self.half:
            with torch.autocast("cuda", dtype=torch.float16):
                logits = self.network(x)
        else:
            logits = self.network(x)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        return torch.softmax(logits[0].float(), 0)[1]
