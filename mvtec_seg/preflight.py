"""Everything a job checks before it reads data or writes anything: its settings and its run folder.

`check_config` stops on a setting out of its range (one line naming it; the choices come from the code that
implements them: architectures, encoders, the pseudo-mask rules, the teacher's reverse modes) and on a key no
constructor takes. `preflight` adds the run folder (`identity.check_start`: a new run refuses a folder holding
another run; `resume=true` continues only the run with these settings), the checkpoint it would read, and on
resume that the data is the run's. `run_folder_lock` is the lock a job then holds (one process per folder).
"""

from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig

from mvtec_seg.builders import LAST_CHECKPOINT, category_dir
from mvtec_seg.data.files import data_record, describe_changes, file_state
from mvtec_seg.data.mvtec import scan_category
from mvtec_seg.data.sources import makes_pseudo_targets, needs_teacher
from mvtec_seg.errors import UserError
from mvtec_seg.identity import (
    CHECKPOINT_DIR,
    DATA_RECORD_FILE,
    RunFolder,
    check_checkpoint,
    check_start,
    launched_child,
    settings_digest,
)
from mvtec_seg.inference import SEGMENTER_CLASS, TRANSFUSION_CLASS
from mvtec_seg.io_utils import folder_lock
from mvtec_seg.models.segmenter.loss import SegmentationLoss
from mvtec_seg.models.segmenter.torch_model import ARCHITECTURES, SegmentationNet, encoders
from mvtec_seg.models.transfusion.loss import TransFusionLoss
from mvtec_seg.models.transfusion.torch_model import REVERSE_MODES, TransFusionModel
from mvtec_seg.pseudo.rules import GATED, GATES, TARGETS
from mvtec_seg.pseudo.select import MODES
from mvtec_seg.pseudo.thresholds import STRATEGIES
from mvtec_seg.settings import check_keys, check_paths, check_settings, resolved_settings

MODEL_SOURCES = ("fit", "teacher")


def check_config(cfg: DictConfig) -> dict[str, Any]:
    """Stop on a setting out of its range before anything is read or trained (one line naming it, see
    `settings`); returns the resolved settings as `{dotted key: value}`."""
    settings = resolved_settings(cfg)
    check_paths(settings)
    choices = {"model.source": MODEL_SOURCES}
    if settings.get("model.source") == "fit" and settings.get("model.module") == SEGMENTER_CLASS:
        choices |= {
            "model.params.net.arch": tuple(ARCHITECTURES),
            "model.params.net.encoder_name": encoders(),
        }
    if makes_pseudo_targets(settings):
        choices |= {
            "mask.threshold.strategy": STRATEGIES,
            "mask.target": TARGETS,
            "mask.gate.strategy": GATES,
            "mask.gated": GATED,
            "mask.select": MODES,
        }
    if needs_teacher(settings):
        choices |= {"teacher.params.net.reverse": tuple(REVERSE_MODES)}
    check_settings(settings, choices)
    check_keys(settings, _takers(settings))
    return settings


def _takers(settings: dict[str, Any]) -> dict[str, Any]:
    """The constructors the config nodes are passed to, for `check_keys` (unknown keys are one line)."""
    takers: dict[str, Any] = {"trainer": pl.Trainer, "teacher.trainer": pl.Trainer}
    for node in ("model", "teacher"):
        if node == "teacher" and not needs_teacher(settings):
            continue
        target = str(settings.get(f"{node}.module"))
        module, _, name = target.rpartition(".")
        try:
            takers[f"{node}.params"] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            raise UserError(f"{node}.module={target!r} cannot be imported — fix the {node} config") from None
        if target == SEGMENTER_CLASS:
            takers |= {f"{node}.params.net": SegmentationNet, f"{node}.params.loss": SegmentationLoss}
        elif target == TRANSFUSION_CLASS:
            takers |= {f"{node}.params.net": TransFusionModel, f"{node}.params.loss": TransFusionLoss}
    return takers


def start_mode(settings: dict[str, Any]) -> str:
    """'fresh' or 'resume': how this job may use its run folder (`identity.check_start`; only reads it).
    A process that a distributed launcher started for rank 1+ shares rank 0's folder: 'fresh', unchecked."""
    if launched_child():
        return "fresh"
    folder = RunFolder.read(settings["paths.run_dir"])
    return check_start(folder, settings_digest(settings), settings, bool(settings.get("resume")))


def check_same_data(cfg: DictConfig, run_dir: Path) -> None:
    """A resumed run reads the files its run read (`files.json`): compared before anything is written,
    so another root with other bytes, an edited mask or a typo in `data.root` leave the folder untouched.
    (After reading, `RunOutputs.set_data` compares the whole data digest, split parts included.)"""
    try:
        old = json.loads((run_dir / DATA_RECORD_FILE).read_text())
    except (OSError, ValueError):
        return
    root = category_dir(cfg)
    samples = scan_category(root)
    rels = [s.image for s in samples] + [s.gt_mask for s in samples if s.gt_mask]
    change = describe_changes(old, data_record(root, file_state(root, rels)))
    if change:
        raise UserError(
            f"resume=true but the data differs from the data of the run in {run_dir} ({change}) — resume "
            f"with the run's data, or start a new run in another folder"
        )


def preflight(cfg: DictConfig) -> tuple[dict[str, Any], str]:
    """Everything checked before a job writes anything: the settings, its run folder, the checkpoint it
    would read (whole), and on resume that the data is the run's."""
    settings = check_config(cfg)
    mode = start_mode(settings)
    if cfg.get("ckpt_path") is not None:
        check_checkpoint(cfg.ckpt_path, "ckpt_path")
    if mode == "resume" and not launched_child():
        check_checkpoint(Path(settings["paths.run_dir"]) / CHECKPOINT_DIR / LAST_CHECKPOINT)
        check_same_data(cfg, Path(settings["paths.run_dir"]))
    return settings, mode


RUN_FOLDER_IN_USE = "wait for that job to end (or stop it), or choose another hydra.run.dir (paths.run_dir)"
"""What to do when another process holds a run folder (the train lock and the sweep guard say the same)."""


def run_folder_lock(run_dir: Path | str) -> contextlib.AbstractContextManager:
    """The lock a job holds on its run folder while it runs: a second job on the folder (new or
    `resume=true`) stops with one line naming the process and host that hold it."""
    return folder_lock(run_dir, f"run folder {run_dir}", RUN_FOLDER_IN_USE)
