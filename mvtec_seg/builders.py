"""Objects built from the composed config: the category folder, the datamodule, models and the Trainer.

Every stage (a run, the shared teacher, its maps) builds through here, so one setting means the same
thing everywhere: there is one Trainer factory and one model factory.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from mvtec_seg.callbacks import EpochProgress, ResumeCheckpoint, RngState, Throughput
from mvtec_seg.data.datamodule import MVTecDataModule
from mvtec_seg.data.layouts import (
    CATEGORIES,
    DATASET_NAMES,
    DEFAULT_LAYOUT,
    check_layout,
    official_train_has_defects,
)
from mvtec_seg.data.visa import DEFAULT_VISA_SPLIT, VISA_SPLITS
from mvtec_seg.errors import UserError
from mvtec_seg.interrupt import stage
from mvtec_seg.models.base import AnomalyModule


def layout(cfg: DictConfig) -> str:
    """`data.layout` (default `mvtec`), checked: one line naming the choices for another value."""
    return check_layout(cfg.data.get("layout", DEFAULT_LAYOUT))


def category_dir(cfg: DictConfig) -> Path:
    """The category folder; the synthetic categories are generated here on first use."""
    name = cfg.category.name
    root = Path(cfg.data.root)
    gen = cfg.category.get("generate")
    if gen:
        if layout(cfg) != DEFAULT_LAYOUT:
            raise UserError(
                f"category={name} is generated in the MVTec AD layout, not data.layout={layout(cfg)} — drop the "
                f"data.layout override or pick a {DATASET_NAMES[layout(cfg)]} category"
            )
        from mvtec_seg.data.synthetic import generate_category

        return generate_category(
            root, name=name, seed=int(cfg.seed), **OmegaConf.to_container(gen, resolve=True)
        )
    path = root / name
    if not path.is_dir():
        dataset = DATASET_NAMES[layout(cfg)]
        known = "" if name in CATEGORIES[layout(cfg)] else f" ('{name}' is not an {dataset} category name)"
        raise UserError(
            f"category folder not found: {path}{known} — set data.root=<folder holding {name}/> "
            f"(or MVTEC_ROOT), or use category=synthetic for the built-in demo data"
        )
    return path


def build_datamodule(
    cfg: DictConfig, train_subset: str = "all", batch_size: int | None = None, augment: bool | None = None
) -> MVTecDataModule:
    d = cfg.data
    protocol = d.get("protocol", "split")
    data_layout = layout(cfg)
    visa_split = str(d.get("visa_split", DEFAULT_VISA_SPLIT))
    segmenter = train_subset == "all" and cfg.model.get("source") == "fit"
    if protocol == "official" and segmenter and not official_train_has_defects(data_layout, visa_split):
        labelled = [s for s, has in VISA_SPLITS.items() if has]
        also = f"; for VisA, data.visa_split={' or '.join(labelled)}" if data_layout == "visa" else ""
        raise UserError(
            f"data.protocol=official: the train part holds normal images only, so model={cfg.model.name} with "
            f"mask={cfg.mask.name} would have no defective training images (and no defective val image) — "
            f"use data.protocol=split for segmenters{also}; the official protocol is for model=transfusion"
        )
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
        augment=bool(d.augment) if augment is None else augment,
        train_subset=train_subset,
        pin_memory=pin_memory(cfg),
        train_crop=d.get("train_crop"),
        shard_evaluation=not cfg.trainer.get("use_distributed_sampler", True),
        protocol=protocol,
        layout=data_layout,
        visa_split=visa_split,
    )


def pin_memory(cfg: DictConfig) -> bool:
    """`data.pin_memory`; ``auto``: page-locked batches when the run trains on a GPU. A batch copied from
    pageable memory makes the host wait for the GPU's queued work first (CUDA's rule for such copies), so
    every training step would end the overlap of host and device."""
    value = cfg.data.get("pin_memory", "auto")
    if isinstance(value, bool):
        return value
    if value != "auto":
        raise UserError(f"data.pin_memory={value!r} must be auto, true or false")
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def evaluation_settings(cfg: DictConfig) -> dict[str, float]:
    """The scoring settings a model's metrics take (never part of what its weights depend on)."""
    return {k: float(cfg.evaluation[k]) for k in ("iou_threshold", "fpr_limit")}


def build_module(target: str, params: DictConfig, cfg: DictConfig, **extra: Any) -> AnomalyModule:
    """An `AnomalyModule` from a class path and plain-dict parameters, scored under `cfg.evaluation`.

    Hydra's `instantiate`, not recursive: parameters stay plain dicts (optimizer and scheduler included, as
    `_target_` dicts instantiated in `configure_optimizers`) so checkpoints load with `weights_only=True`.
    """
    kwargs = OmegaConf.to_container(params, resolve=True) | extra
    node = {"_target_": target, **kwargs, "evaluation": evaluation_settings(cfg)}
    try:
        return instantiate(node, _recursive_=False, _convert_="all")
    except (InstantiationException, ImportError, TypeError, ValueError, KeyError, AttributeError) as err:
        err = err.__cause__ or err  # instantiate wraps the class's own error: name that one
        detail = " ".join(str(err).split())[:300]
        raise UserError(
            f"cannot build {target.rsplit('.', 1)[-1]} from its settings ({type(err).__name__}: {detail}) — "
            f"fix the model.params / teacher.params override"
        ) from None


