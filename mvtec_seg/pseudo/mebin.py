"""MEBin, Main Element Binarization (Huang et al., "AnomalyNCD: Towards Novel Anomaly Class Discovery in
Industrial Scenarios", CVPR 2025): a threshold per image where the map's defect regions are stable.

The definition, as the paper gives it: the maps are scaled to [0, 255] between the lowest and the highest
image score (the per-image maxima) of a reference set, values below the lowest score set to 0. Each map is
binarised at 255, 255 - r, 255 - 2r, ... (r = `sample_rate`), each binary map is eroded with a k x k square
(`erode`, so that thin bridges do not merge regions) and its connected regions are counted. A run of
consecutive levels with the same non-zero count of at least `min_interval` levels is stable; the count whose
longest stable run is the longest wins (the first one met from the top on a tie), and the image's threshold
is the lowest level of that run. An image with no stable run gets an empty mask. The mask is the map above its
threshold (not eroded).

The reference set here is the train part (the levels never depend on val or test images). All images are
processed at once per level: one erosion and one labelling over the stack, slices kept apart.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def region_counts(binary: np.ndarray) -> np.ndarray:
    """The number of 8-connected regions in each slice of `binary` [N,H,W]."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connected within a slice, never across slices
    labels, _ = ndimage.label(binary, structure=structure)
    # labels are numbered in scan order, slice by slice: a slice's regions follow the previous slices'
    last = np.maximum.accumulate(labels.reshape(len(binary), -1).max(axis=1))
    return np.diff(np.concatenate(([0], last)))


def stable_level(counts: np.ndarray, min_interval: int) -> int | None:
    """The index (into the levels, top first) that ends the winning stable run of `counts`, or None."""
    best: dict[int, tuple[int, int]] = {}  # count -> (length, end) of its longest run
    start = 0
    for i in range(1, len(counts) + 1):
        if i == len(counts) or counts[i] != counts[start]:
            length, value = i - start, int(counts[start])
            if value > 0 and length >= min_interval and length > best.get(value, (0, 0))[0]:
                best[value] = (length, i - 1)
            start = i
    if not best:
        return None
    length = max(v[0] for v in best.values())
    return next(end for n, (ln, end) in best.items() if ln == length)


def mebin(
    maps: np.ndarray,
    reference: np.ndarray,
    sample_rate: int = 4,
    min_interval: int = 4,
    erode: int = 6,
) -> tuple[np.ndarray, np.ndarray]:
    """Masks (uint8 [N,H,W]) and per-image thresholds (float32 [N], +inf for an empty mask) of `maps`;
    the scale comes from the image scores of `reference` (indices into `maps`)."""
    maps = np.asarray(maps, dtype=np.float32)
    peaks = maps[reference].reshape(len(reference), -1).max(axis=1)
    lo, hi = float(peaks.min()), float(peaks.max())
    if hi <= lo:  # every reference image peaks alike: scale from the lowest value instead
        lo = float(maps[reference].min())
    span = max(hi - lo, 1e-12)
    norm = np.where(maps < lo, 0.0, np.clip((maps - lo) / span * 255.0, 0.0, 255.0))
    levels = np.arange(255, -1, -int(sample_rate))
    kernel = np.ones((1, int(erode), int(erode)), dtype=bool) if erode > 1 else None
    counts = np.empty((len(levels), len(maps)), dtype=np.int64)
    for k, level in enumerate(levels):
        binary = norm > level
        if kernel is not None:
            binary = ndimage.binary_erosion(binary, structure=kernel)
        counts[k] = region_counts(binary)
    thresholds = np.full(len(maps), np.inf, dtype=np.float32)
    for i in range(len(maps)):
        end = stable_level(counts[:, i], int(min_interval))
        if end is not None:
            thresholds[i] = levels[end] / 255.0 * span + lo
    masks = (maps > thresholds[:, None, None]).astype(np.uint8)
    return masks, thresholds
