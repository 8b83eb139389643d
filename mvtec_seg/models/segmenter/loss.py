"""Segmentation losses on logits: BCE for DeepLabv3+, BCE + Dice for U-Net (as in the reference work).

Both terms take soft targets in [0, 1] (soft pseudo targets) and an optional per-pixel weight (0 = ignore,
for uncertain pseudo-mask pixels). With no weight they equal `nn.BCEWithLogitsLoss` and smp's binary
`DiceLoss(from_logits=True)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def weighted_bce(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean BCE-with-logits over the pixels with weight > 0 (weights as given)."""
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)


def weighted_dice(logits: Tensor, target: Tensor, weight: Tensor | None = None, eps: float = 1e-7) -> Tensor:
    """smp's binary soft Dice over the whole batch (0 when the batch has no positive target), with
    ignored pixels (weight 0) left out of both sums."""
    prob = F.logsigmoid(logits).exp().flatten()
    target = target.flatten()
    w = torch.ones_like(target) if weight is None else weight.flatten()
    inter = (w * prob * target).sum()
    card = (w * (prob + target)).sum()
    score = (2.0 * inter) / card.clamp_min(eps)
    has_positive = ((w * target).sum() > 0).to(score.dtype)
    return (1.0 - score) * has_positive


class SegmentationLoss(nn.Module):
    """Weighted BCE-with-logits plus optional soft Dice; both take logits (no sigmoid beforehand)."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 0.0) -> None:
        super().__init__()
        self.bce_weight, self.dice_weight = bce_weight, dice_weight

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> dict[str, Tensor]:
        logits = logits.float()
        terms = {"bce": weighted_bce(logits, target, weight)}
        loss = self.bce_weight * terms["bce"]
        if self.dice_weight > 0:
            terms["dice"] = weighted_dice(logits, target, weight)
            loss = loss + self.dice_weight * terms["dice"]
        return {"loss": loss, **terms}
