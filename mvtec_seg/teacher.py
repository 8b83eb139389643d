"""The shared TransFusion teacher of a category: its key, training (once), loading, and its maps.

Each artefact is keyed by what it depends on (the weights by the teacher config, the bytes of the images it
trains on (`data.files`), seed and image size; the maps by the weights and the bytes of every image), built
once under a lock and moved into place atomically, so parallel sweep jobs share it and a changed setting or
file never reuses stale files (a rebuild caused by a file says which). An interrupted teacher training
resumes from its last epoch checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from mvtec_seg.builders import (
    LAST_CHECKPOINT,
    build_datamodule,
    build_module,
    build_trainer,
    evaluation_settings,
    fit,
    resume_callbacks,
    trainer_device,
)
from mvtec_seg.callbacks import Throughput
from mvtec_seg.data.files import announce_rebuild, files_key, write_record
from mvtec_seg.errors import UserError
from mvtec_seg.interrupt import stage
from mvtec_seg.io_utils import (
    atomic_write_json,
    build_once,
    content_key,
    damage,
    discard,
    file_lock,
    format_problem,
    write_proof,
)
from mvtec_seg.models.base import AnomalyModule, loader_maps, parameter_count, read_checkpoint
from mvtec_seg.models.transfusion.official import (
    infer_official_net,
    is_official_state_dict,
    net_differences,
    rename_official_keys,
)

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
    spec = _weights_spec(cfg, dm)
    protocol = cfg.data.get("protocol", "split")
    if getattr(dm, "decoding", None) is not None and not cfg.teacher.get("checkpoint"):
        spec = {**spec, "decoding": dm.decoding}  # 16-bit images: trained on pixels of these rules
    return spec if protocol == "split" else {**spec, "protocol": protocol}


def _weights_spec(cfg: DictConfig, dm) -> dict:
    ckpt = cfg.teacher.get("checkpoint")
    if ckpt:
        path = Path(ckpt).expanduser().resolve()
        if not path.is_file():
            raise UserError(
                f"teacher.checkpoint {path} not found — point it at a TransFusion .ckpt or an authors' "
                "{category}_model.pkl, or null to train"
            )
        stat = path.stat()
        return {
            "checkpoint": str(path),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "net": OmegaConf.to_container(cfg.teacher.params.net, resolve=True),
            "image_size": int(cfg.data.image_size),
        }
    return {
        "category": cfg.category.name,
        "data": files_key(teacher_data(dm)),
        "seed": int(cfg.seed),
        "image_size": int(cfg.data.image_size),
        "split_ratios": list(cfg.data.split_ratios),
        "teacher": _teacher_settings(cfg),
    }


NOT_IN_TEACHER_KEY: tuple[str, ...] = ("accelerator", "devices", "log_every_n_steps", "enable_progress_bar")
"""`teacher.trainer` settings that do not change the weights: a teacher trained on a GPU serves a CPU job."""


def _teacher_settings(cfg: DictConfig) -> dict:
    """The teacher config its weights depend on (the key of its folder)."""
    settings = OmegaConf.to_container(cfg.teacher, resolve=True)
    settings["trainer"] = {k: v for k, v in settings["trainer"].items() if k not in NOT_IN_TEACHER_KEY}
    return settings


def teacher_data(dm) -> dict:
    """The record of the files the teacher trains on: the known normals of the train part (`train/good`;
    a `test/good` image is unlabelled to the chain, `data.sources`)."""
    return dm.data_record(dm.indices("train", known_normal=True))


def teacher_dir(cfg: DictConfig, dm) -> Path:
    return Path(cfg.paths.cache_dir) / "transfusion" / cfg.category.name / content_key(teacher_spec(cfg, dm))


def build_teacher(cfg: DictConfig) -> AnomalyModule:
    """The configured teacher, untrained."""
    return build_module(cfg.teacher.module, cfg.teacher.params, cfg)


@stage("teacher training")
def _train_teacher(cfg: DictConfig, final: Path) -> None:
    tc = cfg.teacher
    work = final.with_name(final.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "spec.json", {"config": OmegaConf.to_container(tc, resolve=True)})
    # TransFusion makes its own augmentations (rotation) with its anomalies: no flips
    dm = build_datamodule(cfg, train_subset="known_normal", batch_size=int(tc.batch_size), augment=False)
    module = build_teacher(cfg)
    trainer = build_trainer(
        tc.trainer,
        [Throughput(), *resume_callbacks(work, cfg.checkpoint.last_every_s)],
        pl.loggers.CSVLogger(str(work), name="", version=""),
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    resume = work / LAST_CHECKPOINT
    problem = format_problem(resume) if resume.exists() else None
    if problem:
        log.warning("damaged cache artefact %s (%s): training the teacher from the start", resume, problem)
        resume.unlink()
    if resume.exists():
        log.info("resuming TransFusion training from %s", resume)
    fitted = fit(
        trainer, module, dm.train_dataloader(), "teacher training", str(resume) if resume.exists() else None
    )
    trainer.save_checkpoint(work / "model.ckpt", weights_only=False)
    atomic_write_json(
        work / "info.json",
        {
            "params": parameter_count(module),
            "epochs": int(trainer.current_epoch),
            "train_s": fitted.train_s,
            "train_images_per_s": fitted.images_per_s,
            "n_train_images": len(dm.indices("train", known_normal=True)),
            "images_seen": fitted.images_seen,  # this run's (a resumed one: since the resume)
        },
    )
    os.replace(work, final)


def is_official_checkpoint(path: Path) -> bool:
    """True when ``path`` is an authors' ``{category}_model.pkl`` (read memory-mapped: cheap)."""
    return is_official_state_dict(
        read_checkpoint(path, "pass a TransFusion .ckpt or an authors' <category>_model.pkl")
    )


