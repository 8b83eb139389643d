"""`evaluation.resolution=native`: every test metric at each image's own size, against its original mask.

A model sees images resized to `data.image_size`, and by default (`model`) its maps are scored against masks
resized to that size too: a 10x10 px defect of a 2232x1024 MVTec AD 2 image keeps about 2 pixels at 256 px,
and smaller ones vanish from the ground truth, and from PRO and F1 with it. Benchmarks (MVTec AD 2's server,
MVTec AD's own evaluation code) score at the images' resolution: here each test map (`test_predictions.npz`,
the maps the `model` metrics saw) is upsampled bilinearly to its image's size (`data.mvtec.resize_map`, as
`predict` writes it) and scored against the mask read from disk at its own size (the layout's mask rule).

Streamed, image by image, with memory bounded by a chunk size, not by the test set: the pixels split by
the ground truth are spilled to a temporary folder in the run folder (4 bytes per normal and 8 per anomalous
native pixel on disk, deleted at the end) and the metrics computed out of core, exactly
(`metrics.out_of_core`); no map or mask at native size is held beyond the one in hand, and one score per
image. Measured on fabricated 2232x1024 maps (`tools/native_memory.py`, `docs/metrics.md`): 124 MiB above
the process for 40 images (91 M pixels) and 128 MiB for 80, where keeping the pixels in memory took 1.5 and
2.6 GiB, in about the same time. `IoU_at_threshold` is counted image by image at the run's decision
threshold, as `SegF1` is.

MVTec AD 2's extra metrics follow: `pixel_AUPRO_0.05` from the same spilled pixels (in the same pass),
`SegF1` from pixel counts summed per image, at the threshold the run recorded in `mvtec_ad2.json` (chosen
on normal images; the one `predict format=mvtec_ad2` thresholds the server's masks with).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mvtec_seg.data.layouts import decode_mask_native, mask_rule
from mvtec_seg.data.mvtec import image_hw, resize_map
from mvtec_seg.metrics.mvtec_ad2 import AUPRO_FPR_LIMIT, seg_f1_counts
from mvtec_seg.metrics.out_of_core import CHUNK_PIXELS, OutOfCoreMetrics
from mvtec_seg.summary import IOU_AT_THRESHOLD, PREDICTIONS_FILE, RESOLUTIONS

__all__ = ["RESOLUTIONS", "native_test_metrics"]


def native_test_metrics(
    dm,
    run_dir: Path | str,
    iou_threshold: float,
    fpr_limit: float,
    seg_threshold: float | None = None,
    decision_threshold: float | None = None,
    chunk: int = CHUNK_PIXELS,
) -> dict[str, float]:
    """`{test/<name>: value}` at each test image's own size, from the run's saved test maps (see the module
    doc); with `data.layout=mvtec_ad2` also `test/pixel_AUPRO_0.05` and, given `seg_threshold`, `test/SegF1`.
    ``chunk``: scores per sorted run of the out-of-core metrics (memory about 13 bytes each)."""
    rows = dm.manifest["samples"]
    root = Path(dm.category_dir)
    rule = mask_rule(getattr(dm, "layout", "mvtec"))
    ad2 = getattr(dm, "layout", "mvtec") == "mvtec_ad2"
    tp = fp = fn = 0
    hits = {"both": 0, "pred": 0, "gt": 0}  # at the decision threshold
    with (
        OutOfCoreMetrics(iou_threshold, fpr_limit, folder=run_dir, chunk=chunk) as metric,
        np.load(Path(run_dir) / PREDICTIONS_FILE) as pred,
    ):
        index, maps, labels = pred["index"], pred["anomaly_map"], pred["gt_label"]
        for i, amap, label in zip(index.tolist(), maps, labels.tolist(), strict=True):
            row = rows[i]
            if row.get("gt_mask"):
                mask = decode_mask_native(root / row["gt_mask"], rule)
            else:
                mask = np.zeros(image_hw(root / row["image"]), dtype=np.uint8)
            full = resize_map(np.asarray(amap, dtype=np.float32), mask.shape)
            metric.update(full, mask, label)
            if decision_threshold is not None and math.isfinite(decision_threshold):
                pred, gt = full >= decision_threshold, mask.astype(bool)
                hits["both"] += int(np.count_nonzero(pred & gt))
                hits["pred"] += int(np.count_nonzero(pred))
                hits["gt"] += int(np.count_nonzero(gt))
            if seg_threshold is not None and math.isfinite(seg_threshold):
                hit, gt = full >= seg_threshold, mask.astype(bool)
                both = int(np.count_nonzero(hit & gt))
                tp, fp, fn = (
                    tp + both,
                    fp + int(np.count_nonzero(hit)) - both,
                    fn + int(np.count_nonzero(gt)) - both,
                )
        extra = {"pixel_AUPRO_0.05": AUPRO_FPR_LIMIT} if ad2 else {}
        values = {f"test/{k}": v for k, v in metric.compute(extra).items()}
    if decision_threshold is not None:
        union = hits["pred"] + hits["gt"] - hits["both"]
        ok = math.isfinite(decision_threshold) and hits["gt"] > 0
        values[f"test/{IOU_AT_THRESHOLD}"] = hits["both"] / union if ok else math.nan
    if ad2 and seg_threshold is not None:
        values["test/SegF1"] = seg_f1_counts(tp, fp, fn) if math.isfinite(seg_threshold) else math.nan
    return values
