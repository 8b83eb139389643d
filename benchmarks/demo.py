"""The demo suite: `make demo` (`python -m mvtec_seg.compare experiment=demo`) from an empty cache, per seed.

Each case is the whole comparison as a newcomer runs it: the teacher trained from scratch, its maps and pseudo
masks, U-Net on GT and on PSEUDO, TransFusion scored, the report. Recorded: the wall-clock time of all of it
(in this process; install and interpreter start excluded), every job's five test metrics, and whether the
demo's targets hold (teacher image AUROC and AUPRO, U-Net GT AUPRO, total time).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from benchmarks.runner import context, measured_on, measured_rows, number, selected
from mvtec_seg.metrics import METRIC_NAMES

KEY = ("seed", "job", "tiny", "device")


def run(cfg: DictConfig, runs: Path, cache: Path, emit: Callable[[dict], None]) -> None:
    from mvtec_seg.compare import compare

    tiny = bool(cfg.get("tiny"))
    for seed in selected(cfg, "seeds", [str(s) for s in cfg.seeds]):
        folder = runs / f"seed{seed}"
        fresh_cache = folder / "cache"  # from nothing: the teacher's training is part of the demo
        shutil.rmtree(folder, ignore_errors=True)
        overrides = [
            *cfg.overrides,
            f"seed={seed}",
            f"paths.cache_dir={fresh_cache}",
            f"paths.output_dir={folder / 'outputs'}",
            f"compare.output={folder / 'compare'}",
            "trainer.enable_progress_bar=false",
            *(cfg.tiny_overrides if tiny else []),
        ]
        t0 = time.perf_counter()
        result = compare(overrides)
        wall = time.perf_counter() - t0
        for job, summary in result["summaries"].items():
            metrics = {m: (summary.get("metrics") or {}).get(f"test/{m}") for m in METRIC_NAMES}
            emit(
                {
                    "suite": "demo",
                    "seed": int(seed),
                    "job": job,
                    "model": summary.get("model"),
                    "mask": summary.get("mask"),
                    "status": summary.get("status"),
                    **metrics,
                    "train_s": (summary.get("time") or {}).get("train_s"),
                    "demo_wall_s": wall,
                    "within_budget": wall <= float(cfg.targets.wall_s),
                    "tiny": tiny,
                    "command": "python -m benchmarks demo",
                    **context(),
                }
            )


def section(rows: list[dict[str, str]]) -> str:
    """RESULTS.md's section for the demo: per seed, the time of the whole comparison and every job's metrics."""
    rows = measured_rows(rows)
    if not rows:
        return "No demo results yet: `python -m benchmarks demo`."
    lines = [
        "| seed | job | image AUROC | pixel AUROC | pixel AP | AUPRO | IoU | whole demo (s) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (int(r["seed"]), r["job"])):
        cells = " | ".join(f"{number(r[m]):.3f}" for m in METRIC_NAMES)
        lines.append(f"| {r['seed']} | {r['job']} | {cells} | {number(r['demo_wall_s']):.0f} |")
    return "\n".join([*lines, "", measured_on(rows)])
