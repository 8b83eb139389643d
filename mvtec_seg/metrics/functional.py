"""Exact anomaly-detection and segmentation metrics (the MVTec AD definitions).

Why hand-written: torchmetrics' binary AUROC/AP apply a sigmoid to scores outside ``[0, 1]`` and
PRO implementations disagree on how the FPR limit is handled. Here every metric uses the scores as
they are, handles ties exactly (one curve point per distinct score), and is checked against
brute-force references in ``tests/test_metrics.py``.

Inputs are torch tensors (numpy arrays are accepted too); the work is done on CPU with numpy,
vectorised, and results are plain Python floats. Undefined metrics return NaN and emit an
:class:`UndefinedMetricWarning` that says why.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.ndimage
import torch
from torch import Tensor

__all__ = [
    "METRIC_LABELS",
    "METRIC_NAMES",
    "UndefinedMetricWarning",
    "aupro",
    "auroc",
    "average_precision",
    "binary_clf_curve",
    "compute_all",
    "f1_optimal_threshold",
    "image_scores",
    "iou",
    "precision_recall_iou",
    "precision_recall_curve",
    "pro_curve",
    "roc_curve",
]

METRIC_NAMES: tuple[str, ...] = ("image_AUROC", "pixel_AUROC", "pixel_AP", "pixel_AUPRO", "IoU")
METRIC_LABELS: dict[str, str] = {
    "pixel_AUPRO": "pixel AUPRO",
    "pixel_AP": "pixel AP",
    "IoU": "IoU",
    "pixel_AUROC": "pixel AUROC",
    "image_AUROC": "image AUROC",
}
"""How tables and plots name each metric, in the order they show them: localisation first."""

ArrayLike = Tensor | np.ndarray

# 8-connectivity inside each [H, W] slice of an [N, H, W] stack, no connection across images:
# one scipy.ndimage.label call labels the regions of all images at once.
_SLICE_8_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_SLICE_8_CONNECTED[1] = True


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the given data (e.g. one class only); NaN was returned."""


def _undefined(name: str, why: str) -> float:
    """Warn (so a NaN in a report is never silent) and return NaN."""
    warnings.warn(f"{name} undefined: {why}; returning NaN", UndefinedMetricWarning, stacklevel=3)
    return float("nan")


# ---------------------------------------------------------------------------------------------
# input normalisation
# ---------------------------------------------------------------------------------------------


def _to_numpy(x: ArrayLike) -> np.ndarray:
    """CPU numpy view of a tensor/array; low-precision floats widened to float32 (exact)."""
    if isinstance(x, Tensor):
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x.cpu().numpy()
    a = np.asarray(x)
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    return a


def _scores_np(scores: ArrayLike, name: str = "scores") -> np.ndarray:
    """Flat float scores; NaN is rejected because it has no place in a ranking."""
    s = _to_numpy(scores).reshape(-1)
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if np.isnan(s).any():
        raise ValueError(f"{name} contain NaN; anomaly scores must be real numbers (inf is allowed)")
    return s


def _binary_np(labels: ArrayLike) -> np.ndarray:
    """Flat bool labels: anything non-zero is positive (bool, {0,1}, {0,255} all work)."""
    return _to_numpy(labels).reshape(-1) != 0


def _stack_3d(x: ArrayLike, name: str) -> np.ndarray:
    """Bring [H,W], [N,H,W] or [N,1,H,W] to [N,H,W] so all images are labelled in one call."""
    a = _to_numpy(x)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    elif a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{name} must have shape [N,H,W] or [N,1,H,W], got {tuple(a.shape)}")
    return a


