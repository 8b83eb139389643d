"""Pseudo masks: the teacher's maps thresholded (never looking at GT), written once per teacher and setting.

The masks are keyed by the teacher's maps (`teacher.maps_dir`: the weights and the images' bytes), the split,
the threshold settings and the bytes of the GT masks their recorded quality is scored against, so two jobs
with the same settings share one set and a changed setting or file builds a new one beside it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mvtec_seg.data.files import announce_rebuild, files_key, write_record
from mvtec_seg.interrupt import stage
from mvtec_seg.io_utils import atomic_save_png, atomic_write_json, build_once, content_key
from mvtec_seg.metrics import precision_recall_iou
from mvtec_seg.pseudo.thresholds import choose_threshold
from mvtec_seg.teacher import ensure_teacher, maps_dir, teacher_maps

log = logging.getLogger(__name__)


@stage("pseudo masks")
def write_pseudo_masks(
    out: Path, maps: np.ndarray, dm, settings: dict, category: str, teacher_dir: Path
) -> None:
    """Threshold `maps` ([N,H,W], manifest order) under `settings` and write `masks.npy`, one PNG per image
    and `info.json` (threshold, settings, quality against GT per part) into the new folder `out`."""
    rows = dm.manifest["samples"]
    log.warning("building pseudo masks for %s (%s) in %s", category, settings, out)
    threshold = choose_threshold(
        maps,
        dm.indices("train"),
        dm.indices("train", normal_only=True),
        settings["strategy"],
        settings.get("quantile", 0.995),
        settings.get("fixed", 0.5),
    )
    masks = (np.asarray(maps, dtype=np.float32) >= threshold).astype(np.uint8)
    out.mkdir(parents=True)
    np.save(out / "masks.npy", masks)
    for i, row in enumerate(rows):
        name = f"{i:05d}_{row['defect_type']}_{Path(row['image']).stem}.png"
        atomic_save_png(out / "png" / name, masks[i] * 255)
    quality = {
        part: precision_recall_iou(masks[dm.indices(part)], np.asarray(dm.gt_masks[dm.indices(part)]))
        for part in ("train", "val", "test")
    }
    atomic_write_json(
        out / "info.json",
        {
            "threshold": threshold,
            "settings": settings,
            "teacher": str(teacher_dir),
            "quality": quality,
            "n": len(rows),
        },
    )


def pseudo_dir(cfg: DictConfig, dm, teacher) -> Path:
    """The folder of the pseudo masks for these maps, split, threshold settings and GT mask bytes."""
    settings = OmegaConf.to_container(cfg.mask.threshold, resolve=True)
    split = [[r["image"], r["part"]] for r in dm.manifest["samples"]]
    data = files_key(dm.data_record(masks=True))
    return (
        maps_dir(dm, teacher) / "pseudo" / content_key({"settings": settings, "split": split, "data": data})
    )


def ensure_pseudo_masks(cfg: DictConfig, dm) -> tuple[np.ndarray, dict]:
    """Binary pseudo masks ([N,H,W] uint8, manifest order) and their record (threshold, quality vs GT);
    the teacher is ensured first (trained once if needed)."""
    teacher = ensure_teacher(cfg, dm)
    maps = teacher_maps(cfg, dm, teacher)
    settings = OmegaConf.to_container(cfg.mask.threshold, resolve=True)
    record = dm.data_record(masks=True)
    pdir = pseudo_dir(cfg, dm, teacher)

    def build(tmp: Path) -> None:
        announce_rebuild(pdir, record, f"the pseudo masks of {cfg.category.name}")
        write_pseudo_masks(tmp, maps, dm, settings, cfg.category.name, teacher.dir)
        write_record(tmp, record)

    build_once(pdir, build)
    info = json.loads((pdir / "info.json").read_text())
    info["dir"] = str(pdir)
    info["maps"] = str(maps_dir(dm, teacher) / "maps.npy")
    info["strategy"] = settings["strategy"]
    return np.load(pdir / "masks.npy"), info
