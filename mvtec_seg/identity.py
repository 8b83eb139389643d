"""What makes a run one run: its identity, and whether a run folder may be started or resumed.

A run's identity is two digests recorded in `summary.json`: `config`, of its resolved settings without the
ones that may change on resume (`RESUME_MUTABLE`: how long it trains, where it runs and writes, what it
logs), and `data`, of the files it read (their BLAKE2b digests, `data.files`) and the part each one is in.
A folder holds one run: a new run refuses a folder that holds another run's results, and `resume=true`
continues only the run whose identity matches. Both checks only read the folder, so a refused job leaves it
untouched. The report compares runs by the same flattened settings (`flat_settings`).
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mvtec_seg.errors import UserError
from mvtec_seg.io_utils import content_key, format_problem
from mvtec_seg.summary import SUMMARY_FILE

CONFIG_FILE = "config.yaml"
DATA_RECORD_FILE = "files.json"  # the run's data record: root and each file's digest (names what changed)
CHECKPOINT_DIR = "checkpoints"

OUTPUT_ONLY: tuple[str, ...] = (
    "resume",
    "dry_run",
    "task_name",
    "tags",
    "group",
    "paths.*",
    "data.root",  # where the data lies; what it holds is the `data` digest
    "data.decode_workers",
    "data.pin_memory",
    "data.max_image_pixels",
    "checkpoint.last_every_s",
    "evaluation.max_overlays",
    "logger",
    "logger.*",
    "trainer.enable_progress_bar",
    "teacher.trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "teacher.trainer.log_every_n_steps",
)
"""Settings that say where a run reads and writes, what it logs and shows, or how fast it decodes: never
what it computes. Neither part of its identity nor a difference between two runs in the report."""

RESUME_MUTABLE: tuple[str, ...] = (
    *OUTPUT_ONLY,
    "model.max_epochs",
    "trainer.max_epochs",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.use_distributed_sampler",
    "teacher.trainer.accelerator",
)
"""Settings that may change when a run is resumed (patterns over dotted keys): the outputs, the epoch
count and the devices. Everything else must be what the run started with."""

REPLACEABLE_STATUSES: tuple[str, ...] = ("running", "failed", "interrupted", "dry_run")
"""A folder whose run is in one of these states, with no checkpoint and the same settings, holds no result
(nothing was trained in it; a run killed while the shared teacher trained, say): the same command may run
there again."""


def matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def flat_settings(container: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved config (plain dict) as `{dotted key: value}`; lists stay values, empty dicts too."""
    out: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = value

    walk({k: v for k, v in container.items() if k != "hydra"}, "")
    return out


def settings_digest(flat: Mapping[str, Any], ignore: Iterable[str] = RESUME_MUTABLE) -> str:
    """The digest of the settings not matched by `ignore` (the identity's `config`)."""
    patterns = tuple(ignore)
    return content_key({k: v for k, v in sorted(flat.items()) if not matches(k, patterns)})


