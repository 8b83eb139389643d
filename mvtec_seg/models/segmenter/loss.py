"""Segmentation losses on logits: BCE for DeepLabv3+, BCE + Dice for U-Net (as in the reference work)."""

from __future__ import annotations

from segmentation_models_pytorch.losses import DiceLoss
from torch import Tensor, nn


class SegmentationLoss(nn.Module):
    """Weighted BCE-with-logits plus optional soft Dice; both take logits (no sigmoid beforehand)."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 0.0) -> None:
        super().__init__()
        self.bce_weight, self.dice_weight = bce_weight, dice_weight
        self.bce = nn.BCEWithLogitsLoss()
        self.dice = DiceLoss(mode="binary", from_logits=True) if dice_weight > 0 else None

    def forward(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        terms = {"bce": self.bce(logits.float(), target)}
        loss = self.bce_weight * terms["bce"]
        if self.dice is not None:
            terms["dice"] = self.dice(logits.float(), target)
            loss = loss + self.dice_weight * terms["dice"]
        return {"loss": loss, **terms}
