"""The engine: runs one view of one class through the network, and knows what a pass costs.

One view = the network input for a crop (image resampled to the patch, then the prompt channels
the model card names), the forward pass (fp16 autocast on CUDA; with mirroring, the mean over
the axis flips), the foreground probability, a device sync, and the timing of the pass and of
its click drawing, which the time budget reads (:meth:`Engine.cost`). It decides nothing: where
the view goes is the interaction policy's (``infer.policy``), executed by ``infer.interaction``.
"""
from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from .budget import Budget
from .card import ModelCard
from .geometry import Crop, crop_to_patch, make_crop
from .policy import lasso
from .prompts import CHANNELS, ClassPrompts, clicks_drawn, encode

CPU_SLOWDOWN = 100.0  # assumed cost of a CPU forward pass relative to the device's, for the budget


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


def fg_prob(logits: torch.Tensor) -> torch.Tensor:
    """Foreground probability from (2, *patch) logits, nudged by one float step where needed so
    that ``p > 0.5`` is exactly the argmax (foreground iff ``logits[1] > logits[0]``): logits one
    float step apart give a softmax of exactly 0.5, which ``> 0.5`` would call background."""
    p = torch.softmax(logits, 0)[1]
    fg = logits[1] > logits[0]
    half = torch.tensor(0.5, dtype=p.dtype, device=p.device)
    p = torch.where(fg & (p <= 0.5), torch.nextafter(half, torch.ones_like(half)), p)
    return torch.where(~fg & (p > 0.5), half, p)


