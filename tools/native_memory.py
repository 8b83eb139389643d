"""Peak memory and time of scoring large test maps in memory (`AnomalyMetrics`) and out of core
(`metrics.out_of_core`, what `evaluation.resolution=native` uses), on the same fabricated maps:

    python tools/native_memory.py [--images 40] [--height 2232] [--width 1024] [--anomalous 0.2]

Each path runs in its own process (`ru_maxrss` is a process's peak): N maps upsampled bilinearly from
64x64 noise to HxW (as `native` upsamples a model's maps), defects of about ``--anomalous`` of each image's
pixels (three rectangles, scored higher), fed image by image. Prints the peak RSS, the peak above the
process's RSS before the first image, the seconds spent in update + compute, and the largest difference
between the two paths' metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from itertools import chain

import numpy as np

MIB = 1024 * 1024


def _rss() -> int:
    """Current resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maps(n: int, hw: tuple[int, int], anomalous: float) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(map float32 [H,W], mask uint8 [H,W], label): every other image has defects, about ``2 * anomalous``
    of its pixels, so that the test set has about ``anomalous`` of them."""
    from mvtec_seg.data.mvtec import resize_map

    h, w = hw
    for i in range(n):
        rng = np.random.default_rng(i)
        amap = resize_map(rng.random((64, 64), dtype=np.float32), hw)
        mask = np.zeros(hw, np.uint8)
        if i % 2:
            side = np.sqrt(2 * anomalous * h * w / 3)
            for _ in range(3):
                dh, dw = int(side * h / (h + w) * 2), int(side * w / (h + w) * 2)
                y, x = int(rng.integers(0, h - dh)), int(rng.integers(0, w - dw))
                mask[y : y + dh, x : x + dw] = 1
            amap = (amap + 0.5 * mask).astype(np.float32)
        yield amap, mask, int(i % 2)


def run(path: str, n: int, hw: tuple[int, int], anomalous: float, folder: str) -> dict[str, object]:
    """Score the fabricated maps one way; the figures of this process."""
    import torch

    from mvtec_seg.metrics import AnomalyMetrics
    from mvtec_seg.metrics.out_of_core import CHUNK_PIXELS, OutOfCoreMetrics

    images = _maps(n, hw, anomalous)
    first = next(images)
    base = _rss()
    spent = 0.0
    if path == "memory":
        metric = AnomalyMetrics(iou_threshold=0.5, fpr_limit=0.3)
        for amap, mask, label in chain([first], images):
            t = time.perf_counter()
            metric.update(torch.tensor(amap)[None], torch.from_numpy(mask)[None], torch.tensor([label]))
            spent += time.perf_counter() - t
        t = time.perf_counter()
        values = {k: float(v) for k, v in metric.compute().items()}
        values["pixel_AUPRO_0.05"] = metric.aupro(0.05)
        spent += time.perf_counter() - t
    else:
        with OutOfCoreMetrics(0.5, 0.3, folder=folder) as metric:
            for amap, mask, label in chain([first], images):
                t = time.perf_counter()
                metric.update(amap, mask, label)
                spent += time.perf_counter() - t
            t = time.perf_counter()
            values = metric.compute({"pixel_AUPRO_0.05": 0.05})
            spent += time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "path": path,
        "chunk": CHUNK_PIXELS if path != "memory" else None,
        "peak_mib": peak / MIB,
        "above_start_mib": (peak - base) / MIB,
        "seconds": spent,
        "values": values,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--height", type=int, default=2232)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--anomalous", type=float, default=0.2, help="fraction of the pixels in defects")
    ap.add_argument("--folder", default=tempfile.gettempdir(), help="where the out-of-core path spills")
    ap.add_argument("--path", choices=["memory", "out_of_core"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    hw = (a.height, a.width)
    if a.path:
        print(json.dumps(run(a.path, a.images, hw, a.anomalous, a.folder)))
        return
    results = []
    for path in ("memory", "out_of_core"):
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--path", path], check=True, stdout=subprocess.PIPE
        )
        results.append(json.loads(out.stdout))
    pixels = a.images * a.height * a.width
    print(
        f"{a.images} maps of {a.height}x{a.width} ({pixels / 1e6:.1f} M pixels, ~{a.anomalous:.0%} anomalous)"
    )
    print("| path | peak RSS (MiB) | above the start (MiB) | bytes per pixel | update + compute (s) |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        name = "in memory" if r["path"] == "memory" else f"out of core (chunk {r['chunk']})"
        per_px = r["above_start_mib"] * MIB / pixels
        peak, above = f"{r['peak_mib']:.0f}", f"{r['above_start_mib']:.0f}"
        print(f"| {name} | {peak} | {above} | {per_px:.2f} | {r['seconds']:.1f} |")
    va, vb = results[0]["values"], results[1]["values"]
    print("largest difference of a metric:", max(abs(va[k] - vb[k]) for k in va))
    print("metrics:", {k: round(v, 6) for k, v in vb.items()})


if __name__ == "__main__":
    main()
