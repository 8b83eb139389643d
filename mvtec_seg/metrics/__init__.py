"""Exact anomaly-segmentation metrics: functional definitions and a torchmetrics component."""

from mvtec_seg.metrics.classes import AnomalyMetrics
from mvtec_seg.metrics.functional import (
    METRIC_LABELS,
    METRIC_NAMES,
    MONITORS,
    SYNTHETIC_PREFIX,
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
from mvtec_seg.metrics.mvtec_ad2 import mvtec_ad2_metrics, normal_threshold, seg_f1

__all__ = [
    "METRIC_LABELS",
    "METRIC_NAMES",
    "MONITORS",
    "SYNTHETIC_PREFIX",
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
    "mvtec_ad2_metrics",
    "normal_threshold",
    "precision_recall_curve",
    "precision_recall_iou",
    "pro_curve",
    "roc_curve",
    "seg_f1",
]
