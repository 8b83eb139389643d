"""MVTec AD 2's own metrics (Heckler-Kram et al., 2025, "The MVTec AD 2 Dataset: Advanced Scenarios for
Unsupervised Anomaly Detection", arXiv:2503.21622), beside the five of `functional`.

Why these: the benchmark scores a binary segmentation whose threshold was chosen without any anomalous
image, and localisation at a false positive rate an inspection line can live with.

- `normal_threshold`: the segmentation threshold from normal images only, mean + 3 standard deviations of
  the anomaly scores of all their pixels (the baseline rule the dataset's upload checker names:
  ``np.mean(anomaly_scores_val) + 3 * np.std(anomaly_scores_val)``, on the validation normals).
- `seg_f1`: the pixel F1 of ``map >= threshold`` against the GT, pooled over every pixel of the test images,
  2 TP / (2 TP + FP + FN).
- AUPRO up to FPR 0.05 (`AUPRO_FPR_LIMIT`), the paper's localisation metric: `functional.aupro` with that limit.
"""

from __future__ import annotations

import numpy as np

from mvtec_seg.metrics.functional import aupro
from mvtec_seg.metrics.inputs import ArrayLike, _binary_np, _check_same_shape, _scores_np, _undefined

__all__ = [
    "AUPRO_FPR_LIMIT",
    "NORMAL_THRESHOLD_SIGMAS",
    "mvtec_ad2_metrics",
    "normal_threshold",
    "seg_f1",
]

NORMAL_THRESHOLD_SIGMAS = 3.0
AUPRO_FPR_LIMIT = 0.05


def normal_threshold(normal_maps: ArrayLike, sigmas: float = NORMAL_THRESHOLD_SIGMAS) -> float:
    """Mean + ``sigmas`` x (population) standard deviation of every pixel score of normal images, in
    float64; NaN with a warning when there is no pixel."""
    s = _scores_np(normal_maps, "normal_maps").astype(np.float64, copy=False)
    if s.size == 0:
        return _undefined("normal threshold", "no normal image to choose it on")
    return float(s.mean() + sigmas * s.std())


def seg_f1(preds: ArrayLike, target: ArrayLike, threshold: float) -> float:
    """Pixel F1 of ``preds >= threshold`` against ``target``, pooled over all pixels; NaN with a warning when
    there is neither a GT nor a predicted anomalous pixel (F1 is 0/0)."""
    p = _scores_np(preds, "preds")
    t = _binary_np(target)
    _check_same_shape(p, t, "preds", "target")
    if not np.isfinite(threshold):
        return _undefined("SegF1", f"the threshold is {threshold}")
    pred = p >= threshold
    tp = int(np.count_nonzero(pred & t))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(t)) - tp
    return seg_f1_counts(tp, fp, fn)


def seg_f1_counts(tp: int, fp: int, fn: int) -> float:
    """SegF1 from pixel counts pooled over the images (summed image by image when streaming)."""
    if 2 * tp + fp + fn == 0:
        return _undefined("SegF1", "no anomalous pixel in the ground truth and none predicted")
    return 2 * tp / (2 * tp + fp + fn)


def mvtec_ad2_metrics(
    test_maps: ArrayLike, test_masks: ArrayLike, normal_maps: ArrayLike
) -> tuple[dict[str, float], float]:
    """(``{SegF1, pixel_AUPRO_0.05}``, the threshold) for test maps [N,H,W] and GT, with the threshold chosen
    on ``normal_maps`` (anomaly maps of normal images the model did not train on) alone."""
    threshold = normal_threshold(normal_maps)
    return {
        "SegF1": seg_f1(test_maps, test_masks, threshold),
        "pixel_AUPRO_0.05": aupro(test_maps, test_masks, fpr_limit=AUPRO_FPR_LIMIT, name="AUPRO_0.05"),
    }, threshold
