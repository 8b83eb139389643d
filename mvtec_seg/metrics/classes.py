"""torchmetrics component around :mod:`mvtec_seg.metrics.functional`.

Why one class for all five metrics: the curve metrics (AUROC, AP, AUPRO) are not decomposable into
per-batch sums, so every pixel's score is kept (``dist_reduce_fx="cat"``, gathered across DDP ranks) and the
exact functional definitions are applied once at ``compute()``.

What is kept, and why it is exact: not the maps and masks, but the pixels already split by the ground
truth, which is all the exact definitions need (`split.PixelSplit`): the float32 score of each normal
pixel (4 bytes), the float32 score and int32 region size of each anomalous pixel (8 bytes; regions are
8-connected within one image, so they are labelled at ``update``), the number of regions (a sum), and one
float32 score and uint8 label per image. That is 4 bytes per normal pixel and 8 per anomalous one (MVTec
test sets: about 4.1 bytes per pixel) instead of 5 (float32 map + uint8 mask) before; no mask, no float64.
Maps given as float64 are rounded to float32, as before.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from mvtec_seg.metrics import functional as F
from mvtec_seg.metrics import split as S

__all__ = ["BYTES_PER_ANOMALOUS_PIXEL", "BYTES_PER_NORMAL_PIXEL", "AnomalyMetrics"]

BYTES_PER_NORMAL_PIXEL = 4
BYTES_PER_ANOMALOUS_PIXEL = 8


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
    """All five metrics of ``METRIC_NAMES`` from the pixels split by the ground truth (see the module doc).

    ``update(anomaly_map, gt_mask, gt_label=None)``; ``compute()`` returns float64 scalars (float32 on MPS)
    keyed by ``METRIC_NAMES``, NaN (with a warning) where a metric is undefined for the data. On a CUDA
    device the states stay there and ``compute()`` runs there (regions are labelled on CPU at ``update``).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    normal_scores: list[Tensor]
    anomalous_scores: list[Tensor]
    anomalous_region_sizes: list[Tensor]
    n_regions: Tensor
    image_scores: list[Tensor]
    image_labels: list[Tensor]

    def __init__(self, iou_threshold: float = 0.5, fpr_limit: float = 0.3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.iou_threshold = float(iou_threshold)
        self.fpr_limit = F._check_fpr_limit(fpr_limit)
        for name in (
            "normal_scores",
            "anomalous_scores",
            "anomalous_region_sizes",
            "image_scores",
            "image_labels",
        ):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("n_regions", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, anomaly_map: Tensor, gt_mask: Tensor, gt_label: Tensor | None = None) -> None:
        """Split a batch: anomaly_map [B,H,W], gt_mask [B,H,W] or [B,1,H,W], gt_label [B]."""
        amap, mask, label = _batch(anomaly_map, gt_mask, gt_label)
        anomalous = mask.bool()
        sizes, n_regions = S.region_sizes(anomalous.cpu())
        self.normal_scores.append(amap[~anomalous])
        self.anomalous_scores.append(amap[anomalous])
        self.anomalous_region_sizes.append(torch.from_numpy(sizes).to(amap.device))
        self.n_regions += n_regions
        self.image_scores.append(amap.flatten(1).amax(dim=1))
        self.image_labels.append(label)

    def _result(self, value: float) -> Tensor:
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        return torch.tensor(value, dtype=dtype, device=self.device)

    def compute(self) -> dict[str, Tensor]:
        """Exact metrics on everything kept (all ranks after sync), keyed by METRIC_NAMES."""
        if _empty(self.image_scores):
            return {
                name: self._result(F._undefined(name, "no data was passed to update()"))
                for name in F.METRIC_NAMES
            }
        states = [
            dim_zero_cat(s)
            for s in (
                self.normal_scores,
                self.anomalous_scores,
                self.anomalous_region_sizes,
                self.image_scores,
                self.image_labels,
            )
        ]
        if not S._on_device(states[0]):
            states = [s.cpu().numpy() for s in states]  # numpy's sort is the fast one on CPU
        normal, anomalous, sizes, img_score, img_label = states
        pixels = S.PixelSplit(normal, anomalous, 1.0 / S._f64(sizes), int(self.n_regions))
        values = F.image_and_pixel_metrics(img_score, img_label, pixels, self.iou_threshold, self.fpr_limit)
        return {name: self._result(v) for name, v in values.items()}

    def aupro(self, fpr_limit: float, name: str = "pixel_AUPRO") -> float:
        """AUPRO to another FPR limit from the same kept pixels (MVTec AD 2's 0.05 beside the run's limit),
        exact as `compute()`; NaN with a warning where undefined."""
        if _empty(self.image_scores):
            return F._undefined(name, "no data was passed to update()")
        states = [
            dim_zero_cat(s) for s in (self.normal_scores, self.anomalous_scores, self.anomalous_region_sizes)
        ]
        if not S._on_device(states[0]):
            states = [s.cpu().numpy() for s in states]
        normal, anomalous, sizes = states
        sp = S.PixelSplit(normal, anomalous, 1.0 / S._f64(sizes), int(self.n_regions))
        reason = S._pro_undefined_reason(sp.n_regions, sp.n_normal)
        if reason:
            return F._undefined(name, reason)
        return float(S._aupro_split(sp, F._check_fpr_limit(fpr_limit)))
