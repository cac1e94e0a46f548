"""``python -m train.widen SRC DST --factor 2 [--policy SPEC] [--seed 0]``: a wider network that
computes what SRC computes, as the start of a fine-tuning run (``python -m train --init DST``).

Every stage's feature count is multiplied by ``--factor``. The weights SRC has are copied to the
same positions; the new channels get the wide network's fresh initialisation (seeded), and every
weight that *reads* a new channel is set to zero. The new channels therefore compute something
but contribute nothing, and the wide network's output equals SRC's (to float rounding) until
training moves those zeros; their gradients are not zero, so they do move from the first step
(zero-extension, the function-preserving widening of Net2Net without its channel copies; instance
normalisation is per channel, so it does not mix the old channels with the new).

The one layer whose inputs are not a prefix of its channels is a decoder stage's first
convolution: it reads the up-sampled features concatenated with the encoder's skip, so an old
input ``j`` maps to ``j`` in the first half and to ``j - C + C'`` in the second (``C``, ``C'``:
the skip's old and new width).
"""
from __future__ import annotations

import argparse
import copy
import re
import sys

import torch

from infer.card import CardError
from infer.convert import read_source, write_artifact
from infer.network import build_network
from infer.weights import WeightsError

_CONCAT = re.compile(r"^decoder\.stages\.\d+\.convs\.0\.")  # reads [up-sampled, skip]


def wider_architecture(arch: dict, factor: int) -> dict:
    """``arch`` with every stage's feature count multiplied by ``factor`` (an int >= 1)."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
    out = copy.deepcopy(arch)
    out["features_per_stage"] = [int(f) * factor for f in arch["features_per_stage"]]
    return out


def _input_positions(key: str, old: int, new: int) -> list:
    """Where the ``old`` input channels of parameter ``key`` sit among its ``new`` ones."""
    if old == new:
        return list(range(old))
    if _CONCAT.match(key):
        half, new_half = old // 2, new // 2
        return list(range(half)) + [new_half + j for j in range(half)]
    return list(range(old))


def widen_state_dict(state_dict: dict, fresh: dict) -> dict:
    """The wide state dict: ``fresh`` (a wide network's initialised state dict, same keys) with
    ``state_dict``'s values at their old positions and zeros wherever a weight reads a new
    channel. Aliased keys (the same tensor under two names) get equal values."""
    differ = sorted(set(fresh) ^ set(state_dict))
    if differ:
        raise ValueError(f"the two networks' parameter names differ: {differ[:5]}")
    out = {}
    for key, wide in fresh.items():
        old = state_dict[key]
        if old.dim() != wide.dim() or any(o > w for o, w in zip(old.shape, wide.shape)):
            raise ValueError(f"{key}: {tuple(old.shape)} does not fit in {tuple(wide.shape)}")
        w = wide.detach().clone().to(old.dtype)
        if old.shape == wide.shape:
            out[key] = old.detach().clone()
            continue
        if old.dim() <= 1:  # biases, norm scales and shifts, counters: per output channel
            w[: old.shape[0]] = old
            out[key] = w
            continue
        # conv weight (out, in, k...); a transposed conv's is (in, out, k...)
        in_dim, out_dim = (0, 1) if "transpconvs" in key else (1, 0)
        pos = _input_positions(key, old.shape[in_dim], w.shape[in_dim])
        new_inputs = sorted(set(range(w.shape[in_dim])) - set(pos))
        if new_inputs:
            w.index_fill_(in_dim, torch.tensor(new_inputs), 0.0)
        rows = torch.arange(old.shape[out_dim])
        block = w.index_select(out_dim, rows).index_copy(in_dim, torch.tensor(pos), old)
        w.index_copy_(out_dim, rows, block)
        out[key] = w
    return out


def widen(src, dst, factor: int, policy: str | None = None, seed: int = 0):
    """Write the widened artifact of SRC (release folder or artifact) into DST; returns its card."""
    sd, card = read_source(src, dst)
    wide_card = copy.deepcopy(card)
    wide_card.architecture = wider_architecture(card.architecture, factor)
    if policy is not None:
        wide_card.policy = policy
    note = f"widened x{factor} (python -m train.widen, seed {seed})"
    wide_card.source = f"{card.source.rstrip()}; {note}" if card.source.strip() else note
    wide_card.validate()  # CardError before anything is built or written
    torch.manual_seed(seed)
    net = build_network(wide_card.architecture, wide_card.input_channels, wide_card.num_classes)
    # aliased keys come out as equal copies; write_artifact checks them and stores each once
    write_artifact(dst, widen_state_dict(sd, net.state_dict()), wide_card)
    return wide_card


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.widen", description=__doc__.split("\n")[0])
    ap.add_argument("src", help="artifact or nnInteractive release folder")
    ap.add_argument("dst", help="output artifact folder (created)")
    ap.add_argument("--factor", type=int, default=2, help="feature multiplier per stage (default 2)")
    ap.add_argument("--policy", default=None, help="interaction policy for the card (default: SRC's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the new channels' initialisation")
    args = ap.parse_args(argv)
    try:
        card = widen(args.src, args.dst, args.factor, args.policy, args.seed)
    except (WeightsError, CardError, ValueError, OSError) as e:
        print(f"widen: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: features {card.architecture['features_per_stage']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
