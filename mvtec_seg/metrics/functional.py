"""Exact anomaly-detection and segmentation metrics (the MVTec AD definitions).

Why hand-written: torchmetrics' binary AUROC/AP apply a sigmoid to scores outside ``[0, 1]`` and
PRO implementations disagree on how the FPR limit is handled. Here every metric uses the scores as
they are, handles ties exactly (one curve point per distinct score), and is checked against
brute-force references in ``tests/test_metrics.py``.

Why fast at dataset scale (#11): no metric argsorts all pixels. The pixels are split by the ground truth
into normal scores and anomalous scores (with their region's size); the normal scores are sorted directly
(a plain float sort, many times faster than an argsort), the few anomalous ones are argsorted, and every
count the curves need comes from ``searchsorted`` of anomalous scores into the sorted normal ones. AUPRO
alone needs only the normal pixels above the score at which the FPR reaches its limit: that score is found
by selection (``np.partition`` / ``torch.kthvalue``) and only the pixels above it are sorted. Scores stay in
their float dtype (float32 for float32 maps); counts are integers and the PRO weights float64, so the
values are exact up to float64 rounding of the final sums.

Inputs are torch tensors or numpy arrays. CPU tensors are computed with numpy (its sort is much faster
than torch's on CPU); tensors on another device (CUDA) stay there and the same algorithm runs with torch
ops, only the connected components are labelled on CPU (scipy). Results are plain Python floats.
Undefined metrics return NaN and emit an :class:`UndefinedMetricWarning` that says why.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import torch
from torch import Tensor

__all__ = [
    "METRIC_LABELS",
    "METRIC_NAMES",
    "PixelSplit",
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
    if s.size and np.isnan(s.min()):  # min propagates NaN: one pass, no temporary
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


def _check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return fpr_limit


def _ratio(num: int, den: int, name: str, why: str) -> float:
    return _undefined(name, why) if den == 0 else num / den


# ---------------------------------------------------------------------------------------------
# split core (#11): normal scores sorted directly, anomalous scores few; no argsort of all pixels
# ---------------------------------------------------------------------------------------------

Array = np.ndarray | Tensor
_LABEL_CHUNK = 64  # images labelled per scipy call: bounds the int32 label buffer, not the result


def _on_device(x: ArrayLike) -> bool:
    """Whether to compute with torch ops where ``x`` lives: CUDA tensors. CPU uses numpy (its sort is much
    faster than torch's there); other devices (MPS: no float64) are copied to CPU.

    Tests patch this to run the torch path on CPU tensors.
    """
    return isinstance(x, Tensor) and x.device.type == "cuda"


def _sort(x: Array) -> Array:
    """Ascending copy: a direct sort of the values (no index array)."""
    return np.sort(x) if isinstance(x, np.ndarray) else torch.sort(x).values


def _argsort_pair(x: Array, w: Array) -> tuple[Array, Array]:
    """``x`` ascending and ``w`` in the same order (used on the anomalous pixels only: few)."""
    if isinstance(x, np.ndarray):
        order = np.argsort(x, kind="stable")
        return x[order], w[order]
    values, order = torch.sort(x, stable=True)
    return values, w[order]


def _searchsorted(sorted_a: Array, v: Array, right: bool) -> Array:
    if isinstance(sorted_a, np.ndarray):
        return np.searchsorted(sorted_a, v, side="right" if right else "left")
    return torch.searchsorted(sorted_a, v, right=right)


def _kth_smallest(x: Array, k: int) -> float | Tensor:
    """The value of rank ``k`` (0-based, ascending) by selection; may reorder ``x`` (numpy: in place)."""
    if isinstance(x, np.ndarray):
        x.partition(k)
        return x[k]
    return torch.kthvalue(x, k + 1).values


def _count(mask: Array) -> int:
    return int(mask.sum())


def _fsum(x: Array) -> float:
    return float(x.sum())


def _f64(x: Array) -> Array:
    return x.astype(np.float64) if isinstance(x, np.ndarray) else x.double()


def _count_ge(sorted_a: Array, value: float) -> int:
    """#elements >= value, compared in the array's dtype (as ``array >= value`` does)."""
    if isinstance(sorted_a, np.ndarray):
        key = np.asarray([value], dtype=sorted_a.dtype)
    else:
        key = torch.tensor([value], dtype=sorted_a.dtype, device=sorted_a.device)
    return int(sorted_a.shape[0]) - int(_searchsorted(sorted_a, key, right=False)[0])


def _run_starts(sorted_x: Array) -> Array:
    """First index of each run of equal values in an ascending array."""
    if isinstance(sorted_x, np.ndarray):
        return np.flatnonzero(np.concatenate(([True], sorted_x[1:] != sorted_x[:-1])))
    first = torch.ones(1, dtype=torch.bool, device=sorted_x.device)
    return torch.nonzero(torch.cat((first, sorted_x[1:] != sorted_x[:-1]))).reshape(-1)


def _float_scores(x: Array, name: str) -> Array:
    """Scores as a float array of their own precision (float16/bfloat16 widened exactly, ints to float64)."""
    if isinstance(x, Tensor):
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        elif not x.is_floating_point():
            x = x.double()
        if bool(torch.isnan(x).any()):
            raise ValueError(f"{name} contain NaN; anomaly scores must be real numbers (inf is allowed)")
        return x
    s = _scores_np(x, name)
    return s.astype(np.float32) if s.dtype == np.float16 else s


@dataclass
class PixelSplit:
    """Pixels split by the ground truth: what every pixel metric needs, and nothing more.

    ``normal``: scores of the normal pixels (1-D); ``anomalous``: scores of the anomalous pixels (1-D);
    ``inv_size``: float64 ``1 / size`` of each anomalous pixel's region (8-connected within its image);
    ``n_regions``: the number of regions. numpy arrays, or torch tensors on one device.
    """

    normal: Array
    anomalous: Array
    inv_size: Array
    n_regions: int

    @property
    def n_normal(self) -> int:
        return int(self.normal.shape[0])

    @property
    def n_anomalous(self) -> int:
        return int(self.anomalous.shape[0])


def region_sizes(mask3d: ArrayLike) -> tuple[np.ndarray, int]:
    """Size (int32) of the region of each anomalous pixel of a bool [N,H,W] stack, in row-major order
    (the order of ``x[mask]``), and the number of regions. Labelled on CPU, once per mask: only the images
    that have an anomalous pixel, `_LABEL_CHUNK` of them a scipy call (bounds the int32 label buffer)."""
    m = _to_numpy(mask3d)
    m = m if m.dtype == bool else m != 0
    has = np.flatnonzero(m.reshape(m.shape[0], -1).any(axis=1))
    out, n_regions = [np.zeros(0, np.int32)], 0
    for start in range(0, has.size, _LABEL_CHUNK):
        chunk = m[has[start : start + _LABEL_CHUNK]]
        labels, n = scipy.ndimage.label(chunk, structure=_SLICE_8_CONNECTED)
        region = labels[chunk]  # region id of each anomalous pixel, row-major
        out.append(np.bincount(region, minlength=n + 1).astype(np.int32)[region])
        n_regions += int(n)
    return np.concatenate(out), n_regions


def _stack_3d_tensor(x: Tensor, name: str) -> Tensor:
    """`_stack_3d` for a tensor that stays on its device."""
    x = x.detach()
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    elif x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape [N,H,W] or [N,1,H,W], got {tuple(x.shape)}")
    return x


def split_pixels(preds: ArrayLike, target: ArrayLike) -> PixelSplit:
    """Split [N,H,W] (or [N,1,H,W]) scores by their masks; torch tensors off the CPU stay on their device."""
    if _on_device(preds):
        if not isinstance(target, Tensor):
            raise ValueError(f"target must be a tensor when preds is on {preds.device}")
        p, t = _stack_3d_tensor(preds, "preds"), _stack_3d_tensor(target.to(preds.device), "target") != 0
        _check_same_shape(p, t, "preds", "target")
        s = _float_scores(p, "preds")
        sizes, n_regions = region_sizes(t.cpu())
        inv = 1.0 / torch.from_numpy(sizes).to(device=s.device, dtype=torch.float64)
        return PixelSplit(s[~t], s[t], inv, n_regions)
    p = _stack_3d(preds, "preds")
    t = _stack_3d(target, "target")
    t = t if t.dtype == bool else t != 0
    _check_same_shape(p, t, "preds", "target")
    s = _float_scores(p, "preds").reshape(p.shape)
    sizes, n_regions = region_sizes(t)
    return PixelSplit(s[~t], s[t], 1.0 / sizes.astype(np.float64), n_regions)


def _first_count_above(limit: float, n: int) -> int:
    """Smallest normal-pixel count c with c / n > limit (the curve's own float test); n + 1 if none."""
    c = int(limit * n) + 1
    while c > 1 and (c - 1) / n > limit:
        c -= 1
    while c <= n and c / n <= limit:
        c += 1
    return c


def _aupro_split(sp: PixelSplit, fpr_limit: float, normal_sorted: bool = False) -> float:
    """AUPRO to ``fpr_limit`` from a split; may reorder ``sp.normal`` unless ``normal_sorted`` (then the
    anomalous scores must be sorted too, with their ``inv_size``).

    The trapezoid area of the PRO curve equals (1/n) * sum over normal pixels s of (PRO(>s) + PRO(>=s)) / 2
    (ties give the diagonal segment), i.e. sum over anomalous pixels a of w_a * (#normal < a + #normal <= a)
    / 2n, counted among the normal pixels above v, the score of the curve point where the FPR first exceeds
    the limit; the segment through v is cut at the limit by linear interpolation, as `_cut_at` does.
    """
    n = sp.n_normal
    neg = sp.normal
    c = _first_count_above(fpr_limit, n)
    v = None
    if c > n:  # fpr_limit == 1: every normal pixel counts
        hi = neg if normal_sorted else _sort(neg)
    elif normal_sorted:
        v = neg[n - c]
        hi = neg[int(_searchsorted(neg, neg[n - c : n - c + 1], right=True)[0]) :]
    else:
        k = n - c
        v = _kth_smallest(neg, k)
        if isinstance(neg, np.ndarray):  # partitioned: everything above index k is >= v, below is <= v
            upper = neg[k + 1 :]
            hi = np.sort(upper[upper > v])  # only the pixels that can matter are sorted
            c_ge = n - k + int(np.count_nonzero(neg[:k] == v))
        else:
            hi = _sort(neg[neg > v])
            c_ge = _count(neg >= v)
    anom, w = sp.anomalous, sp.inv_size
    if not normal_sorted:  # sorted queries make searchsorted cache-friendly
        anom, w = _argsort_pair(anom, w)
    ranks = _searchsorted(hi, anom, right=False) + _searchsorted(hi, anom, right=True)
    area = _fsum(w * ranks) / (2.0 * n)
    if v is not None:
        c_gt = int(hi.shape[0])
        if normal_sorted:
            c_ge = n - int(_searchsorted(neg, neg[n - c : n - c + 1], right=False)[0])
        p_gt, p_ge = _fsum(w[anom > v]), _fsum(w[anom >= v])
        f0, f1 = c_gt / n, c_ge / n
        y_lim = p_gt + (p_ge - p_gt) * (fpr_limit - f0) / (f1 - f0)
        area += (fpr_limit - f0) * (p_gt + y_lim) / 2.0
    return area / sp.n_regions / fpr_limit


def _auroc_sorted(neg: Array, pos: Array, name: str, unit: str) -> float:
    """Mann-Whitney AUROC from sorted negative scores (ties 1/2), exact integer sum."""
    n_pos, n_neg = int(pos.shape[0]), int(neg.shape[0])
    if n_pos == 0 or n_neg == 0:
        missing = "anomalous" if n_pos == 0 else "normal"
        return _undefined(name, f"no {missing} {unit} ({n_pos + n_neg} scored, only one class present)")
    twice = int((_searchsorted(neg, pos, right=False) + _searchsorted(neg, pos, right=True)).sum())
    return twice / (2.0 * n_pos * n_neg)


def _ap_sorted(neg: Array, pos_sorted: Array, name: str, unit: str) -> float:
    """Step-wise AP from sorted negative and sorted positive scores: at each distinct positive score u,
    dTP = #pos == u, TP = #pos >= u, FP = #neg >= u (thresholds with negatives only add nothing)."""
    n_pos, n_neg = int(pos_sorted.shape[0]), int(neg.shape[0])
    if n_pos == 0:
        return _undefined(name, f"no anomalous {unit} ({n_neg} scored)")
    starts = _run_starts(pos_sorted)
    u = pos_sorted[starts]
    if isinstance(starts, np.ndarray):
        d_tp = np.diff(np.append(starts, n_pos))
    else:
        d_tp = torch.diff(starts, append=starts.new_full((1,), n_pos))
    tp = n_pos - starts
    fp = n_neg - _searchsorted(neg, u, right=False)
    return _fsum(d_tp * (_f64(tp) / _f64(tp + fp))) / n_pos


def _split_1d(scores: ArrayLike, labels: ArrayLike) -> tuple[Array, Array]:
    """(negative scores, positive scores) of flat scores/labels, on the computing backend."""
    if _on_device(scores):
        s = _float_scores(scores.reshape(-1), "scores")
        y = labels.detach().to(s.device).reshape(-1) != 0 if isinstance(labels, Tensor) else None
        if y is None or y.shape != s.shape:
            raise ValueError("labels must be a tensor of the scores' shape")
        return s[~y], s[y]
    s = _scores_np(scores)
    y = _binary_np(labels)
    _check_same_shape(s, y, "scores", "labels")
    s = s.astype(np.float32) if s.dtype == np.float16 else s
    return s[~y], s[y]


def _split_metrics(sp: PixelSplit, fpr_limit: float, iou_threshold: float | None = None) -> dict[str, float]:
    """pixel_AUROC, pixel_AP, pixel_AUPRO (and IoU) from one split: one direct sort of the normal scores."""
    neg = sp.normal
    if isinstance(neg, np.ndarray):
        neg.sort()  # the split owns its arrays
    else:
        neg = sp.normal = torch.sort(neg).values
    pos, w = _argsort_pair(sp.anomalous, sp.inv_size)
    sp = PixelSplit(neg, pos, w, sp.n_regions)
    out = {
        "pixel_AUROC": _auroc_sorted(neg, pos, "pixel_AUROC", "pixels"),
        "pixel_AP": _ap_sorted(neg, pos, "pixel_AP", "pixels"),
    }
    reason = _pro_undefined_reason(sp.n_regions, sp.n_normal)
    out["pixel_AUPRO"] = (
        _undefined("pixel_AUPRO", reason) if reason else _aupro_split(sp, fpr_limit, normal_sorted=True)
    )
    if iou_threshold is not None:
        fp, tp = _count_ge(neg, iou_threshold), _count_ge(pos, iou_threshold)
        union = sp.n_anomalous + fp
        out["IoU"] = _ratio(tp, union, "IoU", "empty prediction and empty ground truth (union is 0)")
    return out


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
