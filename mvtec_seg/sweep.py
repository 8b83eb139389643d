"""The end of a Hydra multirun: a table of the jobs that failed, and a non-zero exit when any did.

A failed job must not stop the sweep (`__main__` logs it and goes on), but neither may the sweep end as if
all went well. `FailedJobs` is a Hydra callback (`hydra.callbacks` in mvtec_seg/conf/config.yaml) that runs in the
launching process after every job has ended, whatever the launcher, and reads what the jobs wrote: their
`summary.json` (status and the one-line `error`) and Hydra's `.hydra/overrides.yaml`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mvtec_seg.summary import SUMMARY_FILE

PASSED = ("ok", "dry_run")


@dataclass(frozen=True)
class FailedJob:
    folder: Path
    overrides: str
    reason: str
    log: Path


def _job_number(folder: Path) -> tuple[int, str]:
    head = folder.name.split("_", 1)[0]
    return (int(head) if head.isdigit() else 1 << 30, folder.name)


def _reason(folder: Path) -> str | None:
    """None when the job passed, else why it did not (one line)."""
    path = folder / SUMMARY_FILE
    if not path.is_file():
        return "no summary.json: the job was killed or crashed before writing it"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"unreadable summary.json ({type(err).__name__})"
    status = str(data.get("status", "unknown"))
    if status in PASSED:
        return None
    return str(data.get("error") or f"status {status!r}")


def failed_jobs(sweep_dir: Path | str, since: float | None = None) -> tuple[list[FailedJob], int]:
    """The failed jobs of the sweep in `sweep_dir` (job folders started at or after `since`, a POSIX
    time), and how many jobs were looked at."""
    jobs = (
        sorted(
            (
                p
                for p in Path(sweep_dir).iterdir()
                if (p / ".hydra" / "overrides.yaml").is_file()
                and (since is None or (p / ".hydra" / "overrides.yaml").stat().st_mtime >= since)
            ),
            key=_job_number,
        )
        if Path(sweep_dir).is_dir()
        else []
    )
    failed = []
    for job in jobs:
        reason = _reason(job)
        if reason is None:
            continue
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        logs = sorted(job.glob("*.log"))
        failed.append(
            FailedJob(
                job, " ".join(str(o) for o in overrides), " ".join(reason.split()), logs[0] if logs else job
            )
        )
    return failed, len(jobs)


def failure_table(failed: list[FailedJob], n_jobs: int, max_reason: int = 160) -> str:
    """A plain-text table: overrides, one-line reason, log path."""
    rows = [("overrides", "reason", "log")]
    for f in failed:
        reason = f.reason if len(f.reason) <= max_reason else f.reason[: max_reason - 1] + "…"
        rows.append((f.overrides, reason, str(f.log)))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{len(failed)} of {n_jobs} sweep jobs failed:"]
    for i, (ov, reason, log) in enumerate(rows):
        lines.append(f"  {ov:<{widths[0]}} | {reason:<{widths[1]}} | {log}")
        if i == 0:
            lines.append(f"  {'-' * widths[0]}-+-{'-' * widths[1]}-+-{'-' * 3}")
    return "\n".join(lines)


class FailedJobs(Callback):
    """After a multirun: print the failed jobs and exit with code 1 if there are any."""

    def __init__(self) -> None:
        self.started: float | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time() - 1.0  # file times can be a little behind the clock

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed, n_jobs = failed_jobs(config.hydra.sweep.dir, self.started)
        if failed:
            sys.stdout.flush()
            print(failure_table(failed, n_jobs), file=sys.stderr, flush=True)
            raise SystemExit(1)  # not an Exception: Hydra's callback runner lets it through
