"""The run folder: resolved config, `summary.json` and training curves; W&B finished with the run.

Only global rank 0 writes; every file is written atomically so a crash never leaves a half file. Test
predictions, overlays and curves are written by `callbacks.TestArtefacts` during the test loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mvtec_seg.io_utils import atomic_write_text
from mvtec_seg.summary import RunSummary

log = logging.getLogger(__name__)


class RunOutputs:
    """Collects the run's `RunSummary` as the job goes and writes the run folder."""

    def __init__(self, run_dir: Path, cfg: DictConfig) -> None:
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.summary = RunSummary(
            category=cfg.category.name,
            model=cfg.model.name,
            mask=cfg.mask.name if cfg.model.source == "fit" else "none",
            seed=int(cfg.seed),
            task_name=cfg.task_name,
            run_dir=str(self.run_dir),
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    def set_split(self, dm) -> None:
        self.summary.split = {
            "manifest": str(dm.manifest_path),
            **{f"n_{k}": v for k, v in dm.counts().items()},
        }

    def finish(
        self, status: str, trainer=None, wandb_logger=None, overlay_paths: Sequence[Path] = ()
    ) -> dict[str, Any]:
        """Write summary.json (and loss curves) and close W&B, whatever happens; returns the summary."""
        self.summary.status = status
        if trainer is not None and not trainer.is_global_zero:
            return self.summary.to_dict()
        try:
            metrics_csv = self.run_dir / "csv" / "metrics.csv"
            if metrics_csv.exists():
                from mvtec_seg.viz import plot_loss_curves

                try:
                    plot_loss_curves(metrics_csv, self.run_dir / "curves" / "training.png")
                except Exception as err:  # a plot must never cost the run its summary
                    log.warning("could not plot %s: %s", metrics_csv, err)
            self.summary.write(self.run_dir)
        finally:
            if wandb_logger is not None:
                from mvtec_seg.loggers import finish_wandb

                finish_wandb(wandb_logger, self.summary, list(overlay_paths), self.cfg)
        log.info("run folder: %s", self.run_dir)
        return self.summary.to_dict()
