"""The benchmark runner: a suite is a config grid (`benchmarks/suites/<name>.yaml`), its results are data.

Every suite writes one CSV (`benchmarks/results/<name>.csv`): one row per measured case, each with the
columns `machine`, `device`, `commit` and `date` beside its figures, so a figure always says where and on
what it was measured. A rerun replaces the rows of the cases it measured and keeps the others.
`benchmarks/RESULTS.md` is generated from the CSVs (`benchmarks.report`).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import logging
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mvtec_seg.errors import UserError
from mvtec_seg.io_utils import atomic_write_text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SUITES_DIR = HERE / "suites"
RESULTS_DIR = HERE / "results"
SUITES: tuple[str, ...] = ("quality", "labels", "demo", "speed", "metrics")
CONTEXT_COLUMNS: tuple[str, ...] = ("machine", "device", "commit", "date")


def load_suite(name: str, overrides: Iterable[str] = ()) -> DictConfig:
    """The suite's grid with `key=value` overrides merged in (e.g. `select.categories=[bottle] tiny=true`)."""
    path = SUITES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown benchmark suite {name!r} — pick one of {', '.join(SUITES)}")
    cfg = OmegaConf.load(path)
    dotlist = list(overrides)
    bad = [o for o in dotlist if "=" not in o]
    if bad:
        raise UserError(f"benchmark argument {bad[0]!r} is not key=value — e.g. tiny=true")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    except Exception as err:  # omegaconf's grammar errors: one line
        raise UserError(f"cannot read the benchmark overrides {dotlist}: {err}") from None
    cfg.suite = name
    if cfg.get("data_root") is not None:  # relative to the repository, wherever the command runs
        cfg.data_root = str((ROOT / str(cfg.data_root)).resolve())
    return cfg


def selected(cfg: DictConfig, kind: str, available: Iterable[str]) -> list[str]:
    """`available` filtered by `select.<kind>` (a list; null: all), unknown names refused."""
    names = list(available)
    want = OmegaConf.select(cfg, f"select.{kind}")
    if want is None:
        return names
    want = [str(w) for w in want]
    unknown = [w for w in want if w not in names]
    if unknown:
        raise UserError(f"select.{kind}: unknown {unknown} — the suite has {names}")
    return [n for n in names if n in want]


def data_present(cfg: DictConfig, category: str) -> bool:
    """A category whose `data.root` does not exist is skipped (the shared data is not on every machine)."""
    roots = [o.split("=", 1)[1] for o in cfg.categories[category] if o.startswith("data.root=")]
    return all(Path(r).is_dir() for r in roots)


def category_seeds(cfg: DictConfig) -> Iterator[tuple[str, int, str]]:
    """`(category, seed, command)` of a grid, category first (a category's teacher is trained once per
    seed): the selected categories whose data is here, the selected seeds, and the command that measures
    them (what was measured, not where it was written: out=, runs= and cache= are left out)."""
    kept = [a for a in sys.argv[1:] if a.split("=", 1)[0] not in ("out", "runs", "cache")]
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in kept)
    available = list(cfg.tiny_categories) if cfg.get("tiny") else list(cfg.categories)
    for category in selected(cfg, "categories", available):
        if not data_present(cfg, category):
            logging.getLogger(__name__).warning(
                "%s: %s skipped: its data.root is not on this machine", cfg.suite, category
            )
            continue
        for seed in selected(cfg, "seeds", [str(s) for s in cfg.seeds]):
            yield category, int(seed), command


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU model, cores and memory: the machine a row was measured on."""
    mem = ""
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem = f", {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB"
    return f"{cpu_name()}, {os.cpu_count()} cores{mem}"


def device_name() -> str:
    """The accelerator the measurements ran on: the GPU's name, or `cpu (<threads> threads)`."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"


def commit() -> str:
    """The checked-out commit (with `+changes` when the tree differs from it), or `unknown`."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def context() -> dict[str, str]:
    """The four columns every result row carries."""
    return {
        "machine": machine(),
        "device": device_name(),
        "commit": commit(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def measured_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows of real measurements: smoke runs (`tiny=true`) are left out of RESULTS.md."""
    return [r for r in rows if r.get("tiny") != "True"]


def measured_on(rows: list[dict[str, str]], device: bool = True) -> str:
    """The line under a section's table: every (machine[, device], commit, date) its rows were measured on."""
    where = sorted(
        {
            f"{r['machine']}{', ' + r['device'] if device else ''} (commit {r['commit']}, {r['date']})"
            for r in rows
        }
    )
    return "Measured on: " + "; ".join(where)


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(path: Path, rows: list[dict[str, Any]], key: tuple[str, ...]) -> Path:
    """Merge `rows` into the CSV at `path`: a row with the same `key` columns is replaced, others kept."""
    fresh = {tuple(str(r.get(k, "")) for k in key): r for r in rows}
    kept = [r for r in read_csv(path) if tuple(r.get(k, "") for k in key) not in fresh]
    merged = kept + list(fresh.values())
    columns: list[str] = []
    for r in merged:
        columns += [c for c in r if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in merged:
        writer.writerow({c: _cell(r.get(c)) for c in columns})
    return atomic_write_text(path, buf.getvalue())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if value == value else ""  # NaN: empty
    return str(value)


def number(text: Any) -> float:
    """A CSV cell as float (NaN when empty or not a number)."""
    try:
        return float(text) if text not in (None, "") else float("nan")
    except (TypeError, ValueError):
        return float("nan")
