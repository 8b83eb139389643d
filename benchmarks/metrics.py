"""The metrics suite: the exact metrics at dataset scale, each beside an independent implementation.

AUPRO (to the FPR limit) against a straightforward full-sort implementation of the MVTec AD definition
(label the regions, argsort every pixel, cumulative sums, cut at the limit, trapezoid) and a bare `np.sort`
of the same float32 values (the floor of any sort-based exact method); pixel AUROC and AP against
torchmetrics' exact mode (`thresholds=None`). Maps: random blob masks (half the maps anomalous, 1-3 ellipses
each) and float32 scores (noise plus a bump on the defects), seeded. Times are medians of alternating runs
in one process; peak extra memory is what `tracemalloc` sees allocated during the call.
"""

from __future__ import annotations

import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.ndimage
from omegaconf import DictConfig

from benchmarks.runner import context, measured_on, measured_rows, number

KEY = ("maps", "size", "method", "device")


def make_maps(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 scores [n,size,size] and bool masks: every other map has 1-3 elliptic blobs."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.ogrid[:size, :size]
    for i in range(0, n, 2):
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.integers(0, size, 2)
            ry, rx = rng.uniform(2, size / 8, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    scores = rng.random((n, size, size), dtype=np.float32) * 0.7 + 0.35 * masks
    return scores.astype(np.float32), masks


def full_sort_aupro(preds: np.ndarray, target: np.ndarray, fpr_limit: float) -> float:
    """The MVTec AUPRO written the straightforward way: one argsort of every pixel, cumulative sums."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connected within each image
    labels, n_regions = scipy.ndimage.label(target, structure=structure)
    labels = labels.ravel()
    s = preds.ravel()
    order = np.argsort(-s, kind="stable")
    s_sorted, region_sorted = s[order], labels[order]
    sizes = np.bincount(labels, minlength=n_regions + 1)
    weight = 1.0 / (n_regions * np.maximum(sizes, 1))
    weight[0] = 0.0
    fp = np.cumsum(region_sorted == 0)
    pro = np.cumsum(weight[region_sorted])
    ends = np.append(np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s.size - 1)
    fpr = np.concatenate(([0.0], fp[ends] / sizes[0], [1.0]))
    pro = np.concatenate(([0.0], pro[ends], [1.0]))
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:k], pro[:k]
    if k < fpr.size:
        y_lim = pro[k - 1] + (pro[k] - pro[k - 1]) * (fpr_limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
        x, y = np.append(x, fpr_limit), np.append(y, y_lim)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0 / fpr_limit)


def methods(fpr_limit: float) -> dict[str, tuple[str, Callable, str | None]]:
    """name -> (metric, function of (scores, masks), the reference it is compared with)."""
    import torch
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    from mvtec_seg.metrics import aupro, auroc, average_precision

    def tm(fn: Callable) -> Callable:
        return lambda s, y: float(fn(torch.from_numpy(s).ravel(), torch.from_numpy(y).ravel().long()))

    return {
        "full-sort MVTec AUPRO": ("AUPRO", lambda s, y: full_sort_aupro(s, y, fpr_limit), None),
        "mvtec_seg aupro": ("AUPRO", lambda s, y: aupro(s, y, fpr_limit=fpr_limit), "full-sort MVTec AUPRO"),
        "bare np.sort": ("sort", lambda s, y: float(np.sort(s.ravel())[-1]), None),
        "torchmetrics binary_auroc": ("AUROC", tm(binary_auroc), None),
        "mvtec_seg auroc": ("AUROC", lambda s, y: auroc(s, y), "torchmetrics binary_auroc"),
        "torchmetrics binary_average_precision": ("AP", tm(binary_average_precision), None),
        "mvtec_seg average_precision": (
            "AP",
            lambda s, y: average_precision(s, y),
            "torchmetrics binary_average_precision",
        ),
    }


def _timed(fn: Callable, *args) -> tuple[float, float, int]:
    tracemalloc.start()
    t0 = time.perf_counter()
    value = fn(*args)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, value, peak


def run(cfg: DictConfig, runs: Path, cache: Path, emit: Callable[[dict], None]) -> None:
    maps = [4, 8] if cfg.get("tiny") else list(cfg.maps)
    size = 32 if cfg.get("tiny") else int(cfg.size)
    rounds = 1 if cfg.get("tiny") else int(cfg.rounds)
    table = methods(float(cfg.fpr_limit))
    for n in maps:
        scores, masks = make_maps(int(n), size)
        runs_of: dict[str, list] = {name: [] for name in table}
        for _ in range(rounds):
            for name, (_, fn, _) in table.items():
                runs_of[name].append(_timed(fn, scores, masks))
        values = {name: r[-1][1] for name, r in runs_of.items()}
        for name, (metric, _, reference) in table.items():
            seconds = statistics.median(r[0] for r in runs_of[name])
            emit(
                {
                    "suite": "metrics",
                    "maps": int(n),
                    "size": size,
                    "pixels": int(scores.size),
                    "metric": metric,
                    "method": name,
                    "seconds": seconds,
                    "peak_mb": max(r[2] for r in runs_of[name]) / 2**20,
                    "value": values[name],
                    "reference": reference or "",
                    "abs_diff_to_reference": abs(values[name] - values[reference]) if reference else None,
                    "rounds": rounds,
                    "tiny": bool(cfg.get("tiny")),
                    **context(),
                }
            )


def section(rows: list[dict[str, str]]) -> str:
    """RESULTS.md's section for the metrics suite: time, memory and agreement with the reference."""
    rows = measured_rows(rows)
    if not rows:
        return "No metrics results yet: `python -m benchmarks metrics`."
    seconds = {(r["maps"], r["method"]): number(r["seconds"]) for r in rows}
    lines = [
        "| maps | pixels | metric | method | time (s) | time / reference | peak extra MB | value | "
        "abs. difference to the reference |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = r["reference"]
        ratio = seconds[(r["maps"], r["method"])] / seconds[(r["maps"], ref)] if ref else float("nan")
        diff = number(r["abs_diff_to_reference"])
        lines.append(
            f"| {r['maps']} | {int(r['pixels']) / 1e6:.1f} M | {r['metric']} | {r['method']} | "
            f"{number(r['seconds']):.2f} | {'–' if ratio != ratio else f'{ratio:.2f}x'} | "
            f"{number(r['peak_mb']):,.0f} | {number(r['value']):.12f} | {'–' if diff != diff else f'{diff:.1e}'} |"
        )
    return "\n".join([*lines, "", measured_on(rows)])