def _check_same_shape(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{na} shape {tuple(a.shape)} does not match {nb} shape {tuple(b.shape)}")


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


def _auroc_curve(fps: np.ndarray, tps: np.ndarray, name: str, unit: str) -> float:
    """Trapezoid ROC area in exact integer arithmetic: sum dFP*(TP_i+TP_{i-1}) / (2 P N)."""
    n_pos = int(tps[-1]) if tps.size else 0
    n_neg = int(fps[-1]) if fps.size else 0
    if n_pos == 0 or n_neg == 0:
        missing = "anomalous" if n_pos == 0 else "normal"
        return _undefined(name, f"no {missing} {unit} ({n_pos + n_neg} scored, only one class present)")
    fps0 = np.concatenate(([0], fps))
    tps0 = np.concatenate(([0], tps))
    # Integer sum stays below 2*P*N (< 2**53 for any realistic dataset), so it is exact.
    twice_area = int(np.sum(np.diff(fps0) * (tps0[1:] + tps0[:-1]), dtype=np.int64))
    return twice_area / (2.0 * n_pos * n_neg)


def _ap_curve(fps: np.ndarray, tps: np.ndarray, name: str, unit: str) -> float:
    """Step-wise AP: sum_n (R_n - R_{n-1}) P_n, R_0 = 0 (sklearn/torchmetrics definition)."""
    n_pos = int(tps[-1]) if tps.size else 0
    if n_pos == 0:
        return _undefined(name, f"no anomalous {unit} ({int(fps[-1]) if fps.size else 0} scored)")
    precision = tps / (tps + fps).astype(np.float64)
    d_tp = np.diff(np.concatenate(([0], tps)))
    return float(np.sum(d_tp * precision) / n_pos)


def _regions(mask3d: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Flat region id per pixel (0 = normal), region sizes (index 0 unused), #regions, #normal pixels."""
    labels, n_regions = scipy.ndimage.label(mask3d, structure=_SLICE_8_CONNECTED)
    labels = labels.reshape(-1)
    sizes = np.bincount(labels, minlength=n_regions + 1)
    return labels, sizes, int(n_regions), int(sizes[0])


def _pro_undefined_reason(n_regions: int, n_normal: int) -> str | None:
    if n_regions == 0:
        return "no anomalous region in the ground truth masks"
    if n_normal == 0:
        return "no normal pixel, so the false positive rate has no denominator"
    return None


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


def _area_to_limit(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoid area of the curve cut at exactly fpr_limit (interpolated), divided by fpr_limit."""
    x, y = _cut_at(fpr, pro, fpr_limit)
    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)
    return area / fpr_limit


def _check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return fpr_limit


def _ratio(num: int, den: int, name: str, why: str) -> float:
    return _undefined(name, why) if den == 0 else num / den


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
    fps, tps, _ = binary_clf_curve(scores, labels)
    return _auroc_curve(fps.numpy(), tps.numpy(), name, unit)


def average_precision(
    scores: ArrayLike, labels: ArrayLike, *, name: str = "AP", unit: str = "samples"
) -> float:
    """Step-wise average precision sum_n (R_n - R_{n-1}) P_n; NaN with a warning if no positives."""
    fps, tps, _ = binary_clf_curve(scores, labels)
    return _ap_curve(fps.numpy(), tps.numpy(), name, unit)


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
    no GT region or no normal pixel.
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    curve = _full_pro_curve(preds, target)
    if isinstance(curve, str):
        return _undefined(name, curve)
    return _area_to_limit(*curve, fpr_limit)


def iou(preds: ArrayLike, target: ArrayLike, threshold: float = 0.5, *, name: str = "IoU") -> float:
    """Intersection over union of ``preds >= threshold`` and the target, pooled over all pixels."""
    p = _scores_np(preds, "preds") >= threshold
    t = _binary_np(target)
    _check_same_shape(p, t, "preds", "target")
    inter = int(np.count_nonzero(p & t))
    union = int(np.count_nonzero(p | t))
    return _ratio(inter, union, name, "empty prediction and empty ground truth (union is 0)")


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
    union = n_pred + n_gt - tp
    return {
        "IoU": _ratio(tp, union, "IoU", "empty prediction and empty ground truth (union is 0)"),
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
    """All of METRIC_NAMES in one pass: the pixel scores are sorted once and shared by
    pixel_AUROC, pixel_AP and pixel_AUPRO.

    anomaly_map: [N,H,W]; gt_mask: [N,H,W] or [N,1,H,W]; gt_label: [N] (default: mask.any()).
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    amap = _stack_3d(anomaly_map, "anomaly_map")
    mask = _stack_3d(gt_mask, "gt_mask") != 0
    _check_same_shape(amap, mask, "anomaly_map", "gt_mask")
    s = _scores_np(amap, "anomaly_map")
    n = amap.shape[0]
    if gt_label is None:
        labels = mask.any(axis=(1, 2))
    else:
        labels = _binary_np(gt_label)
        if labels.size != n:
            raise ValueError(f"gt_label has {labels.size} entries but anomaly_map has {n} images")

    out: dict[str, float] = {}
    img = s.reshape(amap.shape).max(axis=(1, 2))  # image score = max of the map
    sorted_i, order_i = _sort_desc(img)
    fps_i, tps_i, _ = _curve_sorted(sorted_i, labels[order_i])
    out["image_AUROC"] = _auroc_curve(fps_i, tps_i, "image_AUROC", "images")

    region, sizes, n_regions, n_normal = _regions(mask)
    sorted_s, order = _sort_desc(s)
    region_sorted = region[order]
    ends = _run_ends(sorted_s)
    fps, tps, _ = _curve_sorted(sorted_s, region_sorted != 0, ends)
    out["pixel_AUROC"] = _auroc_curve(fps, tps, "pixel_AUROC", "pixels")
    out["pixel_AP"] = _ap_curve(fps, tps, "pixel_AP", "pixels")
    reason = _pro_undefined_reason(n_regions, n_normal)
    if reason is not None:
        out["pixel_AUPRO"] = _undefined("pixel_AUPRO", reason)
    else:
        fpr, pro = _pro_curve_sorted(sorted_s, region_sorted, sizes, n_regions, n_normal, ends)
        out["pixel_AUPRO"] = _area_to_limit(fpr, pro, fpr_limit)
    out["IoU"] = iou(s, mask, iou_threshold)
    return {k: out[k] for k in METRIC_NAMES}
