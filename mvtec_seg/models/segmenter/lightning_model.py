"""LightningModule for U-Net / DeepLabv3+ built from plain dicts (so `load_from_checkpoint` works safely)."""

from __future__ import annotations

from torch import Tensor

from mvtec_seg.models.base import AnomalyModule
from mvtec_seg.models.segmenter.loss import SegmentationLoss
from mvtec_seg.models.segmenter.torch_model import SegmentationNet


class Segmenter(AnomalyModule):
    """Supervised defect segmenter trained on `target_mask` (GT or pseudo), weighted by `target_weight`."""

    def __init__(
        self,
        net: dict,
        loss: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        evaluation: dict | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler, evaluation)
        self.save_hyperparameters()
        self.net = SegmentationNet(**net)
        self.criterion = SegmentationLoss(**loss)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        logits = self.net(batch["image"])
        terms = self.criterion(logits, batch["target_mask"], batch.get("target_weight"))
        self.check_finite_loss(terms, "lower model.params.optimizer.lr or use trainer.precision=32-true")
        self.log_dict(
            {f"train/{k}": v.detach() for k, v in terms.items()},
            prog_bar=False,
            on_epoch=True,
            on_step=False,
            batch_size=len(logits),
            sync_dist=True,
        )
        return terms["loss"]

    def anomaly_map(self, image: Tensor) -> Tensor:
        was_training = self.net.training
        self.net.eval()
        out = self.net(image)["anomaly_map"]
        self.net.train(was_training)
        return out
