"""Pseudo masks: the teacher's maps turned into training targets by `rules.py` (never looking at GT),
written once per teacher and setting.

The targets are keyed by their source (the teacher's maps folder `teacher.maps_dir`, keyed by the weights
and the images' bytes, or a self-training round), the `mask.*` rule settings, the split and the bytes of the GT
masks their recorded quality is scored against (`pseudo_dir` and `round_dir` are the one place keys are
computed), so two jobs with the same settings share one set and a changed setting or file builds a new one
beside it.

A set's folder: `masks.npy` (uint8 {0,1}, the mask scored against GT), `target.npy` (what the segmenter
trains on: the mask, or the soft map as float16), `weight.npy` (uint8 per-pixel loss weight, only for
`mask.target=ignore`), one PNG per image, `info.json` (thresholds, settings, quality per part) and
`files.json` (the fingerprints of the files it was made from).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mvtec_seg.data.files import announce_rebuild, files_key, write_record
from mvtec_seg.data.sources import known_normal_rows
from mvtec_seg.errors import UserError
from mvtec_seg.interrupt import stage
from mvtec_seg.io_utils import atomic_save_png, atomic_write_json, build_once, content_key
from mvtec_seg.metrics import precision_recall_iou
from mvtec_seg.pseudo.rules import derive_targets, strategy_label
from mvtec_seg.teacher import ensure_teacher, maps_dir, teacher_maps

log = logging.getLogger(__name__)
PARTS = ("train", "val", "test")


NOT_RULES: tuple[str, ...] = ("name", "rounds", "select", "candidates", "synthetic_fraction", "gt_images")
"""`mask.*` settings that do not change a set of targets (how many rounds, how a run picks among sets,
what the student adds to them, which GT masks `mask=mixed` puts in afterwards): `mixed` shares `pseudo`'s sets."""


def mask_settings(cfg: DictConfig) -> dict:
    """The rule settings a set of targets depends on: `cfg.mask` without `NOT_RULES`."""
    settings = OmegaConf.to_container(cfg.mask, resolve=True)
    return {k: v for k, v in settings.items() if k not in NOT_RULES}


def pseudo_dir(source_dir: Path, settings: dict, extra: dict | None = None) -> Path:
    """Where the targets derived from `source_dir`'s maps under `settings` live (`extra`: what else they
    depend on, e.g. a self-training round's segmenter)."""
    key = content_key(settings if extra is None else {"settings": settings, **extra})
    return Path(source_dir) / "pseudo" / key


def round_dir(previous_set: Path, spec: dict) -> Path:
    """Where a self-training round trained on `previous_set`'s targets keeps its maps (and, below, its sets)."""
    return Path(previous_set) / "self_training" / content_key(spec)


def mask_quality(masks: np.ndarray, dm) -> dict:
    """Per part: IoU, precision, recall against GT and the fraction of normal images with a non-empty mask
    (what the normal images would teach as false positives)."""
    quality = {}
    for part in PARTS:
        idx = dm.indices(part)
        q = precision_recall_iou(masks[idx], np.asarray(dm.gt_masks[idx]))
        normal = dm.indices(part, normal_only=True)
        nonempty = masks[normal].reshape(len(normal), -1).any(axis=1) if len(normal) else np.zeros(0)
        q["normal_nonempty"] = float(nonempty.mean()) if len(normal) else float("nan")
        quality[part] = q
    return quality


CALIBRATION = {
    False: "the val part's known normals (train/good images the teacher did not train on)",
    True: "the train part's normal images (image labels)",
}
"""What the quantiles and the gate are calibrated on, by `mask.image_labels` (recorded in `info.json`)."""


