"""Anomaly generation before/after #9, alternating in one process: the old generator module (a file) vs this
tree's, on the same images, plus the levers one at a time (foreground cache, batched augmentations).

    git show 1147ebe:mvtec_seg/models/transfusion/anomalies.py > /tmp/anomalies_before.py
    .venv/bin/python benchmarks/transfusion_generation_ab.py --before /tmp/anomalies_before.py [--size 256]
        [--batch 8] [--rounds 5] [--tiny] [--out DIR]
        (without --before: this tree's generator only, the old rows and the ratios skipped;
         --tiny: 2 images of 32 px, 1 round)

Also counts device-synchronising aten ops per `generate` call (the same list as benchmarks/transfusion_speed.py).
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import bench_parser, emit, md_table, write_section
from transfusion_speed import SyncCounter, device_name, object_images

from mvtec_seg.models.transfusion import anomalies as after


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location("anomalies_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument(
        "--before", type=Path, default=None, help="the old anomalies.py (absent: its rows are skipped)"
    )
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.tiny:
        args.size, args.batch, args.rounds = 32, 2, 1
    before = load_module(args.before) if args.before is not None else None
    x = object_images(args.batch, args.size)
    paths = [f"train/good/{i:03d}.png" for i in range(args.batch)]
    new = after.AnomalyGenerator(seed=0)
    new_uncached = after.AnomalyGenerator(seed=0, cache_foreground=False)
    g_new, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    half = x[: max(1, args.batch // 2)]
    cases = {}
    if before is not None:
        old, g_old = before.AnomalyGenerator(seed=0), torch.Generator().manual_seed(0)
        cases["generate before"] = lambda: old.generate(x, paths=paths)
    cases["generate after"] = lambda: new.generate(x, paths=paths)
    cases["generate after, no foreground cache"] = lambda: new_uncached.generate(x, paths=paths)
    if before is not None:
        cases["augment before (per image)"] = lambda: before.augment(half, g_old)
    cases["augment after (batched)"] = lambda: after.augment(half, g_new, rng)
    cases["foreground rule (SciPy hole filling)"] = lambda: after.estimate_foreground(x)
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
        if name in cases:
            counter = SyncCounter()
            with counter:
                cases[name]()
            syncs[name] = counter.count
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    cpu_ms = {k: 1e3 * statistics.median(v) for k, v in cpu.items()}
    speedup_generate = speedup_augment = None
    if before is not None:
        speedup_generate = cpu_ms["generate before"] / cpu_ms["generate after"]
        speedup_augment = cpu_ms["augment before (per image)"] / cpu_ms["augment after (batched)"]
    emit(
        "transfusion_generation_ab",
        {
            "command": f"benchmarks/transfusion_generation_ab.py --size {args.size} --batch {args.batch} "
            f"--rounds {args.rounds}",
            "before": str(args.before) if before is not None else None,
            "device": device_name(torch.device("cpu")),
            "threads": torch.get_num_threads(),
            "median_wall_ms": ms,
            "median_cpu_ms": cpu_ms,
            "speedup_generate_cpu_time": speedup_generate,
            "speedup_augment_cpu_time": speedup_augment,
            "syncing_ops_per_generate": syncs,
        },
    )
    rows = [[k, f"{ms[k]:.1f}", f"{cpu_ms[k]:.1f}", syncs.get(k, "—")] for k in cases]
    if before is not None:
        ratios = (
            f"CPU-time ratio before / after: `generate` {speedup_generate:.2f}, batched augmentations "
            f"{speedup_augment:.2f} (augmentations on {len(half)} of the {args.batch} images)."
        )
    else:
        ratios = (
            "No `--before` given: only this tree's generator is measured; the old generator's rows and the "
            "before / after ratios are skipped (pass the old `anomalies.py` as `--before`, see the script)."
        )
    rounds = f"{args.rounds} round" + ("s" if args.rounds != 1 else "")
    write_section(
        args,
        "transfusion_generation_ab",
        "TransFusion anomaly generation before / after #9",
        f"{args.batch} object images of {args.size} px on the CPU, torch threads: {torch.get_num_threads()}; "
        f"medians of {rounds} alternating the cases in one process after a warm-up:\n\n"
        + md_table(["case", "median wall (ms)", "median CPU (ms)", "syncing aten ops per call"], rows)
        + f"\n\n{ratios}",
    )


if __name__ == "__main__":
    main()
