"""Find the finished runs below a folder: every `summary.json`, read through `RunSummary`."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from mvtec_seg.errors import UserError
from mvtec_seg.metrics import METRIC_NAMES
from mvtec_seg.summary import SUMMARY_FILE, RunSummary

log = logging.getLogger(__name__)

Cell = tuple[str, str]
COST_KEYS: tuple[str, ...] = ("train_images_per_s", "test_images_per_s", "train_s")
FAILED_STATUSES: tuple[str, ...] = ("failed", "interrupted")


@dataclass(frozen=True)
class Run:
    """One finished run: its summary and the folder that holds it now (not where it was written)."""

    summary: RunSummary
    run_dir: Path

    @property
    def category(self) -> str:
        return self.summary.category

    @property
    def model(self) -> str:
        return self.summary.model

    @property
    def mask(self) -> str:
        return self.summary.mask

    @property
    def seed(self) -> int | None:
        return self.summary.seed

    @property
    def cell(self) -> Cell:
        return (self.model, self.mask)

    @property
    def metrics(self) -> dict[str, float]:
        """The five test metrics by bare name; NaN where missing or undefined."""
        return {m: self.summary.test_metric(m) for m in METRIC_NAMES}

    @property
    def cost(self) -> dict[str, float]:
        measured = {**self.summary.time, **self.summary.throughput}
        return {k: measured[k] for k in COST_KEYS}


@dataclass
class Collected:
    """Runs used by the report and what was left out (and why)."""

    runs: list[Run] = field(default_factory=list)
    n_files: int = 0
    skipped_status: dict[str, int] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    failed: list[Run] = field(default_factory=list)  # failed/interrupted runs not redone since; marked


def _mtime(run: Run) -> int:
    return (run.run_dir / SUMMARY_FILE).stat().st_mtime_ns


def _redone(failed: Run, latest: dict[tuple, Run]) -> bool:
    """A failure that a later run of the same (category, model, mask, seed) replaced is not marked."""
    ok = latest.get((failed.category, failed.model, failed.mask, failed.seed))
    return ok is not None and _mtime(ok) >= _mtime(failed)


def collect_runs(folder: Path | str) -> Collected:
    """Read every summary.json below ``folder``; keep status "ok", count the others by status, and keep
    the failed and interrupted ones (not redone since) for the report to mark.

    Raises UserError when the folder is missing or holds no finished run, so the CLI can say so in a line.
    """
    root = Path(folder)
    if not root.exists():
        raise UserError(
            f"report folder not found: {root} — pass the output or sweep folder that holds the run folders"
        )
    if not root.is_dir():
        raise UserError(f"report folder is not a folder: {root} — pass the folder that holds the run folders")
    out = Collected()
    for path in sorted(root.rglob(SUMMARY_FILE)):
        if not path.is_file():
            continue
        out.n_files += 1
        try:
            data = json.loads(path.read_text())
            status = str(data.get("status", "unknown"))
            if status != "ok":
                out.skipped_status[status] = out.skipped_status.get(status, 0) + 1
                if status in FAILED_STATUSES:
                    out.failed.append(Run(RunSummary.from_dict(data), path.parent))
                continue
            out.runs.append(Run(RunSummary.from_dict(data), path.parent))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("skipping unreadable %s: %s", path, err)
            out.unreadable.append(f"{path} ({type(err).__name__}: {err})")
    # a re-run of the same (category, model, mask, seed) replaces the earlier one instead of counting twice
    latest: dict[tuple, Run] = {}
    for run in sorted(out.runs, key=lambda r: (r.run_dir / SUMMARY_FILE).stat().st_mtime_ns):
        key = (run.category, run.model, run.mask, run.seed)
        if key in latest:
            out.skipped_status["superseded"] = out.skipped_status.get("superseded", 0) + 1
        latest[key] = run
    out.runs = sorted(latest.values(), key=lambda r: str(r.run_dir))
    out.failed = [f for f in out.failed if not _redone(f, latest)]
    if out.n_files == 0:
        raise UserError(
            f"no summary.json found under {root} — pass the output or sweep folder that holds the run folders"
        )
    if not out.runs:
        found = ", ".join(f"{k}: {v}" for k, v in sorted(out.skipped_status.items())) or "none readable"
        raise UserError(
            f"no finished run (status 'ok') under {root}: {out.n_files} summary.json found ({found}) — "
            f"wait for the runs to finish or fix the failed ones"
        )
    return out
