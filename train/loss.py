"""Loss: ``dice_weight`` x (1 - soft Dice of the object channel) + cross-entropy (2 classes)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 10.0,
                 smooth: float = 1e-5) -> torch.Tensor:
    """logits (B, 2, Z, Y, X) float; target (B, Z, Y, X) {0, 1} -> scalar.

    Soft Dice is computed per example on the softmax probability of channel 1 and averaged over
    the batch; cross-entropy is the voxel mean. Computed in float32 whatever the logits' dtype.
    """
    logits = logits.float()
    target = target.float()
    prob = torch.softmax(logits, dim=1)[:, 1]
    dims = tuple(range(1, prob.dim()))
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    ce = F.cross_entropy(logits, target.long())
    return dice_weight * (1 - dice.mean()) + ce
