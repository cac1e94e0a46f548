"""The model card (``model_card.json``) that sits beside ``weights.pt`` in a converted artifact.

It says everything the predictor needs besides the tensors: the architecture (canonical dict, see
``infer.network.normalize_arch``), the input-channel layout, the patch size (z, y, x), how prompts
are drawn (box style, click radius, prompt decay) and the image normalisation.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

from .writer import atomic_write
from .network import ArchitectureError, normalize_arch

FORMAT = "nnint-card/1"
CARD_FILE = "model_card.json"
# nnInteractive v1.0's input layout: the image, then the 7 prompt channels.
DEFAULT_CHANNELS = ("image", "prev_mask", "box+", "box-", "point+", "point-", "scribble+",
                    "scribble-")
BOX_STYLES = ("2d", "3d")
MAX_CLICK_RADIUS = 64  # voxels; nnInteractive v1.0 draws radius 4 (a ball is (2r + 1)^3 voxels)
NORMALIZATIONS = ("zscore_nonzero_bbox",)


class CardError(ValueError):
    """A model card is missing, malformed or inconsistent."""


@dataclasses.dataclass
class ModelCard:
    """Fields and JSON names as in docs/DESIGN.md.

    patch_size: (z, y, x) voxels fed to the network. channels: one name per input channel, in
    order (``DEFAULT_CHANNELS`` for nnInteractive). box_style: "2d" (box drawn on the z_mid slice
    only, as v1.0 was trained) or "3d" (slices z_min..z_max). click_radius: point-ball radius in
    voxels. prompt_decay: factor applied to older prompts, in (0, 1]. weights_sha256: hex digest
    of weights_file, or None (not checked). policy: the interaction policy the model is meant to
    run with (an ``infer.policy`` spec such as "reference"), or None (the predictor's default).
    """

    architecture: dict
    input_channels: int
    num_classes: int
    patch_size: tuple
    channels: tuple = DEFAULT_CHANNELS
    box_style: str = "2d"
    click_radius: float = 4
    prompt_decay: float = 0.9
    normalization: str = "zscore_nonzero_bbox"
    weights_file: str = "weights.pt"
    weights_sha256: str | None = None
    demo: bool = False
    source: str = ""
    format: str = FORMAT
    policy: str | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Normalise types in place and raise CardError on any inconsistency."""
        if self.format != FORMAT:
            raise CardError(f"card format {self.format!r} is not supported (expected {FORMAT!r})")
        try:
            self.architecture = normalize_arch(self.architecture)
        except ArchitectureError as e:
            raise CardError(f"architecture: {e}") from None
        self.input_channels = _pos_int("input_channels", self.input_channels)
        self.num_classes = _pos_int("num_classes", self.num_classes)
        if not isinstance(self.patch_size, (list, tuple)) or len(self.patch_size) != 3:
            raise CardError(f"patch_size must be 3 ints (z, y, x), got {self.patch_size!r}")
        self.patch_size = tuple(_pos_int("patch_size", p) for p in self.patch_size)
        _check_patch_strides(self.patch_size, self.architecture["strides"])
        self.channels = tuple(self.channels)
        if len(self.channels) != self.input_channels:
            raise CardError(f"channels lists {len(self.channels)} names but input_channels is "
                            f"{self.input_channels}")
        unknown = [c for c in self.channels if c not in DEFAULT_CHANNELS]
        if unknown or len(set(self.channels)) != len(self.channels) or self.channels[0] != "image":
            raise CardError(f"channels {list(self.channels)} must start with 'image' and hold "
                            f"distinct names from {list(DEFAULT_CHANNELS)}")
        if self.box_style not in BOX_STYLES:
            raise CardError(f"box_style {self.box_style!r} is unknown (one of {BOX_STYLES})")
        if isinstance(self.click_radius, bool) or not isinstance(self.click_radius, (int, float)) \
                or not 0 < self.click_radius <= MAX_CLICK_RADIUS:
            raise CardError(f"click_radius must be a number in (0, {MAX_CLICK_RADIUS}] voxels, got "
                            f"{self.click_radius!r}")
        if isinstance(self.prompt_decay, bool) or not isinstance(self.prompt_decay, (int, float)) \
                or not 0 < self.prompt_decay <= 1:
            raise CardError(f"prompt_decay must be in (0, 1], got {self.prompt_decay!r}")
        if self.normalization not in NORMALIZATIONS:
            raise CardError(f"normalization {self.normalization!r} is unknown "
                            f"(one of {NORMALIZATIONS})")
        wf = self.weights_file
        if not isinstance(wf, str) or not wf or wf != os.path.basename(wf) or wf in (".", ".."):
            raise CardError(f"weights_file must be a plain file name, got {wf!r}")
        if self.weights_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}",
                                                                str(self.weights_sha256)):
            raise CardError("weights_sha256 must be 64 lower-case hex digits or null")
        if not isinstance(self.demo, bool):
            raise CardError(f"demo must be true or false, got {self.demo!r}")
        self.source = str(self.source)
        if self.policy is not None:
            from .policy import parse_policy
            if not isinstance(self.policy, str):
                raise CardError(f"policy must be a string or null, got {self.policy!r}")
            try:
                parse_policy(self.policy)
            except ValueError as e:
                raise CardError(f"policy: {e}") from None

    def to_dict(self) -> dict:
        """The JSON object, keys in DESIGN.md order."""
        d = dataclasses.asdict(self)
        order = ["format", "architecture", "input_channels", "num_classes", "patch_size",
                 "channels", "box_style", "click_radius", "prompt_decay", "normalization",
                 "weights_file", "weights_sha256", "demo", "source"]
        out = {k: d[k] for k in order}
        out["patch_size"], out["channels"] = list(self.patch_size), list(self.channels)
        if self.policy is not None:  # optional: written only when set
            out["policy"] = self.policy
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ModelCard":
        if not isinstance(d, dict):
            raise CardError(f"model card must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CardError(f"unknown model card fields: {unknown}")
        missing = [n for n in ("architecture", "input_channels", "num_classes", "patch_size")
                   if n not in d]
        if missing:
            raise CardError(f"model card is missing {missing}")
        return cls(**d)

    @classmethod
    def load(cls, path) -> "ModelCard":
        """Read a card from ``path`` (the JSON file, or a folder holding model_card.json)."""
        path = Path(path)
        if path.is_dir():
            path = path / CARD_FILE
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CardError(f"no model card at {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CardError(f"cannot read model card {path}: {e}") from None
        try:
            return cls.from_dict(d)
        except CardError as e:
            raise CardError(f"{path}: {e}") from None

    def save(self, path) -> Path:
        """Write the card atomically to ``path`` (file, or folder -> folder/model_card.json)."""
        self.validate()
        path = Path(path)
        if path.is_dir():
            path = path / CARD_FILE
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _check_patch_strides(patch, strides) -> None:
    """Every patch axis must be a multiple of the network's total stride along it, or the
    decoder's skip connections do not line up (the first forward pass would fail)."""
    for axis, size in enumerate(patch):
        total = math.prod(int(s[axis]) for s in strides)
        if size % total:
            raise CardError(f"patch_size {list(patch)}: axis {axis} ({size}) is not a multiple of "
                            f"the network's total stride {total}")


def _pos_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise CardError(f"{name} must be a positive integer, got {v!r}")
    return int(v)
