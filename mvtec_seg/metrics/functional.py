"""Exact anomaly-detection and segmentation metrics (the MVTec AD definitions).

Why hand-written: torchmetrics' binary AUROC/AP apply a sigmoid to scores outside ``[0, 1]`` and
PRO implementations disagree on how the FPR limit is handled. Here every metric uses the scores as
they are, handles ties exactly (one curve point per distinct score), and is checked against
brute-force references in ``tests/test_metrics.py``.

The pixel metrics' fast core is `mvtec_seg.metrics.split`; the full curves (for plots and the
F1-optimal threshold) are computed here by one descending sort. Inputs are torch tensors or numpy arrays;
results are plain Python floats. Undefined metrics return NaN and emit an `UndefinedMetricWarning`.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage
import torch
from torch import Tensor

from mvtec_seg.metrics.inputs import (
    _SLICE_8_CONNECTED,
    Array,
    ArrayLike,
    UndefinedMetricWarning,
    _binary_np,
    _check_fpr_limit,
    _check_same_shape,
    _iou,
    _pro_undefined_reason,
    _ratio,
    _scores_np,
    _stack_3d,
    _undefined,
)
from mvtec_seg.metrics.split import (
    PixelSplit,
    _ap_sorted,
    _aupro_split,
    _auroc_sorted,
    _float_scores,
    _sort,
    _split_1d,
    _split_metrics,
    _stack_3d_tensor,
    region_sizes,
    split_pixels,
)

__all__ = [
    "METRIC_LABELS",
    "METRIC_NAMES",
    "MONITORS",
    "PixelSplit",
    "SYNTHETIC_PREFIX",
    "UndefinedMetricWarning",
    "aupro",
    "auroc",
    "average_precision",
    "binary_clf_curve",
    "compute_all",
    "image_and_pixel_metrics",
    "f1_optimal_threshold",
    "image_scores",
    "iou",
    "precision_recall_iou",
    "precision_recall_curve",
    "pro_curve",
    "region_sizes",
    "roc_curve",
    "split_pixels",
]

METRIC_NAMES: tuple[str, ...] = ("image_AUROC", "pixel_AUROC", "pixel_AP", "pixel_AUPRO", "IoU")
SYNTHETIC_PREFIX = "synthetic_"
"""The metrics on the GT-free synthetic validation set are logged as `val/synthetic_<name>`."""
MONITORS: tuple[str, ...] = (
    "train/loss",
    *(f"val/{m}" for m in METRIC_NAMES),
    *(f"val/{SYNTHETIC_PREFIX}{m}" for m in METRIC_NAMES),
)
"""Every value a run logs that a checkpoint can be selected by (`checkpoint.monitor`, `mask.monitor`)."""
METRIC_LABELS: dict[str, str] = {
    "pixel_AUPRO": "pixel AUPRO",
    "pixel_AP": "pixel AP",
    "IoU": "IoU",
    "pixel_AUROC": "pixel AUROC",
    "image_AUROC": "image AUROC",
}
"""How tables and plots name each metric, in the order they show them: localisation first."""


# ---------------------------------------------------------------------------------------------
# sorted-score core (sort once, reuse for AUROC, AP and PRO)
# ---------------------------------------------------------------------------------------------


def _sort_desc(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Descending order and sorted scores; tie order is irrelevant since only run ends are used."""
    order = np.argsort(-s)  # scores are always float here, so negation is exact
    return s[order], order


def _run_ends(sorted_s: np.ndarray) -> np.ndarray:
    """Index of the last element of each run of equal scores: one curve point per distinct score."""
    n = sorted_s.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.flatnonzero(sorted_s[1:] != sorted_s[:-1])
    return np.append(change, n - 1).astype(np.int64)


def _curve_sorted(
    sorted_s: np.ndarray, sorted_pos: np.ndarray, ends: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fps, tps, thresholds) as int64 counts at each distinct score, thresholds descending."""
    if ends is None:
        ends = _run_ends(sorted_s)
    tps = np.cumsum(sorted_pos, dtype=np.int64)[ends]
    fps = ends + 1 - tps
    return fps, tps, sorted_s[ends]


def _regions(mask3d: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Flat region id per pixel (0 = normal), region sizes (index 0 unused), #regions, #normal pixels."""
    labels, n_regions = scipy.ndimage.label(mask3d, structure=_SLICE_8_CONNECTED)
    labels = labels.reshape(-1)
    sizes = np.bincount(labels, minlength=n_regions + 1)
    return labels, sizes, int(n_regions), int(sizes[0])


