"""`train(cfg) -> summary`: the whole job for one (category, model, mask), pure apart from its outputs.

One path through a run: check the data and split it; get the model (`model.source=fit`: train a segmenter
on the mask source; `teacher`: the shared TransFusion teacher, trained once per category in the cache);
test it on the test part; record and finish. `dry_run=true` stops after building every model the run would
use (the teacher included) and the trainer. Whatever happens, `summary.json` is written: `ok`, `dry_run`,
`failed` or `interrupted`, with the one-line reason in `error`. `resume=true` continues the segmenter from
`<run_dir>/checkpoints/last.ckpt` (weights, optimizer, scheduler, epoch, RNG states).
`__main__` is a thin Hydra wrapper around this, so tests compose configs and call it directly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from mvtec_seg.builders import (
    LAST_CHECKPOINT,
    build_datamodule,
    build_model,
    build_trainer,
    max_epochs,
    resume_callbacks,
)
from mvtec_seg.callbacks import TestArtefacts, Throughput
from mvtec_seg.data.datamodule import MVTecDataModule
from mvtec_seg.errors import UserError
from mvtec_seg.inference import choose_threshold
from mvtec_seg.interrupt import Interrupted, stage
from mvtec_seg.layout_metrics import layout_test_metrics
from mvtec_seg.loggers import run_loggers
from mvtec_seg.models.base import AnomalyModule, parameter_count
from mvtec_seg.outputs import RunOutputs
from mvtec_seg.plan import announce
from mvtec_seg.pseudo.masks import ensure_pseudo_masks, load_targets
from mvtec_seg.pseudo.rules import GATED, GATES, TARGETS
from mvtec_seg.pseudo.select import select
from mvtec_seg.pseudo.self_training import self_train
from mvtec_seg.pseudo.synthetic_val import ensure_synthetic_val, synthetic_scores
from mvtec_seg.pseudo.thresholds import STRATEGIES
from mvtec_seg.teacher import build_teacher, ensure_teacher, teacher_overlap

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
    """The run's Trainer: checkpoints (best by `checkpoint.monitor`; `last.ckpt` every epoch, with the RNG
    states, for `resume=true`), loggers, throughput, test artefacts."""
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
            save_top_k=1,
        ),
        wandb=None,
    )
    loggers, parts.wandb = run_loggers(cfg, run_dir)
    trainer = build_trainer(
        cfg.trainer,
        [
            parts.throughput,
            parts.artefacts,
            parts.checkpoint,
            *resume_callbacks(run_dir / "checkpoints", cfg.checkpoint.last_every_s),
        ],
        loggers or False,
        max_epochs=max_epochs(cfg),
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
    last = out.run_dir / "checkpoints" / LAST_CHECKPOINT
    resume = str(last) if cfg.get("resume") and last.exists() else None
    if resume:
        log.warning("resuming training from %s", last)
    elif cfg.get("resume"):
        log.warning("resume=true but %s does not exist: training from the start", last)
    t0 = time.perf_counter()
    with stage("segmenter training"):
        trainer.fit(model, datamodule=dm, ckpt_path=resume)
    out.summary.time["train_s"] = time.perf_counter() - t0
    out.summary.throughput["train_images_per_s"] = parts.throughput.images_per_s
    out.summary.checkpoint = parts.checkpoint.best_model_path or None
    return out.summary.checkpoint


def _fit_candidate(cfg: DictConfig, index: int, dm: MVTecDataModule, run_dir: Path) -> dict:
    """One `mask.select=auto` candidate: its targets, a student trained on them in
    `<run>/candidates/<index>/`, and its best checkpoint's scores (synthetic val; test, recorded only)."""
    info = _set_pseudo_targets(cfg, dm)
    model = build_model(cfg)
    folder = run_dir / "candidates" / str(index)
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=folder / "checkpoints",
        filename="best",
        monitor=cfg.checkpoint.monitor,
        mode=cfg.checkpoint.mode,
    )
    throughput = Throughput()
    trainer = build_trainer(
        cfg.trainer,
        [throughput, checkpoint],
        pl.loggers.CSVLogger(str(folder), name="csv", version=""),
        max_epochs=max_epochs(cfg),
        enable_checkpointing=True,
        default_root_dir=str(folder),
    )
    t0 = time.perf_counter()
    with stage(f"candidate {index} training"):
        trainer.fit(model, datamodule=dm)
    train_s = time.perf_counter() - t0
    best = checkpoint.best_model_path or None
    trainer.test(model, datamodule=dm, ckpt_path=best, verbose=False)  # loads the best weights into `model`
    ev = cfg.evaluation
    return {
        "checkpoint": best,
        "synthetic_val": synthetic_scores(model, dm, ev.fpr_limit, ev.iou_threshold),
        "quality": info.get("quality"),
        "dir": info.get("dir"),
        "train_s": train_s,
        "test_metrics": dict(model.computed_metrics["test"]),  # recorded after the choice is fixed
    }


