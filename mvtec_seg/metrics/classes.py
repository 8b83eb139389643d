"""torchmetrics wrappers around :mod:`mvtec_seg.metrics.functional`.

Why: the curve metrics (AUROC, AP, AUPRO) are not decomposable into per-batch sums, so the raw maps
are accumulated (``dist_reduce_fx="cat"``, gathered across DDP ranks) and the exact functional
definition is applied once at ``compute()``. Every class takes the same
``update(anomaly_map, gt_mask, gt_label=None)`` so they are interchangeable in a LightningModule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from mvtec_seg.metrics import functional as F

__all__ = ["AUPRO", "AnomalyMetrics", "IoU", "ImageAUROC", "PixelAP", "PixelAUROC"]


def _batch(anomaly_map: Tensor, gt_mask: Tensor, gt_label: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Normalise one batch: map float32 [B,H,W], mask uint8 [B,H,W], label uint8 [B].

    uint8 rather than bool because every collective backend (gloo included) can gather it.
    """
    amap = anomaly_map.detach()
    mask = gt_mask.detach()
    if amap.ndim == 4 and amap.shape[1] == 1:
        amap = amap[:, 0]
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if amap.ndim != 3:
        raise ValueError(f"anomaly_map must have shape [B,H,W] or [B,1,H,W], got {tuple(anomaly_map.shape)}")
    if mask.shape != amap.shape:
        raise ValueError(
            f"gt_mask shape {tuple(gt_mask.shape)} does not match anomaly_map shape {tuple(anomaly_map.shape)}"
        )
    mask = (mask != 0).to(torch.uint8)
    if gt_label is None:
        label = mask.flatten(1).amax(dim=1)
    else:
        label = (gt_label.detach().reshape(-1) != 0).to(torch.uint8)
        if label.numel() != amap.shape[0]:
            raise ValueError(
                f"gt_label has {label.numel()} entries but anomaly_map has {amap.shape[0]} images"
            )
    return amap.to(torch.float32), mask, label.to(device=amap.device)


def _empty(state: list[Tensor] | Tensor) -> bool:
    """True when nothing was stored (after a DDP sync a list state is already one tensor)."""
    return isinstance(state, list) and len(state) == 0


