"""LightningModule for U-Net / DeepLabv3+ built from plain dicts (so `load_from_checkpoint` works safely)."""

from __future__ import annotations

from torch import Tensor

from mvtec_seg.models.base import AnomalyModule
from mvtec_seg.models.segmenter.loss import SegmentationLoss, weighted_bce
from mvtec_seg.models.segmenter.synthetic import SyntheticDefects
from mvtec_seg.models.segmenter.torch_model import SegmentationNet


class Segmenter(AnomalyModule):
    """Supervised defect segmenter trained on `target_mask` (GT or pseudo), weighted by `target_weight`.

    `synthetic` (`{fraction, kind, seed}`, from `mask.synthetic_fraction`): each normal training image gets a
    synthetic defect with its exact mask with probability `fraction`. `distill_weight` (`mask.distill.weight`):
    a BCE term towards the batch's `soft_target` (the teacher's calibrated map) beside the hard targets.
    `channels_last`: NHWC weights (`AnomalyModule.use_channels_last`).
    """

    def __init__(
        self,
        net: dict,
        loss: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        evaluation: dict | None = None,
        synthetic: dict | None = None,
        distill_weight: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, evaluation)
        self.save_hyperparameters()
        self.net = SegmentationNet(**net)
        self.criterion = SegmentationLoss(**loss)
        self._defects: SyntheticDefects | None = None
        self.use_channels_last(channels_last)

    def _with_synthetic_defects(self, batch: dict) -> dict:
        spec = self.hparams.get("synthetic") or {}
        fraction = float(spec.get("fraction") or 0.0)
        if fraction <= 0:
            return batch
        if self._defects is None:
            self._defects = SyntheticDefects(kind=spec.get("kind", "object"), seed=int(spec.get("seed", 0)))
        return self._defects.paste(batch, fraction)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        batch = self._with_synthetic_defects(batch)
        logits = self.net(batch["image"])
        terms = self.criterion(logits, batch["target_mask"], batch.get("target_weight"))
        distill = float(self.hparams.get("distill_weight") or 0.0)
        if distill > 0 and batch.get("soft_target") is not None:
            terms["distill"] = weighted_bce(logits.float(), batch["soft_target"])
            terms["loss"] = terms["loss"] + distill * terms["distill"]
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