def _select_pseudo(cfg: DictConfig, dm: MVTecDataModule, out: RunOutputs) -> tuple[dict, str | None]:
    """`mask.select=auto`: train every candidate, keep the best by the synthetic validation set; the chosen
    targets are set on `dm`. Returns its pseudo record (with `selection`) and checkpoint."""
    chosen, records = select(cfg, lambda c, i: _fit_candidate(c, i, dm, out.run_dir))
    from mvtec_seg.pseudo.select import candidate_configs

    info = _set_pseudo_targets(candidate_configs(cfg)[chosen], dm)  # cached: sets the chosen targets
    info["selection"] = {
        "criterion": "synthetic-val pixel_AUPRO, then pixel_AP",
        "chosen": chosen,
        "label": records[chosen]["label"],
        "candidates": records,
    }
    info["synthetic_val"] = records[chosen]["synthetic_val"]
    out.summary.time["train_s"] = sum(r["train_s"] for r in records)
    return info, records[chosen]["checkpoint"]


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
    if cfg.model.source == "teacher" or cfg.mask.name == "pseudo":
        out.summary.teacher_overlap = teacher_overlap(cfg, dm)
    if cfg.model.source == "teacher":
        teacher = ensure_teacher(cfg, dm)
        out.summary.params = teacher.info["params"]
        out.summary.time["train_s"] = teacher.info["train_s"]
        out.summary.throughput["train_images_per_s"] = teacher.info["train_images_per_s"]
        out.summary.checkpoint = teacher.checkpoint
        return teacher.module
    student_cfg = cfg
    if cfg.mask.name == "pseudo":
        if cfg.mask.get("select", "fixed") == "auto":
            from mvtec_seg.pseudo.select import candidate_configs

            out.summary.pseudo, out.summary.checkpoint = _select_pseudo(cfg, dm, out)
            student_cfg = candidate_configs(cfg)[out.summary.pseudo["selection"]["chosen"]]
        else:
            out.summary.pseudo = _set_pseudo_targets(cfg, dm)
        with torch.device("meta"):  # counted, not used: no memory, no random draws
            out.summary.teacher_params = parameter_count(build_teacher(cfg))
    model = build_model(student_cfg)
    out.summary.params = parameter_count(model)
    return model


def _uses_synthetic_val(cfg: DictConfig) -> bool:
    enabled = cfg.synthetic_val.get("enabled", "auto")
    if enabled == "auto":
        return cfg.model.source == "fit" and cfg.mask.name == "pseudo"
    return bool(enabled) and cfg.model.source == "fit"


def check_config(cfg: DictConfig) -> None:
    """Stop on a setting out of its range before anything is read or trained (one line naming it)."""
    if cfg.model.get("source") not in MODEL_SOURCES:
        raise UserError(
            f"model.source={cfg.model.get('source')!r} must be one of {MODEL_SOURCES} — fix the model config"
        )
    size = cfg.data.image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(
            f"data.image_size={size!r} must be a positive whole number of pixels — set it to e.g. 256"
        )
    ratios = cfg.data.split_ratios
    if (
        len(ratios) != 3
        or any(isinstance(r, bool) or not isinstance(r, int | float) or r < 0 for r in ratios)
        or ratios[0] <= 0
        or abs(sum(ratios) - 1.0) > 1e-6
    ):
        raise UserError(
            f"data.split_ratios={list(ratios)} must be three non-negative fractions (train, val, test) with "
            f"train > 0 that sum to 1 — set it to e.g. [0.7,0.1,0.2]"
        )
    _check_mask_config(cfg.mask)


def _is_number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, int | float)


