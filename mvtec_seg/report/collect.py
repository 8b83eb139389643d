"""Find the finished runs below a folder: every `summary.json`, read through `RunSummary`, with the
settings of its `config.yaml`.

Runs are kept apart by everything that differs between them: two runs are repeats of one cell only when
their settings (`identity.flat_settings` of the resolved config, output-only settings and the seed left
out) and their data are the same; a rerun of the very same settings and seed replaces the earlier one. A
cell is (model, mask, variant): the variant names the settings that vary between the runs of that model and
mask within a category (`label_variants`), so a sweep over the learning rate gives one cell per rate.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from mvtec_seg.errors import UserError
from mvtec_seg.identity import CONFIG_FILE, OUTPUT_ONLY, flat_settings, matches
from mvtec_seg.io_utils import content_key
from mvtec_seg.metrics import METRIC_LABELS
from mvtec_seg.summary import IOU_AT_THRESHOLD, SUMMARY_FILE, RunSummary

log = logging.getLogger(__name__)

Variant = tuple[tuple[str, str], ...]  # (setting, value) pairs that set a cell apart; () when none do
Cell = tuple[str, str, Variant]  # (model, mask, variant)
NOT_COMPARED: tuple[str, ...] = (*OUTPUT_ONLY, "seed")
"""Settings that never set runs apart: where they write, what they log, and the seed (aggregated)."""
REPORT_METRICS: dict[str, str] = {**METRIC_LABELS, IOU_AT_THRESHOLD: "IoU@thr"}
"""The test metrics the report tabulates, with their labels: the five, and the IoU at each run's decision
threshold (chosen on the val part), which makes TransFusion's unscaled maps comparable on IoU."""
COST_KEYS: tuple[str, ...] = ("train_images_per_s", "test_images_per_s", "train_s")
FAILED_STATUSES: tuple[str, ...] = ("failed", "interrupted")


@dataclass(frozen=True)
class Run:
    """One finished run: its summary and the folder that holds it now (not where it was written)."""

    summary: RunSummary
    run_dir: Path
    settings: dict[str, Any] | None = field(default=None, compare=False)  # compared settings; None: unknown
    variant: Variant = ()

    @property
    def key(self) -> tuple:
        """What makes two runs the same run (a rerun replaces the other): cell, seed and settings."""
        settings = content_key(self.settings) if self.settings is not None else None
        return (self.category, self.model, self.mask, self.seed, settings)

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
        return (self.model, self.mask, self.variant)

    @property
    def metrics(self) -> dict[str, float]:
        """The report's test metrics (`REPORT_METRICS`) by bare name; NaN where missing or undefined."""
        return {m: self.summary.test_metric(m) for m in REPORT_METRICS}

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
    """A failure that a later run of the same settings and seed replaced is not marked."""
    ok = latest.get(failed.key)
    return ok is not None and _mtime(ok) >= _mtime(failed)


def compared_settings(run_dir: Path, summary: RunSummary) -> dict[str, Any] | None:
    """The run's settings that can set it apart from another run (its `config.yaml`, without
    `NOT_COMPARED`), plus the digest of the data it read (`data`) unless the data is generated from the
    settings; None without a readable config.yaml."""
    try:
        loaded = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(loaded, dict):
        return None
    flat = {k: v for k, v in flat_settings(loaded).items() if not matches(k, NOT_COMPARED)}
    data = (summary.identity or {}).get("data")
    if data is not None and not any(k.startswith("category.generate.") for k in flat):
        flat["data"] = data
    return flat


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def label_variants(runs: Iterable[Run]) -> list[Run]:
    """Each run with its variant: its values of the settings that vary between the runs of its model and
    mask within any one category (so categories' own settings, like their image size, set nothing apart)."""
    runs = list(runs)
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.category, run.model, run.mask), []).append(run)
    varying: dict[tuple[str, str], set[str]] = {}
    for (_, model, mask), group in groups.items():
        known = [r.settings for r in group if r.settings is not None]
        keys = set().union(*known) if known else set()
        found = {k for k in keys if len({_text(s.get(k, "(unset)")) for s in known}) > 1}
        varying.setdefault((model, mask), set()).update(found)
    out = []
    for run in runs:
        keys = sorted(varying[(run.model, run.mask)])
        if run.settings is None:
            variant: Variant = (("config.yaml", "missing"),) if keys else ()
        else:
            variant = tuple((k, _text(run.settings.get(k, "(unset)"))) for k in keys)
        out.append(replace(run, variant=variant))
    return out


def _run(data: dict, run_dir: Path) -> Run:
    summary = RunSummary.from_dict(data)
    return Run(summary, run_dir, compared_settings(run_dir, summary))


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
                    out.failed.append(_run(data, path.parent))
                continue
            out.runs.append(_run(data, path.parent))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("skipping unreadable %s: %s", path, err)
            out.unreadable.append(f"{path} ({type(err).__name__}: {err})")
    # a rerun of the same settings and seed replaces the earlier one instead of counting twice
    latest: dict[tuple, Run] = {}
    for run in sorted(out.runs, key=_mtime):
        if run.key in latest:
            out.skipped_status["superseded"] = out.skipped_status.get("superseded", 0) + 1
        latest[run.key] = run
    out.runs = label_variants(sorted(latest.values(), key=lambda r: str(r.run_dir)))
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
