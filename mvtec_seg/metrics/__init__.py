"""Exact anomaly-segmentation metrics: functional definitions and torchmetrics wrappers."""

from mvtec_seg.metrics.classes import AUPRO, AnomalyMetrics, ImageAUROC, IoU, PixelAP, PixelAUROC
from mvtec_seg.metrics.functional import (
    METRIC_NAMES,
    UndefinedMetricWarning,
    aupro,
    auroc,
    average_precision,
    binary_clf_curve,
    compute_all,
    image_scores,
    iou,
    precision_recall_iou,
    pro_curve,
)

__all__ = [
    "AUPRO",
    "METRIC_NAMES",
    "AnomalyMetrics",
    "ImageAUROC",
    "IoU",
    "PixelAP",
    "PixelAUROC",
    "UndefinedMetricWarning",
    "aupro",
    "auroc",
    "average_precision",
    "binary_clf_curve",
    "compute_all",
    "image_scores",
    "iou",
    "precision_recall_iou",
    "pro_curve",
]
