"""The run folder: resolved config, `summary.json`, the data record and training curves; W&B finished.

A folder holds one run (`identity`). When it writes:

- a new run (`mode="fresh"`) claims its folder at once: `config.yaml` and a `running` summary with the
  settings digest, then the data digest and `files.json` once the data is read;
- a resumed run (`mode="resume"`) writes nothing until its data is known to be the run's; a refusal
  (other data) leaves the folder as it was. A resumed unfinished run then claims the folder as a new one
  does; a resumed *finished* run keeps its `summary.json` and `config.yaml` until it finishes again;
- a failure or interruption of a run whose folder held a finished run is written to
  `failed/<time>/summary.json`, never over the finished run's files.

Only global rank 0 writes; every file is written atomically so a crash never leaves a half file. Test
predictions, overlays and curves are written by `callbacks.TestArtefacts` during the test loop.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mvtec_seg.data.files import describe_changes
from mvtec_seg.data.sources import mask_source
from mvtec_seg.errors import UserError
from mvtec_seg.identity import (
    CONFIG_FILE,
    DATA_RECORD_FILE,
    RESUME_MUTABLE,
    RunFolder,
    data_digest,
    flat_settings,
    settings_digest,
)
from mvtec_seg.io_utils import atomic_write_json, atomic_write_text, file_digest
from mvtec_seg.summary import RunSummary

log = logging.getLogger(__name__)
FAILED_DIR = "failed"
PASSING = ("ok", "dry_run")


def _seed(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class RunOutputs:
    """Collects the run's `RunSummary` as the job goes and writes the run folder by the rules above."""

    def __init__(
        self,
        run_dir: Path,
        cfg: DictConfig,
        mode: str = "fresh",
        settings: Mapping[str, Any] | None = None,
        write: bool = True,
    ) -> None:
        self.run_dir, self.cfg, self.mode, self.write = Path(run_dir), cfg, mode, write
        settings = settings if settings is not None else _flat(cfg)
        self.previous = RunFolder.read(self.run_dir) if mode == "resume" else None
        fitted = cfg.model.get("source") == "fit"
        self.summary = RunSummary(
            category=str(cfg.category.get("name")),
            model=str(cfg.model.name),
            mask=cfg.mask.name if fitted else "none",
            seed=_seed(cfg.get("seed")),
            mask_variant=mask_source(cfg).variant(cfg) if fitted else None,
            protocol=mask_source(cfg).protocol(cfg) if fitted else "known normals",
            task_name=cfg.get("task_name"),
            run_dir=str(self.run_dir),
            identity={
                "config": settings_digest(settings),
                "data": None,
                "resume_mutable": list(RESUME_MUTABLE),
            },
        )
        self.claimed = False
        self.data_record: dict | None = None
        if mode == "fresh":
            self._claim()

    @property
    def keeps_finished_run(self) -> bool:
        """A resumed finished run: its files stay until this job finishes well."""
        return self.previous is not None and self.previous.status == "ok"

    def _claim(self) -> None:
        """Make the folder this run's: config, data record and a `running` summary."""
        self.claimed = True
        if not self.write or self.keeps_finished_run:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / CONFIG_FILE, OmegaConf.to_yaml(self.cfg, resolve=True))
        if self.data_record is not None:
            atomic_write_json(self.run_dir / DATA_RECORD_FILE, self.data_record)
        self.summary.write(self.run_dir)

    def set_labelled(self, rows: Sequence[Mapping[str, Any]], labelled: np.ndarray | None) -> None:
        """Record which defective train images kept their GT masks (`mask.gt_images`; None: not a budget)."""
        if labelled is not None:
            self.summary.labelled_images = [str(rows[int(i)]["image"]) for i in labelled]
            self.summary.n_labelled = len(labelled)

    def set_data(self, dm) -> None:
        """Record the data the run read (its digest in the identity); a resumed run must have read the same
        data, else a UserError says what changed and nothing is written."""
        self.summary.split = {
            "manifest": str(dm.manifest_path),
            **{f"n_{k}": v for k, v in dm.counts().items()},
        }
        self.data_record = dm.data_record(masks=True)
        digest = data_digest(self.data_record, dm.manifest["samples"])
        self.summary.identity = {**(self.summary.identity or {}), "data": digest}
        if self.mode == "resume":
            self._check_same_data(digest)
        self._claim()

    def _check_same_data(self, digest: str) -> None:
        assert self.previous is not None
        before = self.previous.identity.get("data")
        if before is None:
            log.warning("%s recorded no data digest: cannot check that the data is the run's", self.run_dir)
            return
        if before == digest:
            return
        change = None
        try:
            old = json.loads((self.run_dir / DATA_RECORD_FILE).read_text())
            change = describe_changes(old, self.data_record)
        except (OSError, ValueError):
            pass
        raise UserError(
            f"resume=true but the data differs from the data of the run in {self.run_dir} "
            f"({change or 'the files or the split parts differ'}) — resume with the run's data and "
            f"data.split_ratios, or start a new run in another folder"
        )

    def _failure_dir(self) -> Path:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S") + f"_{time.time_ns() % 1_000_000_000:09d}"
        return self.run_dir / FAILED_DIR / stamp

    def finish(
        self, status: str, trainer=None, wandb_logger=None, overlay_paths: Sequence[Path] = ()
    ) -> dict[str, Any]:
        """Write summary.json (and loss curves) and close W&B, whatever happens; returns the summary.

        Nothing is written by a job that never claimed its folder (a refused resume), nor by rank 1+."""
        self.summary.status = status
        if trainer is not None and not trainer.is_global_zero:
            return self.summary.to_dict()
        try:
            if self.write and self.claimed and not (self.mode == "resume" and status == "dry_run"):
                self._write(status)
        finally:
            if wandb_logger is not None:
                from mvtec_seg.loggers import finish_wandb

                finish_wandb(wandb_logger, self.summary, list(overlay_paths), self.cfg)
        return self.summary.to_dict()

    def _write(self, status: str) -> None:
        if status not in PASSING and self.keeps_finished_run:
            where = self._failure_dir()
            self.summary.write(where)
            log.warning("the run in %s had finished: this failure is recorded in %s", self.run_dir, where)
            return
        metrics_csv = self.run_dir / "csv" / "metrics.csv"
        if metrics_csv.exists():
            from mvtec_seg.viz import plot_loss_curves

            try:
                plot_loss_curves(metrics_csv, self.run_dir / "curves" / "training.png")
            except Exception as err:  # a plot must never cost the run its summary
                log.warning("could not plot %s: %s", metrics_csv, err)
        if status == "ok" and self.summary.checkpoint and Path(self.summary.checkpoint).is_file():
            self.summary.checkpoint_digest = file_digest(self.summary.checkpoint)
        if self.keeps_finished_run:  # finished again: now its config and record are this job's
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / CONFIG_FILE, OmegaConf.to_yaml(self.cfg, resolve=True))
            if self.data_record is not None:
                atomic_write_json(self.run_dir / DATA_RECORD_FILE, self.data_record)
        self.summary.write(self.run_dir)
        log.info("run folder: %s", self.run_dir)


def _flat(cfg: DictConfig) -> dict[str, Any]:
    return flat_settings(OmegaConf.to_container(cfg, resolve=True))
