"""`train(cfg) -> summary`: the whole job for one (category, model, mask), pure apart from its outputs.

One path through a run: check the data and split it; get the model (`model.source=fit`: train a segmenter
on the mask source; `teacher`: the shared TransFusion teacher, trained once per category in the cache);
test it on the test part; record and finish. `dry_run=true` stops after building every model the run would
use (the teacher included) and the trainer. Before anything is read or written, `preflight` checks every
setting and whether the run folder is free (`identity.check_start`): a new run refuses a folder holding
another run, `resume=true` continues only the run with these settings (and, once read, this data) from
`<run_dir>/checkpoints/last.ckpt` (weights, optimizer, scheduler, epoch, RNG states; a damaged one stops
here). The job then holds the folder's lock (`run_folder_lock`: one process per run folder). Then, whatever
happens, `summary.json` records the run: `ok`, `dry_run`, `failed` or `interrupted`, with the one-line
reason in `error`, where `outputs.RunOutputs` may write it (never over a finished run's files).
`__main__` is a thin Hydra wrapper around this, so tests compose configs and call it directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from mvtec_seg.builders import (
    LAST_CHECKPOINT,
    build_datamodule,
    build_model,
    build_trainer,
    fit,
    max_epochs,
    resume_callbacks,
)
from mvtec_seg.callbacks import TestArtefacts, Throughput
from mvtec_seg.data.datamodule import MVTecDataModule
from mvtec_seg.data.mvtec import pixel_limit
from mvtec_seg.data.sources import mask_source, needs_teacher
from mvtec_seg.errors import UserError
from mvtec_seg.identity import (
    launched_child,
)
from mvtec_seg.inference import choose_threshold, iou_at_decision
from mvtec_seg.interrupt import Interrupted, stage
from mvtec_seg.layout_metrics import layout_test_metrics, recorded_threshold, rewrite_record
from mvtec_seg.loggers import run_loggers
from mvtec_seg.models.base import AnomalyModule, parameter_count
from mvtec_seg.native_metrics import native_test_metrics
from mvtec_seg.outputs import RunOutputs
from mvtec_seg.plan import announce
from mvtec_seg.preflight import preflight, run_folder_lock, start_mode
from mvtec_seg.pseudo.masks import ensure_pseudo_masks, load_targets
from mvtec_seg.pseudo.select import select
from mvtec_seg.pseudo.self_training import self_train
from mvtec_seg.pseudo.synthetic_val import ensure_synthetic_val, synthetic_scores
from mvtec_seg.summary import PREDICTIONS_FILE
from mvtec_seg.teacher import build_teacher, ensure_teacher, teacher_overlap

log = logging.getLogger(__name__)


@dataclass
class RunParts:
    """The run trainer's callbacks and W&B logger, read after fitting and testing."""

    throughput: Throughput
    artefacts: TestArtefacts
    checkpoint: pl.callbacks.ModelCheckpoint
    wandb: Any | None


def run_trainer(cfg: DictConfig, run_dir: Path) -> tuple[pl.Trainer, RunParts]:
    """The run's Trainer: checkpoints (best by `checkpoint.monitor`; `last.ckpt` with the RNG states for
    `resume=true`, at most every `checkpoint.last_every_s` and after the last epoch), loggers, throughput,
    test artefacts."""
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
    if cfg.get("resume") and not launched_child():
        keep_epoch_log(run_dir)
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


def keep_epoch_log(run_dir: Path) -> Path | None:
    """Lightning's CSV logger deletes `csv/metrics.csv` when it starts in a folder that has one: a resumed
    run keeps the epochs before the resume as `csv/metrics.before_resume_<k>.csv`."""
    log_file = run_dir / "csv" / "metrics.csv"
    if not log_file.is_file():
        return None
    k = 1
    while (kept := log_file.with_name(f"metrics.before_resume_{k}.csv")).exists():
        k += 1
    log_file.rename(kept)
    return kept


