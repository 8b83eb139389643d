"""Run loggers: CSV always, Weights & Biases offline by default, grouped by sweep, tagged by cell."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from mvtec_seg.summary import RunSummary


def run_loggers(cfg: DictConfig, run_dir: Path) -> tuple[list[Any], Any | None]:
    """The run's loggers (`logger` group) and the W&B logger among them, if any."""
    loggers: list[Any] = []
    if cfg.logger.csv:
        loggers.append(pl.loggers.CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    wandb_logger = make_wandb_logger(cfg, run_dir) if cfg.logger.get("wandb") else None
    if wandb_logger is not None:
        loggers.append(wandb_logger)
    return loggers, wandb_logger


def make_wandb_logger(cfg: DictConfig, run_dir: Path):
    from pytorch_lightning.loggers import WandbLogger

    w = cfg.logger.wandb
    os.environ.setdefault("WANDB_MODE", str(w.mode))
    return WandbLogger(
        project=w.project,
        entity=w.entity,
        name=cfg.task_name,
        save_dir=str(run_dir),
        group=cfg.group,
        tags=[str(t) for t in cfg.tags],
        config=OmegaConf.to_container(cfg, resolve=True),
        mode=str(os.environ.get("WANDB_MODE", w.mode)),
    )


def finish_wandb(logger, summary: RunSummary, overlay_paths: list, cfg: DictConfig) -> None:
    """Log the overlay panels and the run summary, then finish the run (failed runs finish with exit code 1)."""
    import wandb

    run = logger.experiment
    limit = int(cfg.logger.wandb.get("log_overlays", 16))
    if overlay_paths and limit > 0:
        run.log({"test/overlays": [wandb.Image(str(p), caption=Path(p).stem) for p in overlay_paths[:limit]]})
    data = summary.to_dict()
    flat = {k: v for k, v in data.items() if isinstance(v, int | float | str) and v is not None}
    flat.update({f"time/{k}": v for k, v in summary.time.items() if v is not None})
    flat.update({f"throughput/{k}": v for k, v in summary.throughput.items() if v is not None})
    flat.update(dict(summary.metrics))
    run.summary.update(flat)
    wandb.finish(exit_code=0 if summary.status in ("ok", "dry_run") else 1)
