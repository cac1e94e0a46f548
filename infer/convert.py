"""``python -m infer.convert SRC DST [--box-style 2d|3d] [--demo] [--patch N] [--policy SPEC]``: write a converted artifact.

SRC is an nnInteractive release folder (or the folder above it) or an existing artifact. DST gets
``weights.pt`` (a plain dict of tensors, loadable with ``torch.load(weights_only=True)``) and
``model_card.json`` (with the sha256 of weights.pt). Both are written atomically
(``infer.writer.atomic_write``: a temporary file in DST, then a rename). ``--patch`` and ``--policy``
set the card's patch size and interaction policy (the network is fully convolutional: the same
weights run at any patch that its strides divide).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .card import CARD_FILE, CardError, ModelCard
from .writer import atomic_write
from .weights import (WeightsError, find_model_root, instantiate, read_artifact, read_release,
                      sha256_file)


def share_aliases(net: torch.nn.Module, state_dict: dict) -> dict:
    """``state_dict`` with every group of aliased entries holding one tensor, so that
    ``torch.save`` stores it once. The network registers some modules under several names (a
    block's ``conv`` is also ``all_modules.0``, the decoder keeps the encoder as
    ``decoder.encoder``), so each parameter has up to four keys; ``net`` (built from the same
    state dict, e.g. on the meta device) says which keys are one parameter. A checkpoint saved
    from a module shares these already; one whose entries were copied one by one (``v.cpu()``
    per key on a GPU) holds separate copies, which would make the artifact ~3.7x larger and
    slower to load. Copies that differ are refused (WeightsError): the network can hold only
    one of them."""
    groups: dict = {}
    for name, t in net.state_dict(keep_vars=True).items():  # the Parameter objects themselves
        groups.setdefault(id(t), []).append(name)
    out = dict(state_dict)
    for names in groups.values():
        first = state_dict[names[0]]
        for name in names[1:]:
            if not _same_tensor(state_dict[name], first):
                raise WeightsError(f"aliased entries {names[0]!r} and {name!r} (one parameter of "
                                   f"the network) hold different values")
            out[name] = first
    return out


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (a NaN equals the same NaN): the same view of one storage, or
    equal contents."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if (a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.stride() == b.stride()):
        return True
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return bool(torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)))


def write_artifact(dst, state_dict: dict, card: ModelCard) -> Path:
    """Write ``state_dict`` and ``card`` (weights_sha256 filled in) into folder ``dst``.

    The state dict is checked against the card's architecture first (strict, on the meta device,
    so nothing is allocated); aliased entries are stored once (``share_aliases``).
    """
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise WeightsError("state dict must map names to tensors")
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state_dict.items()}
    net = instantiate(card, meta, device="meta")  # raises WeightsError on any key / shape mismatch
    state_dict = share_aliases(net, state_dict)
    target = dst / card.weights_file
    with atomic_write(target) as f:
        torch.save(state_dict, f)
    card.weights_sha256 = sha256_file(target)
    card.save(dst / CARD_FILE)
    return dst


def read_source(src, dst, box_style: str | None = None, demo: bool | None = None) -> tuple[dict, ModelCard]:
    """(state dict, card) of SRC, a release folder or an artifact, about to be written as a new
    artifact into DST (refused when DST is SRC's folder): box_style / demo override the card's
    values when given (a release defaults to "2d", False); the card's weights file is
    ``weights.pt``."""
    kind, root = find_model_root(src)
    if Path(dst).resolve() == root.resolve():
        raise WeightsError(f"DST {dst} is the source folder; choose another folder")
    if kind == "release":
        sd, card = read_release(root, box_style or "2d", bool(demo))
    else:
        sd, card = read_artifact(root)
        card.box_style = box_style or card.box_style
        card.demo = card.demo if demo is None else demo
        card.source = card.source or f"artifact {root.name!r}"
    card.weights_file = "weights.pt"
    return sd, card


def convert(src, dst, box_style: str | None = None, demo: bool | None = None,
            patch=None, policy: str | None = None) -> Path:
    """Convert SRC (release or artifact) into an artifact folder DST; returns DST.

    box_style / demo override the card's values when given (``read_source``); so do ``patch``
    (one int for all axes, or three) and ``policy`` (an ``infer.policy`` spec).
    """
    sd, card = read_source(src, dst, box_style, demo)
    if policy is not None:
        card.policy = policy
    if patch is not None:
        card.patch_size = [patch] * 3 if isinstance(patch, int) else list(patch)
    try:
        card.validate()
    except CardError as e:
        raise WeightsError(str(e)) from None
    return write_artifact(dst, sd, card)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infer.convert", description=__doc__.split("\n")[0])
    ap.add_argument("src", help="nnInteractive release folder or converted artifact folder")
    ap.add_argument("dst", help="output folder (created)")
    ap.add_argument("--box-style", choices=("2d", "3d"), default=None,
                    help="how boxes are drawn for this model (release default: 2d)")
    ap.add_argument("--demo", action="store_true", default=None,
                    help="mark the card as a demo (not a real trained) model")
    ap.add_argument("--patch", type=int, nargs="+", default=None, metavar="N",
                    help="patch size: one number for all axes or three (z y x); default: the source's")
    ap.add_argument("--policy", default=None,
                    help="interaction policy written into the card (an infer.policy spec, e.g. "
                         "'reference,refine=none'); default: the source's")
    args = ap.parse_args(argv)
    if args.patch is not None and len(args.patch) not in (1, 3):
        ap.error("--patch takes one number or three")
    patch = None if args.patch is None else (args.patch[0] if len(args.patch) == 1 else args.patch)
    try:
        dst = convert(args.src, args.dst, args.box_style, args.demo, patch, args.policy)
    except (WeightsError, CardError, OSError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    card = ModelCard.load(dst)
    weights = dst / card.weights_file
    print(f"wrote {weights} ({weights.stat().st_size / 2**20:.1f} MiB, sha256 {card.weights_sha256})")
    print(f"wrote {dst / CARD_FILE} (patch {list(card.patch_size)}, {card.input_channels} -> "
          f"{card.num_classes} channels, box_style {card.box_style}, demo {card.demo})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
