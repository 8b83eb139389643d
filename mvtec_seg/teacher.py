"""The shared TransFusion teacher of a category: its key, training (once), loading, and its maps.

Each artefact is keyed by what it depends on (the weights by the teacher config, the data fingerprint,
seed and image size; the maps by the weights), built once under a lock and moved into place atomically,
so parallel sweep jobs share it and a changed setting never reuses stale files. An interrupted teacher
training resumes from its last epoch checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from mvtec_seg.builders import build_datamodule, build_module, build_trainer, evaluation_settings
from mvtec_seg.callbacks import Throughput
from mvtec_seg.errors import UserError
from mvtec_seg.io_utils import atomic_write_json, build_once, content_key, file_lock
from mvtec_seg.models.base import AnomalyModule, parameter_count

log = logging.getLogger(__name__)


@dataclass
class Teacher:
    """A ready teacher: the module, its record (`params`, `train_s`, `train_images_per_s`, ...), its folder."""

    module: AnomalyModule
    info: dict
    dir: Path

    @property
    def checkpoint(self) -> str:
        return str(self.info.get("checkpoint", self.dir / "model.ckpt"))


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
        "teacher": OmegaConf.to_container(cfg.teacher, resolve=True),
    }


def teacher_dir(cfg: DictConfig, dm) -> Path:
    return Path(cfg.paths.cache_dir) / "transfusion" / cfg.category.name / content_key(teacher_spec(cfg, dm))


def build_teacher(cfg: DictConfig) -> AnomalyModule:
    """The configured teacher, untrained."""
    return build_module(cfg.teacher.module, cfg.teacher.params, cfg)


def _train_teacher(cfg: DictConfig, final: Path) -> None:
    tc = cfg.teacher
    work = final.with_name(final.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "spec.json", {"config": OmegaConf.to_container(tc, resolve=True)})
    # TransFusion makes its own augmentations (rotation) with its anomalies: no flips
    dm = build_datamodule(cfg, train_subset="normal", batch_size=int(tc.batch_size), augment=False)
    module = build_teacher(cfg)
    throughput = Throughput()
    ckpt = pl.callbacks.ModelCheckpoint(
        dirpath=work,
        filename="last",
        monitor=None,
        save_top_k=1,
        every_n_epochs=1,
        enable_version_counter=False,
    )
    trainer = build_trainer(
        cfg,
        int(tc.max_epochs),
        [throughput, ckpt],
        pl.loggers.CSVLogger(str(work), name="", version=""),
        single_device=True,
        limit_train_batches=tc.get("limit_train_batches"),
        limit_val_batches=0,
        num_sanity_val_steps=0,
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


def load_teacher_checkpoint(cfg: DictConfig, path: Path) -> AnomalyModule:
    """A user's TransFusion checkpoint loaded into the configured architecture (strictly)."""
    module = build_teacher(cfg)
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


def ensure_teacher(cfg: DictConfig, dm) -> Teacher:
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
        return Teacher(module, info, final)
    if not (final / "model.ckpt").exists():
        with file_lock(final):
            if not (final / "model.ckpt").exists():
                log.warning(
                    "no TransFusion checkpoint for %s at %s: training it first", cfg.category.name, final
                )
                _train_teacher(cfg, final)
    module = get_class(cfg.teacher.module).load_from_checkpoint(final / "model.ckpt", map_location="cpu")
    module.configure_evaluation(**evaluation_settings(cfg))
    info = json.loads((final / "info.json").read_text())
    return Teacher(module, info, final)


def predict_maps(cfg: DictConfig, module: AnomalyModule, dm) -> np.ndarray:
    """A model's anomaly maps of every manifest image ([N,H,W] float16, manifest order)."""
    trainer = build_trainer(
        cfg, 1, single_device=True, limit_train_batches=None, limit_val_batches=0, num_sanity_val_steps=0
    )
    outputs = trainer.predict(module, dataloaders=dm.predict_dataloader())
    index = torch.cat([o["index"] for o in outputs]).numpy()
    maps = torch.cat([o["anomaly_map"] for o in outputs]).numpy()
    ordered = np.empty_like(maps, dtype=np.float16)
    ordered[index] = maps.astype(np.float16)
    return ordered


def teacher_maps(cfg: DictConfig, dm, teacher: Teacher) -> np.ndarray:
    """Anomaly maps of every manifest image ([N,H,W] float16, manifest order), computed once per teacher."""
    target = teacher.dir / "maps.npy"

    def build(tmp: Path) -> None:
        ordered = predict_maps(cfg, teacher.module, dm)
        with open(tmp, "wb") as fh:
            np.save(fh, ordered)

    build_once(target, build)
    return np.load(target, mmap_mode="r")
