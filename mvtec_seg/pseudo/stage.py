"""Shared TransFusion stages: train the teacher, map every manifest image, threshold into pseudo masks.

Each artefact is keyed by what it depends on (the teacher by its config, the data fingerprint, seed and
image size; the maps by the teacher; the masks by the teacher and the threshold settings), built once under
a lock, and moved into place atomically, so parallel sweep jobs share it and a changed setting never
reuses stale files. An interrupted teacher training resumes from its last epoch checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from mvtec_seg.callbacks import Throughput
from mvtec_seg.errors import UserError
from mvtec_seg.io_utils import atomic_save_png, atomic_write_json, build_once, file_lock
from mvtec_seg.metrics import precision_recall_iou
from mvtec_seg.outputs import RunOutputs, parameter_count
from mvtec_seg.pseudo.thresholds import choose_threshold

log = logging.getLogger(__name__)


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def teacher_spec(cfg: DictConfig, dm) -> dict:
    """Everything the teacher's weights depend on (for a user-supplied checkpoint: that file)."""
    ckpt = cfg.teacher.get("checkpoint")
    if ckpt:
        path = Path(ckpt).expanduser().resolve()
        if not path.is_file():
            raise UserError(
                f"teacher.checkpoint {path} not found — point it at a TransFusion .ckpt, or null to train"
            )
        stat = path.stat()
        return {
            "checkpoint": str(path),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "net": OmegaConf.to_container(cfg.teacher.params.net, resolve=True),
            "fingerprint": dm.manifest["fingerprint"],
            "image_size": int(cfg.data.image_size),
        }
    return {
        "category": cfg.category.name,
        "fingerprint": dm.manifest["fingerprint"],
        "seed": int(cfg.seed),
        "image_size": int(cfg.data.image_size),
        "split_ratios": list(cfg.data.split_ratios),
        "teacher": _weights_config(cfg),
    }


def _weights_config(cfg: DictConfig) -> dict:
    """The teacher config minus what only affects scoring (so changing the IoU threshold never retrains)."""
    spec = OmegaConf.to_container(cfg.teacher, resolve=True)
    spec["params"].pop("evaluation", None)
    return spec


def teacher_dir(cfg: DictConfig, dm) -> Path:
    return Path(cfg.paths.cache_dir) / "transfusion" / cfg.category.name / _key(teacher_spec(cfg, dm))


