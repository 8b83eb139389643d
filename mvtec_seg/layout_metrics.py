"""The extra test metrics a data layout's benchmark defines, recorded beside the five standard ones.

MVTec AD 2 (`data.layout=mvtec_ad2`): `test/SegF1` (pixel F1 of the test part at a threshold chosen on the
val part's normal images alone: mean + 3 std of their pixel scores) and `test/pixel_AUPRO_0.05` (AUPRO to
FPR 0.05), definitions in `metrics.mvtec_ad2`. Under `data.protocol=official` the val part is exactly
`validation/good`; under `split` it is the val part's normal images. Neither the teacher nor a segmenter
trains on them. The threshold and its rule go into `<run_dir>/mvtec_ad2.json`, where `predict
format=mvtec_ad2` takes it for the server's thresholded masks.

The test maps are read back from `test_predictions.npz`, the exact maps the standard metrics saw.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mvtec_seg.io_utils import atomic_write_json
from mvtec_seg.metrics import mvtec_ad2_metrics
from mvtec_seg.metrics.mvtec_ad2 import AUPRO_FPR_LIMIT, NORMAL_THRESHOLD_SIGMAS
from mvtec_seg.models.base import AnomalyModule, loader_maps
from mvtec_seg.summary import PREDICTIONS_FILE

MVTEC_AD2_RECORD = "mvtec_ad2.json"
NORMAL_THRESHOLD_RULE = (
    f"mean + {NORMAL_THRESHOLD_SIGMAS:g} std of every pixel score of the val part's normal images "
    f"(map >= threshold)"
)


def _maps(module: AnomalyModule, dataset, batch_size: int, device: torch.device | None) -> np.ndarray:
    """float32 [N,H,W] maps of `dataset` in order (`models.base.loader_maps`)."""
    if device is not None:
        module.to(device)
    maps, _ = loader_maps(module, DataLoader(dataset, batch_size=batch_size, shuffle=False))
    return maps.numpy()


def layout_test_metrics(
    module: AnomalyModule, dm, run_dir: Path | str, device: torch.device | None = None
) -> dict[str, float]:
    """`{test/<name>: value}` of the layout's extra metrics (none for MVTec AD and VisA); writes the
    MVTec AD 2 record into the run folder."""
    if getattr(dm, "layout", "mvtec") != "mvtec_ad2":
        return {}
    run_dir = Path(run_dir)
    with np.load(run_dir / PREDICTIONS_FILE) as pred:
        test_maps, test_masks = pred["anomaly_map"].astype(np.float32), pred["gt_mask"]
    normal = dm.dataset("val", normal_only=True)
    values, threshold = mvtec_ad2_metrics(
        test_maps, test_masks, _maps(module, normal, dm.eval_batch_size, device)
    )
    atomic_write_json(
        run_dir / MVTEC_AD2_RECORD,
        {
            "threshold": threshold if math.isfinite(threshold) else None,
            "rule": NORMAL_THRESHOLD_RULE,
            "n_images": len(normal),
            "aupro_fpr_limit": AUPRO_FPR_LIMIT,
            "metrics": {f"test/{k}": (v if math.isfinite(v) else None) for k, v in values.items()},
        },
    )
    return {f"test/{k}": v for k, v in values.items()}


def recorded_threshold(run_dir: Path | str | None) -> float | None:
    """The MVTec AD 2 segmentation threshold a run recorded, or None (no record, or none defined)."""
    path = Path(run_dir) / MVTEC_AD2_RECORD if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("threshold")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def rewrite_record(run_dir: Path | str, metrics: dict[str, float], resolution: str) -> None:
    """Make `mvtec_ad2.json` (when the run wrote one) hold the metrics `summary.json` holds, and the
    resolution they were computed at (`evaluation.resolution`)."""
    path = Path(run_dir) / MVTEC_AD2_RECORD
    if not path.is_file():
        return
    record = json.loads(path.read_text())
    record["metrics"] = {k: (metrics[k] if math.isfinite(metrics[k]) else None) for k in record["metrics"]}
    record["resolution"] = resolution
    atomic_write_json(path, record)