def _fit(
    cfg: DictConfig, model: AnomalyModule, dm, trainer: pl.Trainer, parts: RunParts, out: RunOutputs
) -> str | None:
    """Train (or resume) the segmenter; records and returns the checkpoint to test (`ckpt_path` if given,
    else the best)."""
    if cfg.ckpt_path is not None:
        out.summary.checkpoint = str(Path(cfg.ckpt_path).resolve())
        return out.summary.checkpoint
    last = out.run_dir / "checkpoints" / LAST_CHECKPOINT
    resume = str(last) if cfg.get("resume") and last.exists() else None
    if resume:
        log.warning("resuming training from %s", last)
    elif cfg.get("resume"):  # the run (checked: same settings and data) stopped before its first checkpoint
        log.warning(
            "resume=true: the run in %s wrote no %s yet: training from the start", out.run_dir, last.name
        )
    fitted = fit(trainer, model, dm, "segmenter training", resume)
    out.summary.time["train_s"] = fitted.train_s
    out.summary.throughput["train_images_per_s"] = fitted.images_per_s
    out.summary.checkpoint = _here(parts.checkpoint.best_model_path, out.run_dir)
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
    trainer = build_trainer(
        cfg.trainer,
        [checkpoint],
        pl.loggers.CSVLogger(str(folder), name="csv", version=""),
        max_epochs=max_epochs(cfg),
        enable_checkpointing=True,
        default_root_dir=str(folder),
    )
    train_s = fit(trainer, model, dm, f"candidate {index} training").train_s
    best = checkpoint.best_model_path or None
    trainer.test(model, datamodule=dm, ckpt_path=best, verbose=False)  # loads the best weights into `model`
    ev = cfg.evaluation
    return {
        "checkpoint": best,
        "synthetic_val": synthetic_scores(model, dm, ev.fpr_limit, ev.iou_threshold),
        "quality": info.get("quality"),
        "dir": info.get("dir"),
        "train_s": train_s,
        "protocol": mask_source(cfg).protocol(cfg),  # a candidate may set mask.image_labels of its own
        "test_metrics": dict(model.computed_metrics["test"]),  # recorded after the choice is fixed
    }


def _select_pseudo(
    cfg: DictConfig, dm: MVTecDataModule, out: RunOutputs
) -> tuple[dict, str | None, DictConfig]:
    """`mask.select=auto`: train every candidate, keep the best by the synthetic validation set; the chosen
    targets are set on `dm`. Returns its pseudo record (with `selection`), checkpoint and run config."""
    chosen, records, configs = select(cfg, lambda c, i: _fit_candidate(c, i, dm, out.run_dir))
    info = _set_pseudo_targets(configs[chosen], dm)  # cached: sets the chosen targets
    info["selection"] = {
        "criterion": "synthetic-val pixel_AUPRO, then pixel_AP",
        "chosen": chosen,
        "label": records[chosen]["label"],
        "candidates": records,
    }
    info["synthetic_val"] = records[chosen]["synthetic_val"]
    out.summary.time["train_s"] = sum(r["train_s"] for r in records)
    return info, records[chosen]["checkpoint"], configs[chosen]


def _here(best: str | None, run_dir: Path) -> str | None:
    """The best checkpoint in this run folder: a resumed run whose folder was moved or copied restores
    Lightning's record of the old folder's path; the file it means is the one of that name here."""
    if not best:
        return None
    path = Path(best)
    if not path.resolve().is_relative_to(run_dir.resolve()):
        local = run_dir / "checkpoints" / path.name
        if local.is_file():
            return str(local.resolve())
    return best


def _set_pseudo_targets(cfg: DictConfig, dm: MVTecDataModule) -> dict:
    """Put the pseudo targets (and loss weights) on `dm`: the teacher's, or after `mask.rounds` rounds of
    self-training, with `mask=mixed`'s labelled images on GT; returns their record (thresholds, quality vs GT
    of every round)."""
    _, info = ensure_pseudo_masks(cfg, dm)
    info = self_train(cfg, dm, info)
    dm.set_target_masks(*load_targets(info))
    labelled = mask_source(cfg).gt_targets(cfg, dm.manifest["samples"])  # mask=mixed: after the chain
    if labelled is not None:
        dm.use_gt_targets(labelled)
    return info


def _prepare_model(cfg: DictConfig, dm: MVTecDataModule, out: RunOutputs) -> AnomalyModule:
    """The model to test, recorded in the summary: the ensured teacher, or an untrained segmenter whose
    targets (GT, pseudo masks built on first use, or none beside the synthetic defects) are set on `dm`."""
    if needs_teacher(cfg):
        out.summary.teacher_overlap = teacher_overlap(cfg, dm)
    if cfg.model.source == "teacher":
        teacher = ensure_teacher(cfg, dm)
        out.summary.params = teacher.info["params"]
        out.summary.time["train_s"] = teacher.info["train_s"]
        out.summary.throughput["train_images_per_s"] = teacher.info["train_images_per_s"]
        out.summary.checkpoint = teacher.checkpoint
        return teacher.module
    student_cfg = cfg
    source = mask_source(cfg)
    if not source.reads_gt and not source.needs_teacher:  # synthetic only: the pasted defects are the targets
        dm.set_target_masks(np.zeros(dm.gt_masks.shape, dtype=np.uint8))
    if source.needs_teacher:
        if cfg.mask.get("select", "fixed") == "auto":
            out.summary.pseudo, out.summary.checkpoint, student_cfg = _select_pseudo(cfg, dm, out)
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
        return cfg.model.source == "fit" and mask_source(cfg).synthetic_val
    return bool(enabled) and cfg.model.source == "fit"


