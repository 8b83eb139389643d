"""Self-training (`mask.rounds=k`): retrain the segmenter on the current pseudo targets, derive new targets
from its own maps on the manifest by the same rules (thresholds from the known normals, `masks.chain_sets`, never
GT), k times. Each round's maps and masks are cached under the previous round's set, keyed by the segmenter
settings, and scored against GT like the first set.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mvtec_seg.builders import build_model, build_trainer, fit, max_epochs, one_device, student_settings
from mvtec_seg.io_utils import build_once
from mvtec_seg.pseudo.masks import ensure_masks_from, load_targets, round_dir
from mvtec_seg.pseudo.rules import strategy_label
from mvtec_seg.teacher import predict_maps

log = logging.getLogger(__name__)


def round_spec(cfg: DictConfig, round_index: int) -> dict:
    """What a round's segmenter (and so its maps) depends on besides the previous targets."""
    data = cfg.data
    return {
        "round": round_index,
        "seed": int(cfg.seed),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "student": student_settings(cfg),
        "epochs": max_epochs(cfg),
        "limit_train_batches": cfg.trainer.get("limit_train_batches"),
        "data": {k: data.get(k) for k in ("image_size", "batch_size", "train_crop", "augment")},
    }


def _round_maps(cfg: DictConfig, dm, info: dict) -> np.ndarray:
    """Train a segmenter on `info`'s targets (train part, final weights) and predict every image."""
    dm.set_target_masks(*load_targets(info))
    model = build_model(cfg)
    settings = one_device(cfg.trainer)
    trainer = build_trainer(
        settings,
        max_epochs=max_epochs(cfg),
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    fit(trainer, model, dm.train_dataloader(), "self-training round")
    return predict_maps(settings, model, dm)


def _record(info: dict) -> dict:
    keys = ("dir", "threshold", "low_threshold", "gate_level", "n_gated", "quality")
    return {k: info.get(k) for k in keys}


def self_train(cfg: DictConfig, dm, info: dict) -> dict:
    """The record of the last round's targets (`info` itself when `mask.rounds` is 0), with `rounds`: every
    round's record (round 0 = the teacher's masks)."""
    rounds = int(cfg.mask.get("rounds") or 0)
    records = [{"round": 0, **_record(info)}]
    for r in range(1, rounds + 1):
        source = round_dir(Path(info["dir"]), round_spec(cfg, r))
        maps_file = source / "maps.npy"

        def build(tmp: Path, previous: dict = info, r: int = r) -> None:
            log.warning("self-training round %d of %d: training on %s", r, rounds, previous["dir"])
            with open(tmp, "wb") as fh:
                np.save(fh, _round_maps(cfg, dm, previous))

        build_once(maps_file, build)
        _, info = ensure_masks_from(np.load(maps_file), source, cfg, dm)
        records.append({"round": r, **_record(info)})
    student = {
        "synthetic_fraction": cfg.mask.get("synthetic_fraction") or 0.0
    }  # not a rule: not in "settings"
    label = strategy_label({**info["settings"], **student}, rounds)
    return {**info, "label": label, "round": rounds, "rounds": records}
