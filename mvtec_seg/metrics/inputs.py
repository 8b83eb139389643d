"""What every metric module shares: input normalisation, shape checks and the NaN-with-a-reason rule.

Undefined metrics return NaN and emit an :class:`UndefinedMetricWarning` that says why, so a NaN in a
report is never silent.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray
Array = np.ndarray | Tensor

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


def _as_3d(a: Array, name: str) -> Array:
    """Bring [H,W], [N,H,W] or [N,1,H,W] to [N,H,W] (numpy or torch alike) so all images are labelled in
    one call."""
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    elif a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{name} must have shape [N,H,W] or [N,1,H,W], got {tuple(a.shape)}")
    return a


def _stack_3d(x: ArrayLike, name: str) -> np.ndarray:
    """`_as_3d` of a CPU numpy copy/view."""
    return _as_3d(_to_numpy(x), name)


def _check_same_shape(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{na} shape {tuple(a.shape)} does not match {nb} shape {tuple(b.shape)}")


def _pro_undefined_reason(n_regions: int, n_normal: int) -> str | None:
    if n_regions == 0:
        return "no anomalous region in the ground truth masks"
    if n_normal == 0:
        return "no normal pixel, so the false positive rate has no denominator"
    return None


IOU_UNDEFINED = "no anomalous pixel in the ground truth (it could only be 0, or 0/0)"


def _iou(tp: int, n_pred: int, n_gt: int, name: str = "IoU") -> float:
    """TP / (pred + GT - TP); undefined (NaN with a warning) without a GT defect pixel, like the other
    pixel metrics: a score of 0 there would say 'missed the defect' where there was none."""
    return _undefined(name, IOU_UNDEFINED) if n_gt == 0 else tp / (n_pred + n_gt - tp)


def _check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return fpr_limit


def _ratio(num: int, den: int, name: str, why: str) -> float:
    return _undefined(name, why) if den == 0 else num / den
