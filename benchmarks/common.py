"""Shared bits of the benchmark scripts: locating the real data, timing, and printing results."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MVTEC = ROOT.parent / "shared" / "data" / "mvtec"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def require_category(root: Path, category: str) -> Path:
    """The category folder, or a clean exit (code 0) when the real data is not on this machine."""
    path = Path(root) / category
    if not path.is_dir():
        print(json.dumps({"skipped": f"{path} not found"}))
        sys.exit(0)
    return path


class CpuClock:
    """Wall time and CPU time (user+system of this process and its children) of a block."""

    def __enter__(self) -> CpuClock:
        self._wall = time.perf_counter()
        self._cpu = self._cpu_now()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = self._cpu_now() - self._cpu

    @staticmethod
    def _cpu_now() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def emit(name: str, result: dict) -> None:
    """Print the result as one JSON line and keep a copy under outputs/benchmarks/."""
    from mvtec_seg.io_utils import atomic_write_json

    result = {"benchmark": name, **result}
    print(json.dumps(result))
    atomic_write_json(ROOT / "outputs" / "benchmarks" / f"{name}.json", result)
