"""The split core of the pixel metrics: no metric argsorts all pixels.

The pixels are split by the ground truth into normal scores and anomalous scores (with their region's
size); the normal scores are sorted directly (a plain float sort, many times faster than an argsort), the
few anomalous ones are argsorted, and every count the curves need comes from ``searchsorted`` of anomalous
scores into the sorted normal ones. AUPRO alone needs only the normal pixels above the score at which the
FPR reaches its limit: that score is found by selection (``np.partition`` / ``torch.kthvalue``) and only the
pixels above it are sorted. Scores stay in their float dtype (float32 for float32 maps); counts are integers
and the PRO weights float64, so the values are exact up to float64 rounding of the final sums.

CPU inputs are computed with numpy (its sort is much faster than torch's on CPU); tensors on another device
(CUDA) stay there and the same algorithm runs with torch ops, only the connected components are labelled on
CPU (scipy). `_on_device` decides; tests patch it to run the torch path on CPU tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import torch
from torch import Tensor

from mvtec_seg.metrics.inputs import (
    _SLICE_8_CONNECTED,
    Array,
    ArrayLike,
    _as_3d,
    _binary_np,
    _check_same_shape,
    _iou,
    _pro_undefined_reason,
    _scores_np,
    _stack_3d,
    _to_numpy,
    _undefined,
)

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
    return _as_3d(x.detach(), name)


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
        out["IoU"] = _iou(tp, tp + fp, sp.n_anomalous)
    return out
