"""torchmetrics component around :mod:`mvtec_seg.metrics.functional`.

Why one class for all five metrics: the curve metrics (AUROC, AP, AUPRO) are not decomposable into
per-batch sums, so the raw maps are accumulated (``dist_reduce_fx="cat"``, gathered across DDP ranks) and
the exact functional definitions are applied once at ``compute()``; one stored copy of the maps serves
every metric (one sort of the pixels, too).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from mvtec_seg.metrics import functional as F

__all__ = ["AnomalyMetrics"]


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


class AnomalyMetrics(Metric):
    """All five metrics of ``METRIC_NAMES`` from one stored copy of maps, masks and labels.

    ``update(anomaly_map, gt_mask, gt_label=None)``; ``compute()`` returns float64 scalars (float32 on MPS)
    keyed by ``METRIC_NAMES``, NaN (with a warning) where a metric is undefined for the data.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

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

    def _result(self, value: float) -> Tensor:
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        return torch.tensor(value, dtype=dtype, device=self.device)

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