def free_device(device: torch.device) -> None:
    """Drop what an out-of-memory error left behind (its traceback's tensors) and the cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Engine:
    """``network`` (a module mapping (1, C, *patch) -> (1, 2, *patch) logits, in eval mode) with
    its ``card`` on ``device``; ``flips``: the axis flips each view is predicted under
    (``infer.policy.mirror_flips``). ``events``: structured reports (dicts) of what went wrong
    and what was done instead, e.g. ``{"event": "out_of_memory", "rung": "zoom_1", "case": ...,
    "class": k}``; ``where`` is added to each (the predictor sets the case and class)."""

    def __init__(self, network: torch.nn.Module, card: ModelCard, device: torch.device,
                 flips: Sequence[Tuple[int, ...]] = ((),)):
        self.network = network
        self.card = card
        self.device = device
        self.flips = list(flips)
        self.half = device.type == "cuda"
        self.forward_s = 0.0  # duration of the last view, on the budget's clock
        self.encode_rate: Optional[float] = None  # seconds per drawn click (perf_counter)
        self.encode_n = 0  # clicks drawn in the last view (their cost is part of forward_s)
        self.events: List[dict] = []
        self.where: dict = {}
        self.gate: Optional[Tuple[List[Tuple[int, ...]], float]] = None  # see gated()

    @property
    def patch(self) -> Tuple[int, int, int]:
        return tuple(int(p) for p in self.card.patch_size)  # type: ignore[return-value]

    def report(self, rung: str, **detail) -> None:
        """Record an out-of-memory event: the rung of the ladder taken (``zoom_1``, ``cpu_class``,
        ``cpu_case``, ``smaller_zoom``, ``class_failed``)."""
        self.events.append({"event": "out_of_memory", "rung": rung, **self.where, **detail})

    @contextmanager
    def gated(self, flips: Optional[Sequence[Tuple[int, ...]]], agreement: float) -> Iterator["Engine"]:
        """Gated mirroring for the views run inside: each is predicted plain and under ``flips``
        (the identity first); the mean is kept when the masks (``> 0.5``) of the mean and of the
        plain prediction agree with Dice >= ``agreement`` (two empty masks agree), else the plain
        prediction. Each view reports an event ``{"event": "mirror_gate", "dice", "kept"}``.
        ``flips`` None: nothing changes."""
        self.gate = None if flips is None else (list(flips), float(agreement))
        try:
            yield self
        finally:
            self.gate = None

    def sync(self) -> None:
        """Wait for the device, so that a clock read after a forward pass measures the pass."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ one view
    def make_input(self, image: torch.Tensor, prompts: ClassPrompts, prev_k: Optional[torch.Tensor],
                   crop: Crop, box_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The network input for ``crop`` (:func:`network_input`). Times the prompt drawing for
        the budget: ``encode_n`` clicks drawn, ``encode_rate`` seconds per click (from views
        with at least 8 clicks)."""
        t = time.perf_counter()
        x = network_input(image, prompts, prev_k, crop, self.card, self.device, box_mask)
        self.encode_n = clicks_drawn(prompts)
        if self.encode_n >= 8:  # enough clicks that their cost dominates the fixed part
            self.sync()
            self.encode_rate = (time.perf_counter() - t) / self.encode_n
        return x

    def forward(self, image: torch.Tensor, prompts: ClassPrompts, prev_k: Optional[torch.Tensor],
                crop: Crop, box_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One network pass on ``crop``: the foreground probability, (*patch) float32 (the mean
        over ``flips`` of the input)."""
        x = self.make_input(image, prompts, prev_k, crop, box_mask)
        if self.gate is not None:
            return self._gated(x, *self.gate)
        return self._mean_over(x, self.flips)[0]

    def _pass(self, x: torch.Tensor, dims: Tuple[int, ...]) -> torch.Tensor:
        """The foreground probability of ``x`` predicted flipped along ``dims`` (flipped back)."""
        xi = torch.flip(x, dims) if dims else x
        if self.half:
            with torch.autocast("cuda", dtype=torch.float16):
                logits = self.network(xi)
        else:
            logits = self.network(xi)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        p = fg_prob(logits[0].float())
        return torch.flip(p, tuple(d - 2 for d in dims)) if dims else p

    def _mean_over(self, x: torch.Tensor, flips: Sequence[Tuple[int, ...]]):
        """(mean probability over ``flips``, the first flip's probability)."""
        first = total = None
        for dims in flips:
            p = self._pass(x, dims)
            first = p if first is None else first
            total = p if total is None else total + p
        return (total if len(flips) == 1 else total / len(flips)), first

    def _gated(self, x: torch.Tensor, flips: Sequence[Tuple[int, ...]], agreement: float) -> torch.Tensor:
        mean, plain = self._mean_over(x, flips)
        a, b = mean > 0.5, plain > 0.5
        n = int(a.sum()) + int(b.sum())
        dice = 1.0 if n == 0 else 2.0 * int((a & b).sum()) / n
        kept = dice >= agreement
        self.events.append({"event": "mirror_gate", "dice": dice, "kept": "mean" if kept else "plain",
                            **self.where})
        return mean if kept else plain

    def view(self, image: torch.Tensor, prompts: ClassPrompts, prev_k: Optional[torch.Tensor], crop: Crop,
             budget: Budget, box_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`forward`, synced and timed on ``budget``'s clock (``forward_s``)."""
        t = budget.now()
        prob = self.forward(image, prompts, prev_k, crop, box_mask)
        self.sync()
        self.forward_s = max(budget.now() - t, 0.0)
        return prob

    # ------------------------------------------------------------------ cost
    def fits(self, budget: Budget, prompts: Optional[ClassPrompts] = None) -> bool:
        """Whether one more view (as long as the last one, with the prompt drawing scaled to
        ``prompts``' clicks) ends before ``budget``'s deadline."""
        return budget.fits(lambda: self.forward_s + self._drawing_extra(prompts))

    def _drawing_extra(self, prompts: Optional[ClassPrompts]) -> float:
        """Seconds that drawing ``prompts``' clicks costs beyond the drawing in the last view
        (negative when it has fewer clicks). Drawing grows with the clicks (one ball each), so a
        class with 60 000 clicks must not be timed like one with 3. The rate per click comes
        from views that drew at least 8 clicks; a class with more than 64 clicks and no rate
        known yet first times the drawing of its 8 newest clicks."""
        n = clicks_drawn(prompts) if prompts is not None else 0
        if n > 64 and self.encode_rate is None:
            sample = ClassPrompts(clicks=prompts.clicks[-8:])
            crop = make_crop(list(prompts.clicks[-1][1]), 1.0, self.patch)
            t = time.perf_counter()
            encode(sample, crop, None, int(round(self.card.click_radius)), self.card.prompt_decay, self.device)
            self.sync()
            self.encode_rate = (time.perf_counter() - t) / 8
        if self.encode_rate is None or prompts is None:
            return 0.0
        return self.encode_rate * (n - self.encode_n)

    @contextmanager
    def on_cpu(self) -> Iterator["Engine"]:
        """A twin engine on the CPU (float32) sharing this network, which is moved to the CPU for
        the duration and back to the device afterwards; it reports into the same ``events``."""
        self.network.to("cpu")
        try:
            cpu = Engine(self.network, self.card, torch.device("cpu"), self.flips)
            cpu.events, cpu.where = self.events, self.where
            # a CPU pass is far slower than the device's: let the budget guard know up front
            cpu.forward_s = self.forward_s * CPU_SLOWDOWN
            yield cpu
            self.forward_s = max(self.forward_s, cpu.forward_s)
        finally:
            self.network.to(self.device)