def _pro_curve_sorted(
    sorted_s: np.ndarray,
    region_sorted: np.ndarray,
    sizes: np.ndarray,
    n_regions: int,
    n_normal: int,
    ends: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FPR/PRO at each distinct score plus (0,0) and (1,1); FPR from integer counts (exact)."""
    normal_sorted = region_sorted == 0
    fp_cum = np.cumsum(normal_sorted, dtype=np.int64)
    weight = 1.0 / (n_regions * np.maximum(sizes, 1).astype(np.float64))
    weight[0] = 0.0
    pro_cum = np.cumsum(weight[region_sorted])
    if ends is None:
        ends = _run_ends(sorted_s)
    fpr = fp_cum[ends] / float(n_normal)
    pro = np.minimum(pro_cum[ends], 1.0)  # float64 rounding may overshoot 1 by ~1e-15
    return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], pro, [1.0]))


def _cut_at(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    """The curve's points with fpr <= fpr_limit, ending exactly at the limit (linear interpolation)."""
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit (fpr is sorted)
    x, y = fpr[:k], pro[:k]
    if k < fpr.size:
        x0, y0, x1, y1 = fpr[k - 1], pro[k - 1], fpr[k], pro[k]  # x0 <= limit < x1
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x = np.append(x, fpr_limit)
        y = np.append(y, y_lim)
    return x, y


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def binary_clf_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[Tensor, Tensor, Tensor]:
    """False/true positive counts (int64) at each distinct score, thresholds descending.

    Point i counts the samples with ``score >= thresholds[i]``; ties share one point.
    """
    s = _scores_np(scores)
    y = _binary_np(labels)
    _check_same_shape(s, y, "scores", "labels")
    sorted_s, order = _sort_desc(s)
    fps, tps, thr = _curve_sorted(sorted_s, y[order])
    return torch.from_numpy(fps), torch.from_numpy(tps), torch.from_numpy(np.ascontiguousarray(thr))


def auroc(scores: ArrayLike, labels: ArrayLike, *, name: str = "AUROC", unit: str = "samples") -> float:
    """Exact ROC AUC (ties count 1/2); scores used as they are, never squashed by a sigmoid.

    NaN with a warning when only one class is present. ``name``/``unit`` only word the warning.
    """
    neg, pos = _split_1d(scores, labels)
    return _auroc_sorted(_sort(neg), pos, name, unit)


def average_precision(
    scores: ArrayLike, labels: ArrayLike, *, name: str = "AP", unit: str = "samples"
) -> float:
    """Step-wise average precision sum_n (R_n - R_{n-1}) P_n; NaN with a warning if no positives."""
    neg, pos = _split_1d(scores, labels)
    return _ap_sorted(_sort(neg), _sort(pos), name, unit)


def roc_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[Tensor, Tensor]:
    """Exact ROC curve (FPR, TPR), float64, from (0,0), one point per distinct score.

    Two empty tensors (and a warning) when only one class is present.
    """
    fps, tps, _ = binary_clf_curve(scores, labels)
    n_pos = int(tps[-1]) if tps.numel() else 0
    n_neg = int(fps[-1]) if fps.numel() else 0
    if n_pos == 0 or n_neg == 0:
        _undefined("ROC curve", "only one class present")
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat((zero, fps.double() / n_neg)), torch.cat((zero, tps.double() / n_pos))


def precision_recall_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[Tensor, Tensor]:
    """(precision, recall), float64, one point per distinct score from the highest down (recall rising).

    The step-wise AP is ``sum(diff([0, *recall]) * precision)``. Two empty tensors (and a warning) when
    there is no positive.
    """
    fps, tps, _ = binary_clf_curve(scores, labels)
    n_pos = int(tps[-1]) if tps.numel() else 0
    if n_pos == 0:
        _undefined("precision-recall curve", "no positive sample")
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    return tps.double() / (tps + fps).double(), tps.double() / n_pos


def _full_pro_curve(preds: ArrayLike, target: ArrayLike) -> tuple[np.ndarray, np.ndarray] | str:
    """The whole (FPR, PRO) curve from (0,0) to (1,1), or the reason it is undefined."""
    p = _stack_3d(preds, "preds")
    t = _stack_3d(target, "target") != 0
    _check_same_shape(p, t, "preds", "target")
    s = _scores_np(p, "preds")
    region, sizes, n_regions, n_normal = _regions(t)
    reason = _pro_undefined_reason(n_regions, n_normal)
    if reason is not None:
        return reason
    sorted_s, order = _sort_desc(s)
    return _pro_curve_sorted(sorted_s, region[order], sizes, n_regions, n_normal)


def pro_curve(preds: ArrayLike, target: ArrayLike, fpr_limit: float | None = None) -> tuple[Tensor, Tensor]:
    """(FPR, PRO) curve, float64, from (0,0), one point per distinct score; to (1,1) when ``fpr_limit`` is
    None, else cut at exactly ``fpr_limit`` (interpolated): the curve whose area `aupro` integrates.

    Regions are the 8-connected components of each image's mask; FPR counts the normal pixels of
    all images. Returns two empty tensors (and warns) when the curve is undefined.
    """
    limit = None if fpr_limit is None else _check_fpr_limit(fpr_limit)
    curve = _full_pro_curve(preds, target)
    if isinstance(curve, str):
        _undefined("PRO curve", curve)
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    fpr, pro = curve if limit is None else _cut_at(*curve, limit)
    return torch.from_numpy(fpr), torch.from_numpy(pro)


def aupro(preds: ArrayLike, target: ArrayLike, fpr_limit: float = 0.3, *, name: str = "AUPRO") -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (MVTec AD definition).

    preds: float [N,H,W]; target: bool/int [N,H,W] (or [N,1,H,W]). NaN with a warning when there is
    no GT region or no normal pixel. Only the normal pixels above the FPR limit's score are sorted.
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    sp = split_pixels(preds, target)
    reason = _pro_undefined_reason(sp.n_regions, sp.n_normal)
    if reason is not None:
        return _undefined(name, reason)
    return _aupro_split(sp, fpr_limit)


def iou(preds: ArrayLike, target: ArrayLike, threshold: float = 0.5, *, name: str = "IoU") -> float:
    """Intersection over union of ``preds >= threshold`` and the target, pooled over all pixels; NaN with a
    warning when the target has no anomalous pixel."""
    p = _scores_np(preds, "preds") >= threshold
    t = _binary_np(target)
    _check_same_shape(p, t, "preds", "target")
    inter = int(np.count_nonzero(p & t))
    return _iou(inter, int(np.count_nonzero(p)), int(np.count_nonzero(t)), name)


def f1_optimal_threshold(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """(threshold, F1): the score threshold (``pred = score >= threshold``) with the highest pixel F1,
    the highest such threshold on ties. Exact: every distinct score is a candidate.

    ``(NaN, NaN)`` with a warning when there is no positive (every threshold has F1 = 0).
    """
    fps, tps, thr = binary_clf_curve(scores, labels)
    n_pos = int(tps[-1]) if tps.numel() else 0
    if n_pos == 0:
        nan = _undefined("F1-optimal threshold", "no positive sample")
        return nan, nan
    f1 = 2 * tps.double() / (tps + fps + n_pos).double()  # 2TP / (2TP + FP + FN)
    best = int(torch.argmax(f1))  # first maximum = highest threshold
    return float(thr[best]), float(f1[best])


def image_scores(anomaly_map: Tensor) -> Tensor:
    """Image anomaly score = max of the map over H, W: [N,H,W] (or [N,1,H,W]) -> [N]."""
    return anomaly_map.flatten(start_dim=1).amax(dim=1)


def precision_recall_iou(pred_mask: ArrayLike, gt_mask: ArrayLike) -> dict[str, float]:
    """Pixel IoU, precision and recall of a binary mask (e.g. a pseudo mask) against the GT mask."""
    p = _binary_np(pred_mask)
    t = _binary_np(gt_mask)
    _check_same_shape(p, t, "pred_mask", "gt_mask")
    tp = int(np.count_nonzero(p & t))
    n_pred = int(np.count_nonzero(p))
    n_gt = int(np.count_nonzero(t))
    return {
        "IoU": _iou(tp, n_pred, n_gt),
        "precision": _ratio(tp, n_pred, "precision", "no pixel predicted anomalous"),
        "recall": _ratio(tp, n_gt, "recall", "no anomalous pixel in the ground truth"),
    }


def compute_all(
    anomaly_map: ArrayLike,
    gt_mask: ArrayLike,
    gt_label: ArrayLike | None = None,
    iou_threshold: float = 0.5,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All of METRIC_NAMES in one pass: the normal pixels' scores are sorted once (a direct sort) and
    shared by pixel_AUROC, pixel_AP, pixel_AUPRO and IoU.

    anomaly_map: [N,H,W]; gt_mask: [N,H,W] or [N,1,H,W]; gt_label: [N] (default: mask.any()).
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    sp = split_pixels(anomaly_map, gt_mask)
    on_device = isinstance(sp.normal, Tensor)
    stack = _stack_3d_tensor if on_device else _stack_3d
    maps, masks = stack(anomaly_map, "anomaly_map"), stack(gt_mask, "gt_mask")
    n = int(maps.shape[0])
    if gt_label is None:
        labels = masks.reshape(n, -1) != 0
        labels = labels.any(dim=1) if on_device else labels.any(axis=1)
    else:
        labels = gt_label.reshape(-1) if on_device else _binary_np(gt_label)
        if labels.shape[0] != n:
            raise ValueError(f"gt_label has {labels.shape[0]} entries but anomaly_map has {n} images")
    img = maps.reshape(n, -1)
    img = _float_scores(img.amax(dim=1) if on_device else img.max(axis=1), "anomaly_map")
    return image_and_pixel_metrics(img, labels, sp, iou_threshold, fpr_limit)


def image_and_pixel_metrics(
    image_score: Array, image_label: Array, sp: PixelSplit, iou_threshold: float, fpr_limit: float
) -> dict[str, float]:
    """METRIC_NAMES from image scores/labels [N] and a pixel split (what `AnomalyMetrics` keeps)."""
    neg_i, pos_i = _split_1d(image_score, image_label)
    out = {"image_AUROC": _auroc_sorted(_sort(neg_i), pos_i, "image_AUROC", "images")}
    out.update(_split_metrics(sp, _check_fpr_limit(fpr_limit), iou_threshold))
    return {k: out[k] for k in METRIC_NAMES}