def _dry_run(cfg: DictConfig, out: RunOutputs) -> None:
    """Build every model the run would use and record their sizes: the scored model, and the teacher
    when the run needs one (`mask=pseudo`, or the teacher is the model)."""
    out.summary.params = parameter_count(build_model(cfg))
    if cfg.model.source == "teacher":
        out.summary.teacher_params = out.summary.params
    elif needs_teacher(cfg):
        out.summary.teacher_params = parameter_count(build_teacher(cfg))


def one_line(err: BaseException) -> str:
    """The failure reason as one line (a UserError's message already is one)."""
    text = " ".join(str(err).split()) if isinstance(err, UserError | Interrupted) else None
    if text is None:
        first = str(err).strip().splitlines()
        text = f"{type(err).__name__}: {first[0]}" if first else type(err).__name__
    return text[:500]


def targets_name(cfg: DictConfig) -> str:
    """What the decision threshold is chosen against: the mask source's val targets for a segmenter (the
    synthetic validation set for `mask=synthetic_only`, whose val part has no target), GT for the teacher."""
    if cfg.model.source != "fit":
        return "gt"
    source = mask_source(cfg)
    return "synthetic_val" if not (source.reads_gt or source.needs_teacher) else str(cfg.mask.name)


def threshold_set(cfg: DictConfig, dm: MVTecDataModule):
    """The images the decision threshold is chosen on (never the test part): the val part with the run's
    targets, or the synthetic validation set (`targets_name`)."""
    if targets_name(cfg) == "synthetic_val":
        return dm.synthetic_val if dm.synthetic_val is not None else dm.dataset("val")
    return dm.dataset("val")


def decision_threshold(cfg: DictConfig, dm: MVTecDataModule, model, device) -> dict[str, Any]:
    """The tested weights' decision threshold, chosen on `threshold_set`; where those targets mark no pixel
    (a PSEUDO run whose teacher's masks are not used, `mask.evidence`) on the synthetic validation set, as
    for `mask=synthetic_only`. Never on the test part."""
    chosen = choose_threshold(model, threshold_set(cfg, dm), dm.eval_batch_size, targets_name(cfg), device)
    if chosen["value"] is None and dm.synthetic_val is not None and chosen["targets"] != "synthetic_val":
        chosen = choose_threshold(model, dm.synthetic_val, dm.eval_batch_size, "synthetic_val", device)
    return chosen


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job and return its summary (also written to `<run_dir>/summary.json`)."""
    settings, mode = preflight(cfg)
    if launched_child():  # rank 1+ shares rank 0's folder (and its lock)
        with pixel_limit(settings.get("data.max_image_pixels")):
            return _run(cfg, settings, mode)
    with run_folder_lock(settings["paths.run_dir"]), pixel_limit(settings.get("data.max_image_pixels")):
        mode = start_mode(settings)  # again under the lock: a job that held it may have finished the run
        return _run(cfg, settings, mode)


def _run(cfg: DictConfig, settings: dict[str, Any], mode: str) -> dict[str, Any]:
    """The job after its preflight: data, model, test, record (see the module docstring)."""
    pl.seed_everything(int(cfg.seed), workers=True)
    run_dir = Path(cfg.paths.run_dir)
    out = RunOutputs(run_dir, cfg, mode, settings, write=not launched_child())
    status, trainer, parts = "failed", None, None
    try:
        with stage("data check, split and decoding"):
            source = mask_source(cfg)
            fitted_on = "all" if cfg.model.source != "fit" or source.trains_on_unlabelled else "known_normal"
            dm = build_datamodule(cfg, train_subset=fitted_on)
            dm.prepare()  # scans, validates and splits: bad data stops here, before any training
            dm.set_known_normals(source.known_normals(cfg, dm.manifest["samples"]))
            dm.set_left_out(source.left_out(cfg, dm.manifest["samples"]))
            out.set_labelled(dm.manifest["samples"], source.labelled(cfg, dm.manifest["samples"]))
        out.set_data(dm)  # a resumed run must have read the same data
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
                out.summary.decision_threshold = decision_threshold(
                    cfg, dm, model, trainer.strategy.root_device
                )
                out.summary.metrics.update(
                    iou_at_decision(run_dir / PREDICTIONS_FILE, out.summary.decision_threshold["value"])
                )
                # the layout's own benchmark metrics (MVTec AD 2: SegF1, AUPRO to FPR 0.05), if any
                out.summary.metrics.update(
                    layout_test_metrics(model, dm, run_dir, trainer.strategy.root_device)
                )
                if cfg.evaluation.resolution == "native":  # every test metric again, at the images' size
                    with stage("scoring at native resolution"):
                        ev = cfg.evaluation
                        out.summary.metrics.update(
                            native_test_metrics(
                                dm,
                                run_dir,
                                ev.iou_threshold,
                                ev.fpr_limit,
                                recorded_threshold(run_dir),
                                out.summary.decision_threshold["value"],
                            )
                        )
                    out.summary.resolution = "native"
                    rewrite_record(run_dir, out.summary.metrics, "native")
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
