"""Weights & Biases: offline by default, grouped by sweep and tagged by category/model/mask."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


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


def finish_wandb(logger, summary: dict, overlay_paths: list, cfg: DictConfig) -> None:
    """Log the overlay panels and the run summary, then finish the run (failed runs finish with exit code 1)."""
    import wandb

    run = logger.experiment
    limit = int(cfg.logger.wandb.get("log_overlays", 16))
    if overlay_paths and limit > 0:
        run.log({"test/overlays": [wandb.Image(str(p), caption=Path(p).stem) for p in overlay_paths[:limit]]})
    flat = {k: v for k, v in summary.items() if isinstance(v, int | float | str) and v is not None}
    flat.update({f"time/{k}": v for k, v in summary["time"].items() if v is not None})
    flat.update({f"throughput/{k}": v for k, v in summary["throughput"].items() if v is not None})
    flat.update({k: v for k, v in summary["metrics"].items()})
    run.summary.update(flat)
    wandb.finish(exit_code=0 if summary["status"] in ("ok", "dry_run") else 1)
