"""`train(cfg) -> summary`: the whole job for one (category, model, mask), pure apart from its outputs.

One path through a run: check the data and split it; get the model (`model.source=fit`: train a segmenter
on the mask source; `teacher`: the shared TransFusion teacher, trained once per category in the cache);
test it on the test part; record and finish. `dry_run=true` stops after building the model and trainer.
`__main__` is a thin Hydra wrapper around this, so tests compose configs and call it directly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig

from mvtec_seg.builders import build_datamodule, build_model, build_trainer, max_epochs
from mvtec_seg.callbacks import TestArtefacts, Throughput
from mvtec_seg.data.datamodule import MVTecDataModule
from mvtec_seg.errors import UserError
from mvtec_seg.loggers import run_loggers
from mvtec_seg.models.base import AnomalyModule, parameter_count
from mvtec_seg.outputs import RunOutputs
from mvtec_seg.pseudo.masks import ensure_pseudo_masks, load_targets
from mvtec_seg.pseudo.self_training import self_train
from mvtec_seg.teacher import ensure_teacher

log = logging.getLogger(__name__)
MODEL_SOURCES = ("fit", "teacher")


@dataclass
class RunParts:
    """The run trainer's callbacks and W&B logger, read after fitting and testing."""

    throughput: Throughput
    artefacts: TestArtefacts
    checkpoint: pl.callbacks.ModelCheckpoint
    wandb: Any | None


def run_trainer(cfg: DictConfig, run_dir: Path) -> tuple[pl.Trainer, RunParts]:
    """The run's Trainer: checkpoints (best by `checkpoint.monitor`), loggers, throughput, test artefacts."""
    ev = cfg.evaluation
    monitor = cfg.checkpoint.monitor
    parts = RunParts(
        throughput=Throughput(),
        artefacts=TestArtefacts(run_dir, ev.iou_threshold, ev.fpr_limit, ev.max_overlays),
        checkpoint=pl.callbacks.ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="best",
            monitor=monitor,
            mode=cfg.checkpoint.mode,
            save_last=monitor is not None,
            save_top_k=1,
        ),
        wandb=None,
    )
    loggers, parts.wandb = run_loggers(cfg, run_dir)
    trainer = build_trainer(
        cfg,
        max_epochs(cfg),
        [parts.throughput, parts.artefacts, parts.checkpoint],
        loggers or False,
        enable_checkpointing=True,
        default_root_dir=str(run_dir),
    )
    return trainer, parts


def _fit(
    cfg: DictConfig, model: AnomalyModule, dm, trainer: pl.Trainer, parts: RunParts, out: RunOutputs
) -> str | None:
    """Train (or resume) the segmenter; records and returns the checkpoint to test (`ckpt_path` if given,
    else the best)."""
    if cfg.ckpt_path is not None:
        out.summary.checkpoint = str(cfg.ckpt_path)
        return out.summary.checkpoint
    last = out.run_dir / "checkpoints" / "last.ckpt"
    resume = str(last) if cfg.get("resume") and last.exists() else None
    if resume:
        log.warning("resuming training from %s", last)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=resume)
    out.summary.time["train_s"] = time.perf_counter() - t0
    out.summary.throughput["train_images_per_s"] = parts.throughput.images_per_s
    out.summary.checkpoint = parts.checkpoint.best_model_path or None
    return out.summary.checkpoint


def _set_pseudo_targets(cfg: DictConfig, dm: MVTecDataModule) -> dict:
    """Put the pseudo targets (and loss weights) on `dm`: the teacher's, or after `mask.rounds` rounds of
    self-training; returns their record (thresholds, quality vs GT of every round)."""
    _, info = ensure_pseudo_masks(cfg, dm)
    info = self_train(cfg, dm, info)
    dm.set_target_masks(*load_targets(info))
    return info


def _prepare_model(cfg: DictConfig, dm: MVTecDataModule, out: RunOutputs) -> AnomalyModule:
    """The model to test, recorded in the summary: the ensured teacher, or an untrained segmenter whose
    targets (GT, or pseudo masks built on first use) are set on `dm`."""
    if cfg.model.source == "teacher":
        teacher = ensure_teacher(cfg, dm)
        out.summary.params = teacher.info["params"]
        out.summary.time["train_s"] = teacher.info["train_s"]
        out.summary.throughput["train_images_per_s"] = teacher.info["train_images_per_s"]
        out.summary.checkpoint = teacher.checkpoint
        return teacher.module
    if cfg.mask.name == "pseudo":
        out.summary.pseudo = _set_pseudo_targets(cfg, dm)
    model = build_model(cfg)
    out.summary.params = parameter_count(model)
    return model


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job and return its summary (also written to `<run_dir>/summary.json`)."""
    if cfg.model.get("source") not in MODEL_SOURCES:
        raise UserError(f"model.source={cfg.model.get('source')!r} must be one of {MODEL_SOURCES}")
    pl.seed_everything(int(cfg.seed), workers=True)
    run_dir = Path(cfg.paths.run_dir)
    out = RunOutputs(run_dir, cfg)
    dm = build_datamodule(cfg, train_subset="all")
    dm.prepare()  # scans, validates and splits: bad data stops here, before any training
    out.set_split(dm)

    if cfg.dry_run:  # build the model the run would score and its trainer; train nothing
        out.summary.params = parameter_count(build_model(cfg))
        trainer, _ = run_trainer(cfg, run_dir)
        return out.finish(status="dry_run", trainer=trainer)

    model = _prepare_model(cfg, dm, out)
    trainer, parts = run_trainer(cfg, run_dir)
    status = "failed"
    try:
        ckpt_path = _fit(cfg, model, dm, trainer, parts, out) if cfg.model.source == "fit" else None
        trainer.test(model, datamodule=dm, ckpt_path=ckpt_path, verbose=False)
        out.summary.metrics = dict(model.computed_metrics["test"])
        test_s = parts.throughput.test_s
        out.summary.time["test_s"] = test_s
        if parts.artefacts.n_images and test_s:
            out.summary.throughput["test_images_per_s"] = parts.artefacts.n_images / test_s
        status = "ok"
    finally:
        out.finish(status, trainer, parts.wandb, parts.artefacts.overlay_paths)
    return out.summary.to_dict()