class _ExactMetric(Metric):
    """Shared flags and result conversion (a float64 scalar on the metric's device)."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def _result(self, value: float) -> Tensor:
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        return torch.tensor(value, dtype=dtype, device=self.device)


class AnomalyMetrics(_ExactMetric):
    """All five metrics of ``METRIC_NAMES`` from one stored copy of maps, masks and labels."""

    anomaly_maps: list[Tensor]
    gt_masks: list[Tensor]
    gt_labels: list[Tensor]

    def __init__(self, iou_threshold: float = 0.5, fpr_limit: float = 0.3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.iou_threshold = float(iou_threshold)
        self.fpr_limit = F._check_fpr_limit(fpr_limit)
        self.add_state("anomaly_maps", default=[], dist_reduce_fx="cat")
        self.add_state("gt_masks", default=[], dist_reduce_fx="cat")
        self.add_state("gt_labels", default=[], dist_reduce_fx="cat")

    def update(self, anomaly_map: Tensor, gt_mask: Tensor, gt_label: Tensor | None = None) -> None:
        """Store a batch: anomaly_map [B,H,W], gt_mask [B,H,W] or [B,1,H,W], gt_label [B]."""
        amap, mask, label = _batch(anomaly_map, gt_mask, gt_label)
        self.anomaly_maps.append(amap)
        self.gt_masks.append(mask)
        self.gt_labels.append(label)

    def compute(self) -> dict[str, Tensor]:
        """Exact metrics on everything stored (all ranks after sync), keyed by METRIC_NAMES."""
        if _empty(self.anomaly_maps):
            return {
                name: self._result(F._undefined(name, "no data was passed to update()"))
                for name in F.METRIC_NAMES
            }
        values = F.compute_all(
            dim_zero_cat(self.anomaly_maps),
            dim_zero_cat(self.gt_masks),
            dim_zero_cat(self.gt_labels),
            iou_threshold=self.iou_threshold,
            fpr_limit=self.fpr_limit,
        )
        return {name: self._result(v) for name, v in values.items()}


class ImageAUROC(_ExactMetric):
    """Image-level AUROC of the map maxima; stores only one score and one label per image."""

    scores: list[Tensor]
    labels: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, anomaly_map: Tensor, gt_mask: Tensor, gt_label: Tensor | None = None) -> None:
        amap, _, label = _batch(anomaly_map, gt_mask, gt_label)
        self.scores.append(F.image_scores(amap))
        self.labels.append(label)

    def compute(self) -> Tensor:
        if _empty(self.scores):
            return self._result(F._undefined("image_AUROC", "no data was passed to update()"))
        value = F.auroc(
            dim_zero_cat(self.scores), dim_zero_cat(self.labels), name="image_AUROC", unit="images"
        )
        return self._result(value)


class _PixelMetric(_ExactMetric):
    """Stores flattened pixel scores and labels (so image sizes may differ between batches)."""

    scores: list[Tensor]
    labels: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, anomaly_map: Tensor, gt_mask: Tensor, gt_label: Tensor | None = None) -> None:
        amap, mask, _ = _batch(anomaly_map, gt_mask, gt_label)
        self.scores.append(amap.reshape(-1))
        self.labels.append(mask.reshape(-1))


class PixelAUROC(_PixelMetric):
    """Pixel-level exact ROC AUC."""

    def compute(self) -> Tensor:
        if _empty(self.scores):
            return self._result(F._undefined("pixel_AUROC", "no data was passed to update()"))
        value = F.auroc(
            dim_zero_cat(self.scores), dim_zero_cat(self.labels), name="pixel_AUROC", unit="pixels"
        )
        return self._result(value)


class PixelAP(_PixelMetric):
    """Pixel-level step-wise average precision."""

    def compute(self) -> Tensor:
        if _empty(self.scores):
            return self._result(F._undefined("pixel_AP", "no data was passed to update()"))
        value = F.average_precision(
            dim_zero_cat(self.scores), dim_zero_cat(self.labels), name="pixel_AP", unit="pixels"
        )
        return self._result(value)


class AUPRO(_ExactMetric):
    """Pixel AUPRO up to ``fpr_limit``; keeps the [N,H,W] layout because regions are 2-D components."""

    anomaly_maps: list[Tensor]
    gt_masks: list[Tensor]

    def __init__(self, fpr_limit: float = 0.3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fpr_limit = F._check_fpr_limit(fpr_limit)
        self.add_state("anomaly_maps", default=[], dist_reduce_fx="cat")
        self.add_state("gt_masks", default=[], dist_reduce_fx="cat")

    def update(self, anomaly_map: Tensor, gt_mask: Tensor, gt_label: Tensor | None = None) -> None:
        amap, mask, _ = _batch(anomaly_map, gt_mask, gt_label)
        self.anomaly_maps.append(amap)
        self.gt_masks.append(mask)

    def compute(self) -> Tensor:
        if _empty(self.anomaly_maps):
            return self._result(F._undefined("pixel_AUPRO", "no data was passed to update()"))
        value = F.aupro(
            dim_zero_cat(self.anomaly_maps), dim_zero_cat(self.gt_masks), self.fpr_limit, name="pixel_AUPRO"
        )
        return self._result(value)


class IoU(_ExactMetric):
    """Pooled IoU of ``anomaly_map >= threshold``; only two integer sums are kept (cheap to sync)."""

    intersection: Tensor
    union: Tensor

    def __init__(self, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.add_state("intersection", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("union", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, anomaly_map: Tensor, gt_mask: Tensor, gt_label: Tensor | None = None) -> None:
        amap, mask, _ = _batch(anomaly_map, gt_mask, gt_label)
        pred = amap >= self.threshold
        target = mask.bool()
        self.intersection += (pred & target).sum()
        self.union += (pred | target).sum()

    def compute(self) -> Tensor:
        union = int(self.union)
        why = "empty prediction and empty ground truth (union is 0)"
        return self._result(F._ratio(int(self.intersection), union, "IoU", why))