def student_settings(cfg: DictConfig) -> dict[str, Any]:
    """What a segmenter takes from its mask source besides the targets: synthetic defects on its normal
    training images (`mask.synthetic_fraction`) and the distillation weight (`mask.distill.weight`)."""
    fraction = float(cfg.mask.get("synthetic_fraction") or 0.0)
    distill = float((cfg.mask.get("distill") or {}).get("weight") or 0.0)
    out: dict[str, Any] = {}
    if fraction > 0:
        out["synthetic"] = {"fraction": fraction, "kind": str(cfg.category.kind), "seed": int(cfg.seed)}
    if distill > 0:
        out["distill_weight"] = distill
    return out


def build_model(cfg: DictConfig) -> AnomalyModule:
    """The run's model as configured, untrained (`model.module` with `model.params`; a segmenter also
    with `student_settings`)."""
    module = build_module(
        cfg.model.module,
        cfg.model.params,
        cfg,
        **(student_settings(cfg) if cfg.model.get("source") == "fit" else {}),
    )
    return module


def max_epochs(cfg: DictConfig) -> int:
    """`trainer.max_epochs` when set, else the model's own."""
    return (
        int(cfg.trainer.max_epochs)
        if cfg.trainer.get("max_epochs") is not None
        else int(cfg.model.max_epochs)
    )


LAST_CHECKPOINT = "last.ckpt"


def resume_callbacks(dirpath: Path | str, every_s: float = 0.0) -> list[pl.Callback]:
    """What makes a training resumable after any kill: `<dirpath>/last.ckpt` (`ResumeCheckpoint`: at the end
    of an epoch at most every ``every_s`` seconds, and after the last; ``checkpoint.last_every_s``) and the
    RNG states in it."""
    return [ResumeCheckpoint(dirpath, every_s, filename=Path(LAST_CHECKPOINT).stem), RngState()]


DISTRIBUTED_KEYS: tuple[str, ...] = ("devices", "num_nodes", "strategy", "use_distributed_sampler")
"""Trainer settings that spread a job over processes; `one_device` drops them."""


def one_device(node: DictConfig) -> dict[str, Any]:
    """The run's trainer settings on one device: a stage that runs whole in one process even inside a
    multi-device job (a self-training round, the maps of a segmenter)."""
    settings = OmegaConf.to_container(node, resolve=True)
    return {k: v for k, v in settings.items() if k not in DISTRIBUTED_KEYS} | {"devices": 1}


def trainer_device(settings: DictConfig | dict[str, Any]) -> torch.device:
    """The one device a trainer node's `accelerator` names: a GPU for `gpu`/`cuda` (and `auto` when one is
    visible), else the CPU; what a stage that runs without a Trainer (the maps) computes on."""
    accelerator = str(settings.get("accelerator") or "auto")
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if gpu else "cpu")


def build_trainer(
    settings: DictConfig | dict[str, Any],
    callbacks: Sequence[pl.Callback] = (),
    logger: Any = False,
    **overrides: Any,
) -> pl.Trainer:
    """The one Trainer factory: a trainer node's settings (`trainer`, `teacher.trainer`, or `one_device`'s),
    then `overrides`; null settings are Lightning's defaults."""
    if isinstance(settings, DictConfig):
        settings = OmegaConf.to_container(settings, resolve=True)
    kwargs = {k: v for k, v in settings.items() if v is not None} | overrides
    callbacks = list(callbacks)
    # a terminal shows Lightning's bars; a log (no terminal, or bars off) a line per epoch instead
    kwargs["enable_progress_bar"] = bool(kwargs.get("enable_progress_bar", True)) and sys.stderr.isatty()
    if not kwargs["enable_progress_bar"] and (kwargs.get("max_epochs") or 1) > 1:
        callbacks.append(EpochProgress())
    try:
        return pl.Trainer(callbacks=callbacks, logger=logger, **kwargs)
    except (TypeError, ValueError, MisconfigurationException) as err:  # an unknown or refused setting
        detail = " ".join(str(err).split())[:300]
        raise UserError(
            f"Lightning refuses the trainer settings ({type(err).__name__}: {detail}) — fix the trainer.* "
            f"(or teacher.trainer.*) override"
        ) from None


@dataclass
class Fitted:
    """What a fit measured: its wall time and the `Throughput` callback's figures (when the trainer has one)."""

    train_s: float
    images_per_s: float | None
    images_seen: int


def fit(
    trainer: pl.Trainer, module: AnomalyModule, data: Any, label: str, resume: str | None = None
) -> Fitted:
    """The one training call of every stage (a run's segmenter, a selection candidate, a self-training
    round, the teacher): `trainer.fit` inside the interruptible stage `label`, timed.

    `data` is a LightningDataModule (train and val) or a train DataLoader (no validation)."""
    kind = "datamodule" if isinstance(data, pl.LightningDataModule) else "train_dataloaders"
    t0 = time.perf_counter()
    with stage(label):
        trainer.fit(module, **{kind: data}, ckpt_path=resume)
    train_s = time.perf_counter() - t0
    throughput = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
    return Fitted(
        train_s=train_s,
        images_per_s=throughput.images_per_s if throughput else None,
        images_seen=throughput.images_seen if throughput else 0,
    )