def chain_sets(dm, settings: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train part, its known normals, the calibration images) of the pseudo-mask chain under `settings`.

    Strict (`image_labels` false, the default): known normals are the train part's `train/good` images and
    the calibration images are the val part's (known normals the teacher never saw). With `image_labels`:
    every normal train-part image is known and calibrates (the weak-supervision variant)."""
    rows = dm.manifest["samples"]
    image_labels = bool(settings.get("image_labels", False))
    known = known_normal_rows(rows, image_labels)
    parts = np.array([r["part"] for r in rows])
    train_idx = np.flatnonzero(parts == "train")
    known_idx = np.flatnonzero((parts == "train") & known)
    if image_labels:
        return train_idx, known_idx, known_idx
    calibration_idx = np.flatnonzero((parts == "val") & known)
    if len(calibration_idx) == 0:
        raise UserError(
            "mask=pseudo calibrates its thresholds on the val part's train/good images and this split has "
            "none — use a category with more train/good images, or mask.image_labels=true"
        )
    return train_idx, known_idx, calibration_idx


EVIDENCE_P = 0.01
"""A teacher whose gate flags the unlabelled images no more often than known normals (binomial p above
this, `rules.teacher_evidence`) gets a warning: its masks carry little (the default of `mask.evidence`)."""


def warn_without_evidence(evidence: dict | None, category: str) -> None:
    """One line when the teacher's maps of the unlabelled train images look like its maps of known normals
    (said for the teacher's set only: a self-training round's set derives from the student's maps)."""
    used = bool(evidence and evidence.get("maps_used", True))
    if not evidence or (used and evidence["p_value"] <= EVIDENCE_P):
        return
    what = (
        "its masks add little beyond the synthetic defects — compare with mask=synthetic_only"
        if used
        else "its masks are not used (mask.evidence): the run trains like mask=synthetic_only"
    )
    log.warning(
        "pseudo masks of %s: the gate flags %d of %d unlabelled train images, about as many as it would "
        "were they all normal (%.1f, p = %.2g): the teacher finds little there and %s",
        category,
        evidence["flagged"],
        evidence["unlabelled"],
        evidence["expected_if_normal"],
        evidence["p_value"],
        what,
    )


@stage("pseudo masks")
def write_pseudo_masks(out: Path, maps: np.ndarray, dm, settings: dict, category: str, source: Path) -> None:
    """Derive the targets of `maps` ([N,H,W], manifest order) under `settings` and write them into the new
    folder `out` (see the module docstring)."""
    rows = dm.manifest["samples"]
    log.warning("building pseudo masks for %s (%s) in %s", category, settings, out)
    train_idx, known_idx, calibration_idx = chain_sets(dm, settings)
    t = derive_targets(maps, train_idx, known_idx, settings, calibration_idx)
    out.mkdir(parents=True)
    np.save(out / "masks.npy", t.mask)
    np.save(out / "target.npy", t.target)
    if t.weight is not None:
        np.save(out / "weight.npy", t.weight)
    if t.soft is not None:
        np.save(out / "soft.npy", t.soft)
    for i, row in enumerate(rows):
        name = f"{i:05d}_{row['defect_type']}_{Path(row['image']).stem}.png"
        atomic_save_png(out / "png" / name, t.mask[i] * 255)
    atomic_write_json(
        out / "info.json",
        {
            **t.record,
            "calibration": {
                "images": CALIBRATION[bool(settings.get("image_labels", False))],
                "n": len(calibration_idx),
            },
            "n_known_normal": len(known_idx),
            "settings": settings,
            "teacher": str(source),
            "quality": mask_quality(t.mask, dm),
            "n": len(rows),
        },
    )


def read_pseudo(pdir: Path) -> dict:
    """The record of a written set, with its folder and strategy."""
    info = json.loads((pdir / "info.json").read_text())
    info["dir"] = str(pdir)
    info["strategy"] = info["settings"]["threshold"]["strategy"]
    info["label"] = strategy_label(info["settings"])
    return info


def load_targets(info: dict) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The training target ([N,H,W]), per-pixel weight and distillation target (each or None) of a set
    written by this module: the arguments of `MVTecDataModule.set_target_masks`."""
    pdir = Path(info["dir"])
    target, weight, soft = pdir / "target.npy", pdir / "weight.npy", pdir / "soft.npy"
    return (
        np.load(target if target.exists() else pdir / "masks.npy"),
        np.load(weight) if weight.exists() else None,
        np.load(soft) if soft.exists() else None,
    )


def _data_extra(dm) -> dict:
    """What a set depends on besides its maps and rules: the split and the GT masks' bytes (its quality)."""
    split = [[r["image"], r["part"]] for r in dm.manifest["samples"]]
    return {"split": split, "data": files_key(dm.data_record(masks=True))}


def ensure_masks_from(
    maps: np.ndarray, source: Path, cfg: DictConfig, dm, extra: dict | None = None, home: Path | None = None
):
    """Binary masks and record of `maps` (made by the model in `source`) under the configured rules, built
    once under `home` (default `source`; the teacher's sets live beside the maps they derive from)."""
    settings = mask_settings(cfg)
    record = dm.data_record(masks=True)
    pdir = pseudo_dir(home or source, settings, {**_data_extra(dm), **(extra or {})})

    def build(tmp: Path) -> None:
        announce_rebuild(pdir, record, f"the pseudo masks of {cfg.category.name}")
        write_pseudo_masks(tmp, maps, dm, settings, cfg.category.name, source)
        write_record(tmp, record)

    build_once(pdir, build)
    return np.load(pdir / "masks.npy"), read_pseudo(pdir)


def teacher_pseudo_dir(cfg: DictConfig, dm, teacher) -> Path:
    """The folder of the teacher's pseudo masks for this run's rules, split and data."""
    return pseudo_dir(maps_dir(dm, teacher), mask_settings(cfg), _data_extra(dm))


def ensure_pseudo_masks(cfg: DictConfig, dm) -> tuple[np.ndarray, dict]:
    """Binary pseudo masks ([N,H,W] uint8, manifest order) and their record (thresholds, quality vs GT);
    the teacher is ensured first (trained once if needed). `load_targets(record)` gives what to train on."""
    teacher = ensure_teacher(cfg, dm)
    maps = teacher_maps(cfg, dm, teacher)
    masks, info = ensure_masks_from(maps, teacher.dir, cfg, dm, home=maps_dir(dm, teacher))
    warn_without_evidence(info.get("evidence"), cfg.category.name)  # the teacher's set, built or reused
    info["maps"] = str(maps_dir(dm, teacher) / "maps.npy")
    return masks, info
