"""`train(cfg) -> metrics`: the whole job for one (category, model, mask), pure apart from its outputs.

`__main__` is a thin Hydra wrapper around this, so tests compose configs and call it directly.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from mvtec_seg.callbacks import Throughput
from mvtec_seg.data.datamodule import MVTecDataModule
from mvtec_seg.data.mvtec import MVTEC_CATEGORIES
from mvtec_seg.errors import UserError
from mvtec_seg.outputs import RunOutputs, parameter_count

log = logging.getLogger(__name__)


def category_dir(cfg: DictConfig) -> Path:
    """The category folder; the synthetic categories are generated here on first use."""
    name = cfg.category.name
    root = Path(cfg.data.root)
    gen = cfg.category.get("generate")
    if gen:
        from mvtec_seg.data.synthetic import generate_category

        return generate_category(
            root, name=name, seed=int(cfg.seed), **OmegaConf.to_container(gen, resolve=True)
        )
    path = root / name
    if not path.is_dir():
        known = "" if name in MVTEC_CATEGORIES else f" ('{name}' is not an MVTec AD category name)"
        raise UserError(
            f"category folder not found: {path}{known} — set data.root=<folder holding {name}/> "
            f"(or MVTEC_ROOT), or use category=synthetic for the built-in demo data"
        )
    return path


def build_datamodule(
    cfg: DictConfig, train_subset: str = "all", batch_size: int | None = None
) -> MVTecDataModule:
    d = cfg.data
    return MVTecDataModule(
        category_dir=category_dir(cfg),
        cache_dir=cfg.paths.cache_dir,
        category=cfg.category.name,
        seed=int(cfg.seed),
        image_size=int(d.image_size),
        batch_size=int(batch_size or d.batch_size),
        eval_batch_size=int(d.eval_batch_size),
        num_workers=int(d.num_workers),
        decode_workers=int(d.decode_workers),
        split_ratios=tuple(d.split_ratios),
        augment=bool(d.augment),
        train_subset=train_subset,
        train_crop=d.get("train_crop"),
    )


def build_trainer(
    cfg: DictConfig,
    run_dir: Path | None,
    monitor: str | None,
    max_epochs: int,
    extra_callbacks: list | None = None,
    overrides: dict | None = None,
) -> tuple[pl.Trainer, dict[str, Any]]:
    """Trainer from the `trainer` group; `run_dir=None` gives a quiet trainer without logs or checkpoints."""
    tcfg = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if v is not None}
    tcfg.pop("max_epochs", None)
    tcfg.update(overrides or {})
    parts: dict[str, Any] = {"throughput": Throughput()}
    callbacks: list = [parts["throughput"], *(extra_callbacks or [])]
    loggers: list = []
    if run_dir is not None:
        ckpt = pl.callbacks.ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="best",
            monitor=monitor,
            mode=cfg.checkpoint.mode,
            save_last=monitor is not None,
            save_top_k=1,
        )
        parts["checkpoint"] = ckpt
        callbacks.append(ckpt)
        if cfg.logger.csv:
            loggers.append(pl.loggers.CSVLogger(save_dir=str(run_dir), name="csv", version=""))
        if cfg.logger.get("wandb"):
            from mvtec_seg.wandb_utils import make_wandb_logger

            parts["wandb"] = make_wandb_logger(cfg, run_dir)
            loggers.append(parts["wandb"])
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=loggers or False,
        enable_checkpointing=run_dir is not None,
        default_root_dir=str(run_dir) if run_dir else None,
        **tcfg,
    )
    return trainer, parts


def max_epochs_for(cfg: DictConfig, model_epochs: int) -> int:
    return int(cfg.trainer.max_epochs) if cfg.trainer.get("max_epochs") is not None else int(model_epochs)


def build_segmenter(cfg: DictConfig) -> pl.LightningModule:
    params = OmegaConf.to_container(cfg.model.params, resolve=True)
    evaluation = {k: cfg.evaluation[k] for k in ("iou_threshold", "fpr_limit")}
    return get_class(cfg.model.module)(**params, evaluation=evaluation)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job and return its summary (also written to `<run_dir>/summary.json`)."""
    pl.seed_everything(int(cfg.seed), workers=True)
    run_dir = Path(cfg.paths.run_dir)
    out = RunOutputs(run_dir, cfg)
    dm = build_datamodule(cfg, train_subset="all")
    dm.prepare()  # scans, validates and splits: bad data stops here, before any training
    out.set_split(dm)

    if cfg.model.name == "transfusion":
        from mvtec_seg.pseudo.stage import evaluate_teacher

        return evaluate_teacher(cfg, dm, out)

    if cfg.mask.name == "pseudo" and not cfg.dry_run:
        from mvtec_seg.pseudo.stage import ensure_pseudo_masks

        masks, info = ensure_pseudo_masks(cfg, dm)
        dm.set_target_masks(masks)
        out.summary["pseudo"] = info

    model = build_segmenter(cfg)
    out.summary["params"] = parameter_count(model)
    trainer, parts = build_trainer(cfg, run_dir, cfg.model.monitor, max_epochs_for(cfg, cfg.model.max_epochs))
    if cfg.dry_run:
        return out.finish(status="dry_run", trainer=trainer)
    try:
        if cfg.ckpt_path is None:
            last = run_dir / "checkpoints" / "last.ckpt"
            resume = str(last) if cfg.get("resume") and last.exists() else None
            if resume:
                log.warning("resuming training from %s", last)
            t0 = time.perf_counter()
            trainer.fit(model, datamodule=dm, ckpt_path=resume)
            out.summary["time"]["train_s"] = time.perf_counter() - t0
            out.summary["throughput"]["train_images_per_s"] = parts["throughput"].images_per_s
            best = parts["checkpoint"].best_model_path
            ckpt_path = best if best else None
        else:
            ckpt_path = str(cfg.ckpt_path)
        out.summary["checkpoint"] = ckpt_path
        t0 = time.perf_counter()
        trainer.test(model, datamodule=dm, ckpt_path=ckpt_path, verbose=False)
        out.record_test(trainer, model, dm, time.perf_counter() - t0)
        return out.finish(status="ok", trainer=trainer, wandb_logger=parts.get("wandb"))
    except BaseException:
        out.finish(status="failed", trainer=trainer, wandb_logger=parts.get("wandb"))
        raise
