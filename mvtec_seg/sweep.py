"""Hydra callbacks (`hydra.callbacks` in mvtec_seg/conf/config.yaml): the run folder checked before Hydra
writes into it, and the end of a multirun: a table of the jobs that failed, and a non-zero exit.

`RunFolderGuard`: Hydra creates the run folder and writes `.hydra/` into it before the job starts, so the
checks that a job may use its folder (`preflight.preflight`: every setting, then a folder holding another run's
results, or `resume=true` with other settings) run here first, and a refused job touches nothing. A multirun
into a sweep folder that already holds runs is refused unless `resume=true`.

`FailedJobs`: a failed job must not stop the sweep (`__main__` logs it and goes on), but neither may the
sweep end as if all went well. It runs in the launching process after every job has ended, whatever the
launcher, and reads what the jobs wrote: their `summary.json` (status and the one-line `error`; a
`failed/*/summary.json` of a resumed finished run), the job's log, and Hydra's `.hydra/overrides.yaml`.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from mvtec_seg.errors import UserError
from mvtec_seg.identity import launched_child
from mvtec_seg.io_utils import hold_folder
from mvtec_seg.summary import SUMMARY_FILE

FAILED_DIR = "failed"  # outputs.FAILED_DIR: where a resumed finished run records a failure
JOB_FAILED = re.compile(r"job \S+ failed: (.+)$")

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


def _newer(path: Path, since: float | None) -> bool:
    return since is None or path.stat().st_mtime >= since


def _logged_reason(folder: Path) -> str | None:
    """The one-line reason `__main__` logged for a job that wrote no summary (refused, or failed early)."""
    for log in sorted(folder.glob("*.log")):
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in reversed(lines):
            found = JOB_FAILED.search(line)
            if found:
                return found.group(1)
    return None


def _reason(folder: Path, since: float | None = None) -> str | None:
    """None when the job passed, else why it did not (one line). Only what this sweep wrote counts: a
    summary.json older than the sweep is an earlier run's."""
    failures = [p for p in folder.glob(f"{FAILED_DIR}/*/{SUMMARY_FILE}") if _newer(p, since)]
    path = folder / SUMMARY_FILE
    if failures:
        path = max(failures, key=lambda p: p.stat().st_mtime_ns)
    elif not path.is_file() or not _newer(path, since):
        logged = _logged_reason(folder)
        if logged:
            return logged
        if path.is_file():
            return "its summary.json is from an earlier run: this job wrote none (killed, or refused)"
        return "no summary.json: the job was killed or crashed before writing it"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"unreadable summary.json ({type(err).__name__})"
    status = str(data.get("status", "unknown"))
    if status in PASSED:
        return None
    if status == "running":
        return "status 'running': the job was killed or crashed before it finished"
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
        reason = _reason(job, since)
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


def _task_config(config: DictConfig, run_dir: Path) -> DictConfig:
    """The job's config as `train` sees it, with `paths.run_dir` = the folder Hydra is about to make."""
    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        del task["hydra"]
        task.paths.run_dir = str(run_dir)
    return task


def _resume_requested(config: DictConfig) -> bool:
    overrides = [str(o) for o in OmegaConf.select(config, "hydra.overrides.task", default=[]) or []]
    return bool(config.get("resume")) or any(o.replace(" ", "").lower() == "resume=true" for o in overrides)


def _refuse(err: UserError) -> None:
    """Stop before Hydra goes on: Hydra turns an Exception in a callback into a warning, not SystemExit."""
    sys.stdout.flush()
    print(f"error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(2)


class RunFolderGuard(Callback):
    """Refuse a job before Hydra makes or writes its run folder (see the module docstring)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._check_run(config)
        except UserError as err:
            _refuse(err)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._check_sweep(config)
        except UserError as err:
            _refuse(err)

    @staticmethod
    def _check_run(config: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        from mvtec_seg.preflight import RUN_FOLDER_IN_USE, preflight
        from mvtec_seg.settings import resolved_settings

        HydraConfig.instance().set_config(config)  # `${hydra:...}` in the run folder's name resolves
        try:
            run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()
        except OmegaConfBaseException:  # the folder's name reads a setting: name that setting
            resolved_settings(_task_config(config, Path(".")))
            raise
        preflight(_task_config(config, run_dir))
        if launched_child():  # rank 1+ of a distributed job: rank 0 holds the folder for it
            return
        # before Hydra writes into it; `train` takes it again, the process keeps it
        hold_folder(run_dir, f"run folder {run_dir}", RUN_FOLDER_IN_USE)

    @staticmethod
    def _check_sweep(config: DictConfig) -> None:
        from mvtec_seg.settings import folder_problem

        sweep = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        problem = folder_problem(sweep)
        if problem:
            raise UserError(
                f"hydra.sweep.dir={sweep} cannot be a folder: {problem} — choose another hydra.sweep.dir"
            )
        runs = sorted(sweep.glob(f"*/{SUMMARY_FILE}")) if sweep.is_dir() else []
        if runs and not _resume_requested(config):
            raise UserError(
                f"hydra.sweep.dir={sweep} already holds {len(runs)} run folder(s) — choose another "
                f"hydra.sweep.dir, or pass resume=true to continue those runs"
            )
        hold_folder(
            sweep,
            f"sweep folder {sweep}",
            "wait for that sweep to end (or stop it), or choose another hydra.sweep.dir",
        )