def _check_mask_config(mask: DictConfig) -> None:
    """The `mask.*` rule settings (pseudo masks): names from their lists, fractions in [0, 1], counts >= 0."""
    threshold = mask.get("threshold") or {}
    for key, example in (
        ("threshold.quantile", 0.995),
        ("threshold.low_quantile", 0.98),
        ("gate.quantile", 0.95),
    ):
        group, name = key.split(".")
        q = (mask.get(group) or {}).get(name)
        if q is not None and (not _is_number(q) or not 0.0 <= q <= 1.0):
            raise UserError(f"mask.{key}={q!r} must be a fraction between 0 and 1 — set it to e.g. {example}")
    if mask.get("name") != "pseudo":
        return
    choices = {
        "threshold.strategy": STRATEGIES,
        "target": TARGETS,
        "gate.strategy": GATES,
        "gated": GATED,
        "select": ("fixed", "auto"),
    }
    for key, allowed in choices.items():
        value = OmegaConf.select(mask, key)
        if value is not None and value not in allowed:
            raise UserError(f"mask.{key}={value!r} is not one of {list(allowed)} — pick one of those")
    for key in ("regions.min_area", "regions.fill_holes", "rounds"):
        value = OmegaConf.select(mask, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise UserError(f"mask.{key}={value!r} must be a whole number >= 0 — set it to e.g. 0")
    fraction = mask.get("synthetic_fraction")
    if fraction is not None and (not _is_number(fraction) or not 0.0 <= fraction <= 1.0):
        raise UserError(f"mask.synthetic_fraction={fraction!r} must be a fraction between 0 and 1 — e.g. 0.5")
    weight = OmegaConf.select(mask, "distill.weight")
    if weight is not None and (not _is_number(weight) or weight < 0):
        raise UserError(f"mask.distill.weight={weight!r} must be a number >= 0 — e.g. 0 (off) or 1")
    low, high = threshold.get("low_quantile"), threshold.get("quantile")
    if threshold.get("strategy") == "hysteresis" and low is not None and high is not None and low > high:
        raise UserError(
            f"mask.threshold.low_quantile={low} is above mask.threshold.quantile={high} — the low threshold "
            "of the hysteresis must not exceed the high one"
        )


def _dry_run(cfg: DictConfig, out: RunOutputs) -> None:
    """Build every model the run would use and record their sizes: the scored model, and the teacher
    when the run needs one (`mask=pseudo`, or the teacher is the model)."""
    out.summary.params = parameter_count(build_model(cfg))
    if cfg.model.source == "teacher":
        out.summary.teacher_params = out.summary.params
    elif cfg.mask.name == "pseudo":
        out.summary.teacher_params = parameter_count(build_teacher(cfg))


def one_line(err: BaseException) -> str:
    """The failure reason as one line (a UserError's message already is one)."""
    text = " ".join(str(err).split()) if isinstance(err, UserError | Interrupted) else None
    if text is None:
        first = str(err).strip().splitlines()
        text = f"{type(err).__name__}: {first[0]}" if first else type(err).__name__
    return text[:500]


def targets_name(cfg: DictConfig) -> str:
    """What the val part is scored against: the mask source for a segmenter, GT for the teacher."""
    return cfg.mask.name if cfg.model.source == "fit" else "gt"


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job and return its summary (also written to `<run_dir>/summary.json`)."""
    check_config(cfg)
    pl.seed_everything(int(cfg.seed), workers=True)
    run_dir = Path(cfg.paths.run_dir)
    out = RunOutputs(run_dir, cfg)
    status, trainer, parts = "failed", None, None
    try:
        with stage("data check, split and decoding"):
            dm = build_datamodule(cfg, train_subset="all")
            dm.prepare()  # scans, validates and splits: bad data stops here, before any training
        out.set_split(dm)
        announce(cfg, dm)
        if cfg.dry_run:  # build what the run would use, train nothing
            _dry_run(cfg, out)
            trainer, parts = run_trainer(cfg, run_dir)
            status = "dry_run"
        else:
            if _uses_synthetic_val(cfg):
                dm.set_synthetic_val(ensure_synthetic_val(cfg, dm))
            model = _prepare_model(cfg, dm, out)
            trainer, parts = run_trainer(cfg, run_dir)
            selected = (out.summary.pseudo or {}).get("selection")
            if selected:  # mask.select=auto: the chosen candidate's student is the run's model
                ckpt_path = out.summary.checkpoint
            elif cfg.model.source == "fit":
                ckpt_path = _fit(cfg, model, dm, trainer, parts, out)
            else:
                ckpt_path = None
            with stage("testing"):
                trainer.test(model, datamodule=dm, ckpt_path=ckpt_path, verbose=False)
            out.summary.metrics = dict(model.computed_metrics["test"])
            if dm.synthetic_val is not None and out.summary.pseudo is not None and not selected:
                ev = cfg.evaluation  # the tested weights on the GT-free criterion, for comparing runs
                out.summary.pseudo["synthetic_val"] = synthetic_scores(
                    model, dm, ev.fpr_limit, ev.iou_threshold
                )
            if trainer.is_global_zero:  # the tested weights' decision threshold, for `mvtec_seg.predict`
                out.summary.decision_threshold = choose_threshold(
                    model,
                    dm.dataset("val"),
                    dm.eval_batch_size,
                    targets_name(cfg),
                    trainer.strategy.root_device,
                )
                # the layout's own benchmark metrics (MVTec AD 2: SegF1, AUPRO to FPR 0.05), if any
                out.summary.metrics.update(
                    layout_test_metrics(model, dm, run_dir, trainer.strategy.root_device)
                )
            test_s = parts.throughput.test_s
            out.summary.time["test_s"] = test_s
            if parts.artefacts.n_images and test_s:
                out.summary.throughput["test_images_per_s"] = parts.artefacts.n_images / test_s
            status = "ok"
    except BaseException as err:
        status = "interrupted" if isinstance(err, Interrupted) else "failed"
        out.summary.error = one_line(err)
        raise
    finally:
        with stage("writing the run folder"):
            out.finish(
                status,
                trainer,
                parts.wandb if parts else None,
                parts.artefacts.overlay_paths if parts else (),
            )
    return out.summary.to_dict()