def _load_official(cfg: DictConfig, path: Path, state: dict) -> AnomalyModule:
    """An official state_dict into the configured teacher, after checking the architecture agrees."""
    try:
        inferred = infer_official_net(state)
    except (KeyError, ValueError) as err:
        raise UserError(f"checkpoint {path} looks official but its network is not readable: {err}") from None
    log.info(
        "teacher.checkpoint %s is an official TransFusion checkpoint: inferred %s",
        path,
        ", ".join(f"{k}={v}" for k, v in inferred.items()),
    )
    diff = net_differences(OmegaConf.to_container(cfg.teacher.params.net, resolve=True), inferred)
    if diff:
        raise UserError(
            f"teacher.checkpoint {path} does not match teacher.params.net: {'; '.join(diff)} — use "
            f"experiment=transfusion_paper (the authors' checkpoints) or set teacher.params.net to these values"
        )
    module = build_teacher(cfg)
    module.model.net.load_state_dict(rename_official_keys(state), strict=True)
    return module


def load_teacher_checkpoint(cfg: DictConfig, path: Path) -> AnomalyModule:
    """A user's TransFusion checkpoint loaded into the configured architecture (strictly): one of ours
    (Lightning ``.ckpt``) or an authors' ``{category}_model.pkl`` (plain official state_dict)."""
    state = read_checkpoint(path, "pass a TransFusion .ckpt or an authors' <category>_model.pkl")
    if is_official_state_dict(state):
        return _load_official(cfg, path, state)
    module = build_teacher(cfg)
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


_WARNED_OVERLAP: set[tuple[str, str]] = set()


def teacher_overlap(cfg: DictConfig, dm) -> dict[str, int] | None:
    """Normal images of the val and test parts that an authors' checkpoint was trained on, or None.

    The official checkpoints saw every ``train/good`` image; our 7:1:2 split pools those with ``test/good``,
    so some land in val and test, where the teacher scores them lower than truly unseen ones (inflating its
    metrics and the quality of its pseudo masks). Warns once per checkpoint and manifest.
    """
    ckpt = cfg.teacher.get("checkpoint")
    path = Path(ckpt).expanduser() if ckpt else None
    if path is None or not path.is_file() or not is_official_checkpoint(path):
        return None  # a missing file is reported by `teacher_spec`
    rows = dm.prepare()["samples"]
    seen = {p: sum(r["part"] == p and r["source"] == "train" for r in rows) for p in ("val", "test")}
    key = (str(ckpt), str(dm.manifest_path))
    if any(seen.values()) and key not in _WARNED_OVERLAP:
        _WARNED_OVERLAP.add(key)
        log.warning(
            "teacher.checkpoint %s is an authors' checkpoint, trained on every train/good image: %d val and %d "
            "test normal images of this split were in its training set (recorded as teacher_overlap in "
            "summary.json) — data.protocol=official scores it as published",
            ckpt,
            seen["val"],
            seen["test"],
        )
    return seen


