"""When is GT a reference: the rule that keeps a failed reference out of every PSEUDO / GT comparison.

A ratio or difference to U-Net GT says how close PSEUDO comes to what the masks could teach only where GT
itself was learned. `REFERENCE_FLOOR` is that rule: the GT run (mean over its seeds) reaches image AUROC 0.8
and AUPRO 0.6. Below either floor the category is marked and left out of the means and ratios that compare
against GT. The floors sit well under what GT reaches where its defects are visible at the model's size
(0.85–0.95 AUPRO on bottle at 64–128 px) and above what a segmenter reaches with no useful signal (image
AUROC 0.5–0.7 on magnetic tile at 64 px, whose defects are a few pixels there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

REFERENCE_FLOOR: dict[str, float] = {"image_AUROC": 0.8, "pixel_AUPRO": 0.6}


def unlearned(metrics: Mapping[str, float | None]) -> str:
    """Why a GT run's metrics (`{"image_AUROC": ..., "pixel_AUPRO": ...}`) are no reference, e.g.
    `image_AUROC 0.683 < 0.8`; empty when they are (an undefined metric is not held against it)."""
    low = []
    for name, floor in REFERENCE_FLOOR.items():
        value = metrics.get(name)
        if value is not None and math.isfinite(float(value)) and float(value) < floor:
            low.append(f"{name} {float(value):.3f} < {floor}")
    return ", ".join(low)
