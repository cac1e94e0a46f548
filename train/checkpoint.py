"""Per-epoch checkpoints: an ``infer``-loadable artifact plus the optimizer state, written atomically.

Layout of a run folder ``OUT``::

    OUT/epoch_0003/model_card.json   the model card (infer.card.ModelCard, with weights_sha256)
    OUT/epoch_0003/weights.pt        plain dict of tensors (infer.convert.write_artifact)
    OUT/epoch_0003/train_state.pt    optimizer / grad-scaler state, epoch, step (plain containers)
    OUT/latest                       text: the name of the newest complete checkpoint folder
    OUT/best/                        the artifact of the epoch with the best validation score so
                                     far, with best.json (epoch, metric, value); runs with --val only
    OUT/final/                       the artifact (card + weights) of the last epoch, once done

Only the newest ``keep`` epoch folders stay (``keep`` <= 0: all of them); ``best/`` and ``final/``
are separate copies, never removed.

A checkpoint folder is filled under a temporary name and renamed into place, then ``latest`` is
replaced, both through ``infer.writer.atomic_write``: an interrupted write leaves the previous
checkpoint and ``latest`` untouched. Every file is read back with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from infer.card import ModelCard
from infer.convert import write_artifact
from infer.writer import atomic_write
from infer.weights import read_artifact

LATEST = "latest"
STATE_FILE = "train_state.pt"
BEST = "best"
BEST_FILE = "best.json"


def epoch_dir_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def save_checkpoint(out, epoch: int, state_dict: dict, card: ModelCard, train_state: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint ``epoch`` (number of completed epochs) into ``out``; returns its folder.

    ``train_state``: plain containers of tensors / numbers / strings (optimizer.state_dict() etc.).
    Older epoch folders beyond the newest ``keep`` are removed (``keep`` <= 0: none is).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final = out / epoch_dir_name(epoch)
    with atomic_write(final, folder=True) as tmp:  # a re-run of the same epoch replaces it
        write_artifact(tmp, {k: v.detach().cpu() for k, v in state_dict.items()}, card)
        torch.save(train_state, Path(tmp) / STATE_FILE)
    with atomic_write(out / LATEST, "w", encoding="utf-8") as f:
        f.write(final.name + "\n")
    if keep > 0:
        olds = sorted(p for p in out.glob("epoch_*") if p.is_dir() and p.name != final.name)
        for p in olds[: max(0, len(olds) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def read_best(out) -> dict | None:
    """``OUT/best/best.json`` ({"epoch", "metric", "value", "higher_is_better"}), or None."""
    p = Path(out) / BEST / BEST_FILE
    if not p.is_file():
        return None
    return json.loads(p.read_text(encoding="utf-8"))


def is_better(value, best: dict | None, metric: str) -> bool:
    """True when ``value`` (of ``metric``, higher is better) beats ``best`` (``read_best``'s
    record); a NaN or missing value never does, anything finite beats no record or another
    metric's record."""
    if value is None or not math.isfinite(value):
        return False
    if best is None or best.get("metric") != metric or best.get("value") is None:
        return True
    return value > best["value"]


def save_best(out, state_dict: dict, card: ModelCard, record: dict) -> Path:
    """Write ``OUT/best`` (card + weights + best.json holding ``record``), atomically."""
    folder = Path(out) / BEST
    with atomic_write(folder, folder=True) as tmp:
        write_artifact(tmp, {k: v.detach().cpu() for k, v in state_dict.items()}, card)
        (Path(tmp) / BEST_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return folder


def latest_checkpoint(out) -> Path | None:
    """The folder ``OUT/latest`` names, or None when there is no complete checkpoint."""
    p = Path(out) / LATEST
    if not p.is_file():
        return None
    folder = Path(out) / p.read_text(encoding="utf-8").strip()
    return folder if (folder / STATE_FILE).is_file() else None


def load_checkpoint(folder) -> tuple[dict, ModelCard, dict]:
    """-> (state dict, card, train_state) of a checkpoint folder."""
    folder = Path(folder)
    sd, card = read_artifact(folder)
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    return sd, card, state


def export_final(out, state_dict: dict, card: ModelCard) -> Path:
    """Write the artifact ``OUT/final`` (card + weights, no training state), atomically."""
    out = Path(out)
    final = out / "final"
    with atomic_write(final, folder=True) as tmp:
        write_artifact(tmp, {k: v.detach().cpu() for k, v in state_dict.items()}, card)
    return final
