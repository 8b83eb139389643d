"""Shared validation/test logic so every model is scored by the same code on the same data.

A subclass implements `training_step` and `anomaly_map(image) -> [B,H,W]` (higher = more anomalous,
probabilities for segmenters). Scores are never normalised per image: the image score is the map's max.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import Tensor

from mvtec_seg.metrics import METRIC_NAMES, AnomalyMetrics


def build_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    """Optimizer from a plain dict such as {name: adam, lr: 1e-4, weight_decay: 0}."""
    cfg = dict(cfg)
    name = cfg.pop("name").lower()
    classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if name not in classes:
        raise ValueError(f"model.optimizer.name={name!r} is not one of {sorted(classes)}")
    return classes[name](params, **cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict | None) -> dict | None:
    """LR scheduler from a plain dict such as {name: step, step_size: 800, gamma: 0.1, interval: epoch}."""
    if not cfg:
        return None
    cfg = dict(cfg)
    name, interval = cfg.pop("name").lower(), cfg.pop("interval", "epoch")
    classes = {"step": torch.optim.lr_scheduler.StepLR, "cosine": torch.optim.lr_scheduler.CosineAnnealingLR}
    if name not in classes:
        raise ValueError(f"model.scheduler.name={name!r} is not one of {sorted(classes)}")
    return {"scheduler": classes[name](optimizer, **cfg), "interval": interval}


class AnomalyModule(pl.LightningModule):
    """Base LightningModule: validation on `target_mask` (GT or pseudo), test always on `gt_mask`."""

    def __init__(
        self, optimizer: dict, scheduler: dict | None = None, evaluation: dict | None = None
    ) -> None:
        super().__init__()
        self.configure_evaluation(**(evaluation or {}))
        self.test_predictions: dict[str, np.ndarray] | None = None
        self.computed_metrics: dict[str, dict[str, float]] = {}  # full-precision values, by stage
        self._test_store: list[tuple[Tensor, Tensor]] = []

    def configure_evaluation(self, iou_threshold: float = 0.5, fpr_limit: float = 0.3) -> None:
        """(Re)build the metric objects, e.g. for a loaded checkpoint scored under today's settings."""
        self.val_metrics = AnomalyMetrics(iou_threshold=iou_threshold, fpr_limit=fpr_limit)
        self.test_metrics = AnomalyMetrics(iou_threshold=iou_threshold, fpr_limit=fpr_limit)

    # -- to implement ------------------------------------------------------------------------------
    def anomaly_map(self, image: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] -> [B,H,W] anomaly scores."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------------
    def forward(self, image: Tensor) -> dict[str, Tensor]:
        amap = self.anomaly_map(image)
        return {"anomaly_map": amap, "pred_score": amap.flatten(1).amax(1)}

    def configure_optimizers(self) -> Any:
        opt = build_optimizer(self.parameters(), self.hparams.optimizer)
        sched = build_scheduler(opt, self.hparams.get("scheduler"))
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        amap = self.anomaly_map(batch["image"]).float()
        self.val_metrics.update(amap, batch["target_mask"][:, 0] > 0.5)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        amap = self.anomaly_map(batch["image"]).float()
        self.test_metrics.update(amap, batch["gt_mask"][:, 0] > 0.5, batch["gt_label"])
        self._test_store.append((batch["index"].detach().cpu(), amap.detach().cpu()))

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)
        store = self._test_store
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, store)
            store = [item for part in gathered for item in part]
        if store:
            index = torch.cat([s[0] for s in store]).numpy()
            maps = torch.cat([s[1] for s in store]).numpy()
            order = np.argsort(index, kind="stable")
            self.test_predictions = {"index": index[order], "anomaly_map": maps[order]}
        self._test_store = []

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        return {"index": batch["index"], "anomaly_map": self.anomaly_map(batch["image"]).float()}

    def _log_metrics(self, stage: str, metric: AnomalyMetrics) -> dict[str, float]:
        values = metric.compute()
        metric.reset()
        out = {f"{stage}/{name}": float(values[name]) for name in METRIC_NAMES}
        # the metric states are already gathered across ranks, so every rank logs the same global value
        self.log_dict(out, prog_bar=stage == "val", sync_dist=True)
        self.computed_metrics[stage] = out
        return out