TEACHER_FILES: tuple[str, ...] = ("model.ckpt", "info.json")
"""What a trained teacher's proof covers (its maps, beside them, are artefacts of their own)."""


def _whole(final: Path, discard_damaged: bool = False) -> bool:
    """Whether the teacher in `final` is trained and whole; a damaged one (`discard_damaged`: under the lock)
    is named in one line and removed with its maps, to be trained again."""
    if not (final / "model.ckpt").exists():
        return False
    problem = damage(final, TEACHER_FILES)
    if problem is None:
        return True
    if discard_damaged:
        log.warning("damaged cache artefact %s (%s): training the teacher again", final, problem)
        discard(final)
    return False


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
    if not _whole(final):
        with file_lock(final):
            if not _whole(final, discard_damaged=True):
                log.warning(
                    "no TransFusion checkpoint for %s at %s: training it first", cfg.category.name, final
                )
                record = teacher_data(dm)
                announce_rebuild(final, record, f"the TransFusion teacher of {cfg.category.name}")
                _train_teacher(cfg, final)
                write_record(final, record)
                write_proof(final, TEACHER_FILES)
    module = get_class(cfg.teacher.module).load_from_checkpoint(final / "model.ckpt", map_location="cpu")
    module.configure_evaluation(**evaluation_settings(cfg))
    info = json.loads((final / "info.json").read_text())
    return Teacher(module, info, final)


def maps_dir(dm, teacher: Teacher) -> Path:
    """The folder of the teacher's maps of these images (their bytes, order and size)."""
    order = [r["image"] for r in dm.manifest["samples"]]
    spec = {"files": files_key(dm.data_record()), "order": order, "size": int(dm.image_size)}
    if getattr(dm, "decoding", None) is not None:  # 16-bit images: maps of pixels of these rules
        spec["decoding"] = dm.decoding
    return teacher.dir / "maps" / content_key(spec)


def predict_maps(settings: DictConfig | dict, module: AnomalyModule, dm) -> np.ndarray:
    """A model's anomaly maps of every manifest image ([N,H,W] float16, manifest order), on the device and
    at the precision of the trainer node `settings` (`models.base.loader_maps`)."""
    module.to(trainer_device(settings))
    maps, kept = loader_maps(module, dm.predict_dataloader(), ("index",), settings.get("precision"))
    ordered = np.empty(maps.shape, dtype=np.float16)
    ordered[kept["index"].numpy()] = maps.numpy().astype(np.float16)
    module.cpu()  # as a Trainer leaves it: the device memory free for the next stage
    return ordered


@stage("teacher maps")
def teacher_maps(cfg: DictConfig, dm, teacher: Teacher) -> np.ndarray:
    """Anomaly maps of every manifest image ([N,H,W] float16, manifest order), computed once per teacher and
    image set, in `maps_dir(dm, teacher) / "maps.npy"`."""
    folder = maps_dir(dm, teacher)
    record = dm.data_record()

    def build(tmp: Path) -> None:
        announce_rebuild(folder, record, f"the TransFusion maps of {cfg.category.name}")
        log.info("computing teacher maps of %d images into %s", len(dm.manifest["samples"]), folder)
        ordered = predict_maps(cfg.teacher.trainer, teacher.module, dm)
        tmp.mkdir(parents=True)
        np.save(tmp / "maps.npy", ordered)
        write_record(tmp, record)

    build_once(folder, build)
    return np.load(folder / "maps.npy", mmap_mode="r")