def data_digest(record: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> str:
    """The identity's `data`: each file's digest (not the root: an identical copy is the same data) and
    the part each image is in."""
    parts = sorted((str(r["image"]), str(r["part"])) for r in rows)
    return content_key({"files": dict(sorted(record["files"].items())), "parts": parts})


def _show(value: Any) -> str:
    return "(unset)" if value is _UNSET else json.dumps(value, default=str)


_UNSET = object()


def describe_differences(
    old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = RESUME_MUTABLE, limit: int = 6
) -> str:
    """'model.name: "unet" -> "deeplab"; ...' for the settings that differ (`ignore` left out)."""
    patterns = tuple(ignore)
    keys = sorted(k for k in set(old) | set(new) if not matches(k, patterns))
    diffs = [
        f"{k}: {_show(old.get(k, _UNSET))} -> {_show(new.get(k, _UNSET))}"
        for k in keys
        if old.get(k, _UNSET) != new.get(k, _UNSET)
    ]
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def launched_child() -> bool:
    """True in a process that a distributed launcher started for rank 1+ (Lightning's DDP relaunch, a
    second node): it shares rank 0's run folder and writes nothing there."""
    for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"):
        value = os.environ.get(key, "0").strip() or "0"
        if value.isdigit() and int(value) > 0:
            return True
    return False


@dataclass
class RunFolder:
    """What a run folder holds, read without touching it."""

    path: Path
    summary: dict[str, Any] | None = None
    settings: dict[str, Any] | None = None  # flat settings from its config.yaml
    checkpoints: list[Path] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path | str) -> RunFolder:
        folder = cls(Path(path))
        if not folder.path.is_dir():
            return folder
        try:
            folder.summary = json.loads((folder.path / SUMMARY_FILE).read_text())
        except (OSError, ValueError):
            folder.summary = {"status": "unreadable"} if (folder.path / SUMMARY_FILE).exists() else None
        try:
            loaded = yaml.safe_load((folder.path / CONFIG_FILE).read_text())
            folder.settings = flat_settings(loaded) if isinstance(loaded, dict) else None
        except (OSError, yaml.YAMLError):
            folder.settings = None
        ckpt_dir = folder.path / CHECKPOINT_DIR
        folder.checkpoints = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
        return folder

    @property
    def status(self) -> str | None:
        return None if self.summary is None else str(self.summary.get("status", "unknown"))

    @property
    def holds_run(self) -> bool:
        return self.summary is not None or bool(self.checkpoints)

    @property
    def identity(self) -> dict[str, Any]:
        ident = (self.summary or {}).get("identity")
        return ident if isinstance(ident, dict) else {}

    def differences(self, config_digest: str, settings: Mapping[str, Any]) -> str:
        """'' when the folder's run has these settings (up to `RESUME_MUTABLE`), else what differs. The digest
        decides when it matches; otherwise its config.yaml is compared setting by setting (a run written
        before its summary recorded an identity, or under another list of resume-mutable settings)."""
        if self.identity.get("config") == config_digest:
            return ""
        if self.settings is None:
            return f"its settings are unknown (no readable {CONFIG_FILE})"
        return describe_differences(self.settings, settings)

    def describe(self) -> str:
        what = [f"status {self.status}"] if self.status else []
        if self.summary and self.summary.get("error"):
            what.append(f"error: {' '.join(str(self.summary['error']).split())[:120]}")
        if self.checkpoints:
            what.append(f"checkpoints: {', '.join(p.name for p in self.checkpoints)}")
        return "; ".join(what) or "files of a run"


def check_start(folder: RunFolder, config_digest: str, settings: Mapping[str, Any], resume: bool) -> str:
    """How this job may use `folder`: 'fresh' (a new run: the folder is empty, missing, or holds only a
    failed attempt of these very settings) or 'resume' (`resume=true`, the same run). Anything else is a
    UserError naming why, raised before anything is written."""
    where = folder.path
    if resume:
        if not where.is_dir():
            raise UserError(
                f"resume=true but the run folder {where} does not exist — pass hydra.run.dir=<the folder of "
                f"the run to continue> (paths.run_dir), or drop resume=true to start a new run"
            )
        if not folder.holds_run:
            raise UserError(
                f"resume=true but {where} holds no run (no {SUMMARY_FILE}, no {CHECKPOINT_DIR}/*.ckpt) — pass "
                f"the folder of the run to continue, or drop resume=true to start a new run"
            )
        diff = folder.differences(config_digest, settings)
        if diff:
            raise UserError(
                f"resume=true but {where} holds a run with other settings ({diff}) — resume with that run's "
                f"settings (only the epoch count, devices and output settings may change), or start a new run "
                f"in another folder"
            )
        return "resume"
    if not folder.holds_run:
        return "fresh"
    if (
        folder.status in REPLACEABLE_STATUSES
        and not folder.checkpoints
        and not folder.differences(config_digest, settings)
    ):
        return "fresh"
    raise UserError(
        f"run folder {where} already holds a run ({folder.describe()}) — choose another hydra.run.dir "
        f"(paths.run_dir), or pass resume=true to continue that run"
    )


def check_checkpoint(path: Path | str, setting: str = "checkpoint") -> None:
    """Stop before any work when a run's checkpoint is damaged (cut short, not a whole zip archive): one
    line naming it and the choices (`setting` names what pointed at it), the folder left as it is."""
    path = Path(path)
    problem = format_problem(path) if path.is_file() else None
    if problem is None:
        return
    others = [p.name for p in sorted(path.parent.glob("*.ckpt")) if p != path and format_problem(p) is None]
    earlier = (
        f"continue from an earlier checkpoint of the run (whole: {', '.join(others)}; copy one over "
        f"{path.name}, or pass ckpt_path=<it> to test it)"
        if others
        else f"move {path.name} aside to train the run again from its start with resume=true"
    )
    raise UserError(
        f"{setting} {path} is damaged ({problem}) — {earlier}, or start a new run in another folder"
    )
