"""Anomaly generation before/after #9, alternating in one process: the old generator module (a file) vs this
tree's, on the same images, plus the levers one at a time (foreground cache, batched augmentations).

    git show 1147ebe:mvtec_seg/models/transfusion/anomalies.py > /tmp/anomalies_before.py
    python benchmarks/transfusion_generation_ab.py --before /tmp/anomalies_before.py [--size 256] [--batch 8]

Also counts device-synchronising aten ops per `generate` call (the same list as benchmarks/transfusion_speed.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import emit
from transfusion_speed import SyncCounter, device_name, object_images

from mvtec_seg.models.transfusion import anomalies as after


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location("anomalies_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="the old anomalies.py")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    before = load_module(args.before)
    x = object_images(args.batch, args.size)
    paths = [f"train/good/{i:03d}.png" for i in range(args.batch)]
    old = before.AnomalyGenerator(seed=0)
    new = after.AnomalyGenerator(seed=0)
    new_uncached = after.AnomalyGenerator(seed=0, cache_foreground=False)
    g_old, g_new, rng = (
        torch.Generator().manual_seed(0),
        torch.Generator().manual_seed(0),
        np.random.default_rng(0),
    )
    half = x[: max(1, args.batch // 2)]
    cases = {
        "generate before": lambda: old.generate(x, paths=paths),
        "generate after": lambda: new.generate(x, paths=paths),
        "generate after, no foreground cache": lambda: new_uncached.generate(x, paths=paths),
        "augment before (per image)": lambda: before.augment(half, g_old),
        "augment after (batched)": lambda: after.augment(half, g_new, rng),
        "foreground rule (SciPy hole filling)": lambda: after.estimate_foreground(x),
    }
    for fn in cases.values():
        fn()  # warm-up (fills the cache)
    times: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):  # alternating, so a busy machine slows every case alike
        for name, fn in cases.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    syncs = {}
    for name in ("generate before", "generate after"):
        counter = SyncCounter()
        with counter:
            cases[name]()
        syncs[name] = counter.count
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    cpu_ms = {k: 1e3 * statistics.median(v) for k, v in cpu.items()}
    emit(
        "transfusion_generation_ab",
        {
            "command": f"benchmarks/transfusion_generation_ab.py --size {args.size} --batch {args.batch} "
            f"--rounds {args.rounds}",
            "device": device_name(torch.device("cpu")),
            "threads": torch.get_num_threads(),
            "median_wall_ms": ms,
            "median_cpu_ms": cpu_ms,
            "speedup_generate_cpu_time": cpu_ms["generate before"] / cpu_ms["generate after"],
            "speedup_augment_cpu_time": cpu_ms["augment before (per image)"]
            / cpu_ms["augment after (batched)"],
            "syncing_ops_per_generate": syncs,
        },
    )


if __name__ == "__main__":
    main()
