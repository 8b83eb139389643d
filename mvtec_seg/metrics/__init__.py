"""Exact anomaly-segmentation metrics: functional definitions and a torchmetrics component."""

from mvtec_seg.metrics.classes import AnomalyMetrics
from mvtec_seg.metrics.functional import (
    METRIC_LABELS,
    METRIC_NAMES,
    UndefinedMetricWarning,
    aupro,
    auroc,
    average_precision,
    binary_clf_curve,
    compute_all,
    f1_optimal_threshold,
    image_scores,
    iou,
    precision_recall_curve,
    precision_recall_iou,
    pro_curve,
    roc_curve,
)

__all__ = [
    "METRIC_LABELS",
    "METRIC_NAMES",
    "AnomalyMetrics",
    "UndefinedMetricWarning",
    "aupro",
    "auroc",
    "average_precision",
    "binary_clf_curve",
    "compute_all",
    "f1_optimal_threshold",
    "image_scores",
    "iou",
    "precision_recall_curve",
    "precision_recall_iou",
    "pro_curve",
    "roc_curve",
]
