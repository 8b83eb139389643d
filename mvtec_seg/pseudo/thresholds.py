"""Threshold strategies for pseudo masks. None of them looks at GT masks.

- `fixed`: a constant (0.5 was the reference work's uncalibrated choice).
- `quantile`: a high quantile of the map values on the calibration images (known normals the teacher did
  not train on, `rules.py`): the level that normal pixels rarely exceed, so it adapts to the map's scale.
- `otsu`: Otsu's threshold on the map values of the train part.
- `hysteresis`: the `quantile` level is the high threshold (`rules.py` adds the low one and grows regions).
- `mebin`: a threshold per image where its regions are stable (`mebin.py`); the `quantile` level is still
  computed, as the upper edge of the calibrated map (`mask.target=soft`, distillation).
"""

from __future__ import annotations

import numpy as np
from skimage.filters import threshold_otsu

STRATEGIES = ("fixed", "quantile", "otsu", "hysteresis", "mebin")


def mask_threshold(
    maps: np.ndarray,
    train_idx: np.ndarray,
    calibration_idx: np.ndarray,
    strategy: str,
    quantile: float = 0.995,
    fixed: float = 0.5,
) -> float:
    """The binarisation level for `maps` ([N,H,W] over the manifest): for `hysteresis` the high one, for
    `mebin` the calibration's upper edge."""
    if strategy == "fixed":
        return float(fixed)
    if strategy in ("quantile", "hysteresis", "mebin"):
        if len(calibration_idx) == 0:
            raise ValueError(f"mask.threshold.strategy={strategy} needs known normal images to calibrate on")
        return float(np.quantile(np.asarray(maps[calibration_idx], dtype=np.float32), quantile))
    if strategy == "otsu":
        return float(threshold_otsu(np.asarray(maps[train_idx], dtype=np.float32).ravel()))
    raise ValueError(f"mask.threshold.strategy={strategy!r} is not one of {STRATEGIES}")
