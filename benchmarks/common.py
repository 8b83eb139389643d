"""Shared bits of the benchmark scripts: locating the real data, timing, printing results, and the
``--tiny`` / ``--out`` convention with its markdown section (see benchmarks/README.md)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
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


# ---------------------------------------------------------------------------------------------
# the --tiny / --out convention (#11): `make bench` discovers every script and assembles RESULTS.md
# ---------------------------------------------------------------------------------------------


class _BenchParser(argparse.ArgumentParser):
    def parse_args(self, *a, **kw):  # type: ignore[override]
        args = super().parse_args(*a, **kw)
        if args.tiny:
            # One torch thread: tiny ops on a busy machine otherwise wait at every parallel region's barrier
            # (a 32 px TransFusion predict took minutes with 2 threads under load, seconds with 1).
            import torch

            torch.set_num_threads(1)
        return args


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the two options every benchmark script has.

    --tiny: a smoke run of a few seconds (what the test runs; its figures are not measurements; one torch
    thread); --out DIR: write the markdown section to DIR/<name>.md (`make bench` passes benchmarks/results).
    """
    ap = _BenchParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--tiny", action="store_true", help="smoke run in seconds (for the test), not a measurement"
    )
    ap.add_argument("--out", default=None, help="folder for the markdown section <name>.md")
    return ap


def machine() -> str:
    """CPU model, cores, memory and GPU of this machine, in words (for every section and the header)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        mem = f", {pages * page / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    gpu = "no GPU"
    torch = sys.modules.get("torch")  # not imported here: the runner's header should not pay for torch
    if torch is not None and torch.cuda.is_available():
        gpu = f"GPU {torch.cuda.get_device_name(0)}"
    elif shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
        gpu = listed.splitlines()[0] if listed else gpu
    return f"{cpu}, {os.cpu_count()} cores{mem}, {gpu}"


def command_line() -> str:
    """The command that produced this run, as one would type it from the repository root (without --out)."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        if not a.startswith("--out="):
            args.append(a)
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    return " ".join([".venv/bin/python", str(script), *args])


def md_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; numbers are written as given (format them before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(args: argparse.Namespace, name: str, title: str, body: str) -> str:
    """The benchmark's markdown section: heading, exact command, machine and date, then ``body``.

    Printed, and written to ``args.out/<name>.md`` when --out is given (the runner assembles these).
    """
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    tiny = " **Tiny mode: a smoke run, not a measurement.**" if getattr(args, "tiny", False) else ""
    text = f"## {title}\n\n```\n{command_line()}\n```\n\nMeasured {when} on {machine()}.{tiny}\n\n{body.strip()}\n"
    print(text)
    if getattr(args, "out", None):
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.md").write_text(text)
    return text