def _teacher_trainer(cfg: DictConfig, max_epochs: int, callbacks: list, logger, limit_train) -> pl.Trainer:
    """A single-device trainer (accelerator and precision from the trainer group) for the shared stage."""
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs = {
        k: t[k]
        for k in ("accelerator", "precision", "deterministic", "log_every_n_steps", "enable_progress_bar")
        if t.get(k) is not None
    }
    return pl.Trainer(
        max_epochs=max_epochs,
        devices=1,
        callbacks=callbacks,
        logger=logger,
        limit_train_batches=limit_train,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _train_teacher(cfg: DictConfig, final: Path) -> None:
    from mvtec_seg.train import build_datamodule

    tc = cfg.teacher
    work = final.with_name(final.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "spec.json", {"config": OmegaConf.to_container(tc, resolve=True)})
    dm = build_datamodule(cfg, train_subset="normal", batch_size=int(tc.batch_size))
    dm.augment = False  # TransFusion makes its own augmentations (rotation) with its anomalies
    module = get_class(tc.module)(**OmegaConf.to_container(tc.params, resolve=True))
    throughput = Throughput()
    ckpt = pl.callbacks.ModelCheckpoint(
        dirpath=work,
        filename="last",
        monitor=None,
        save_top_k=1,
        every_n_epochs=1,
        enable_version_counter=False,
    )
    trainer = _teacher_trainer(
        cfg,
        int(tc.max_epochs),
        [throughput, ckpt],
        pl.loggers.CSVLogger(str(work), name="", version=""),
        tc.get("limit_train_batches"),
    )
    resume = work / "last.ckpt"
    if resume.exists():
        log.info("resuming TransFusion training from %s", resume)
    t0 = time.perf_counter()
    trainer.fit(
        module, train_dataloaders=dm.train_dataloader(), ckpt_path=str(resume) if resume.exists() else None
    )
    trainer.save_checkpoint(work / "model.ckpt", weights_only=False)
    atomic_write_json(
        work / "info.json",
        {
            "params": parameter_count(module),
            "epochs": int(trainer.current_epoch),
            "train_s": time.perf_counter() - t0,
            "train_images_per_s": throughput.images_per_s,
            "n_train_images": len(dm.indices("train", normal_only=True)),
        },
    )
    os.replace(work, final)


def load_teacher_checkpoint(cfg: DictConfig, path: Path) -> pl.LightningModule:
    """A user's TransFusion checkpoint loaded into the configured architecture (strictly)."""
    module = get_class(cfg.teacher.module)(**OmegaConf.to_container(cfg.teacher.params, resolve=True))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise UserError(
            f"checkpoint {path} does not match the TransFusion architecture in teacher.params.net ({detail}) — "
            f"set teacher.params.net to the settings it was trained with"
        ) from None
    return module


def ensure_teacher(cfg: DictConfig, dm) -> tuple[pl.LightningModule, dict, Path]:
    """The trained teacher for this category and config: loaded if it exists, trained (once) if not."""
    final = teacher_dir(cfg, dm)
    if cfg.teacher.get("checkpoint"):
        module = load_teacher_checkpoint(cfg, Path(cfg.teacher.checkpoint).expanduser())
        info = {
            "params": parameter_count(module),
            "train_s": None,
            "train_images_per_s": None,
            "checkpoint": str(cfg.teacher.checkpoint),
        }
        final.mkdir(parents=True, exist_ok=True)
        return module, info, final
    if not (final / "model.ckpt").exists():
        with file_lock(final):
            if not (final / "model.ckpt").exists():
                log.warning(
                    "no TransFusion checkpoint for %s at %s: training it first", cfg.category.name, final
                )
                _train_teacher(cfg, final)
    module = get_class(cfg.teacher.module).load_from_checkpoint(final / "model.ckpt", map_location="cpu")
    module.configure_evaluation(**{k: cfg.evaluation[k] for k in ("iou_threshold", "fpr_limit")})
    info = json.loads((final / "info.json").read_text())
    return module, info, final


def teacher_maps(cfg: DictConfig, dm, module: pl.LightningModule, tdir: Path) -> np.ndarray:
    """Anomaly maps of every manifest image ([N,H,W] float16, manifest order), computed once per teacher."""
    target = tdir / "maps.npy"

    def build(tmp: Path) -> None:
        trainer = _teacher_trainer(cfg, 1, [], False, None)
        outputs = trainer.predict(module, dataloaders=dm.predict_dataloader())
        index = torch.cat([o["index"] for o in outputs]).numpy()
        maps = torch.cat([o["anomaly_map"] for o in outputs]).numpy()
        ordered = np.empty_like(maps, dtype=np.float16)
        ordered[index] = maps.astype(np.float16)
        with open(tmp, "wb") as fh:
            np.save(fh, ordered)

    build_once(target, build)
    return np.load(target, mmap_mode="r")


def ensure_pseudo_masks(cfg: DictConfig, dm) -> tuple[np.ndarray, dict]:
    """Binary pseudo masks ([N,H,W] uint8, manifest order) and their record (threshold, quality vs GT)."""
    module, tinfo, tdir = ensure_teacher(cfg, dm)
    maps = teacher_maps(cfg, dm, module, tdir)
    th = OmegaConf.to_container(cfg.mask.threshold, resolve=True)
    pdir = tdir / "pseudo" / _key(th)
    rows = dm.manifest["samples"]

    def build(tmp: Path) -> None:
        log.warning("building pseudo masks for %s (%s) in %s", cfg.category.name, th, pdir)
        train_idx = dm.indices("train")
        threshold = choose_threshold(
            maps,
            train_idx,
            dm.indices("train", normal_only=True),
            th["strategy"],
            th.get("quantile", 0.995),
            th.get("fixed", 0.5),
        )
        masks = (np.asarray(maps, dtype=np.float32) >= threshold).astype(np.uint8)
        tmp.mkdir(parents=True)
        np.save(tmp / "masks.npy", masks)
        for i, row in enumerate(rows):
            name = f"{i:05d}_{row['defect_type']}_{Path(row['image']).stem}.png"
            atomic_save_png(tmp / "png" / name, masks[i] * 255)
        quality = {
            part: precision_recall_iou(masks[dm.indices(part)], np.asarray(dm.gt_masks[dm.indices(part)]))
            for part in ("train", "val", "test")
        }
        atomic_write_json(
            tmp / "info.json",
            {
                "threshold": threshold,
                "settings": th,
                "teacher": str(tdir),
                "quality": quality,
                "n": len(rows),
            },
        )

    build_once(pdir, build)
    info = json.loads((pdir / "info.json").read_text())
    info["dir"] = str(pdir)
    info["strategy"] = th["strategy"]
    return np.load(pdir / "masks.npy"), info


def evaluate_teacher(cfg: DictConfig, dm, out: RunOutputs) -> dict:
    """`model=transfusion`: train (or load) the shared teacher and score it on the test part like any model."""
    from mvtec_seg.train import build_trainer

    if cfg.dry_run:  # compose and check everything, train nothing
        return out.finish(status="dry_run")
    module, tinfo, tdir = ensure_teacher(cfg, dm)
    out.summary["params"] = tinfo["params"]
    out.summary["time"]["train_s"] = tinfo["train_s"]
    out.summary["throughput"]["train_images_per_s"] = tinfo["train_images_per_s"]
    out.summary["checkpoint"] = tinfo.get("checkpoint", str(tdir / "model.ckpt"))
    trainer, parts = build_trainer(cfg, out.run_dir, None, 1)
    try:
        t0 = time.perf_counter()
        trainer.test(module, datamodule=dm, verbose=False)
        out.record_test(trainer, module, dm, time.perf_counter() - t0)
        return out.finish(status="ok", trainer=trainer, wandb_logger=parts.get("wandb"))
    except BaseException:
        out.finish(status="failed", trainer=trainer, wandb_logger=parts.get("wandb"))
        raise


__all__ = ["ensure_pseudo_masks", "ensure_teacher", "evaluate_teacher", "teacher_maps"]
