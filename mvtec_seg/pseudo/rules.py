"""Rules that turn anomaly maps into training targets, none of them looking at GT.

What the rules may read: the maps, which train-part images are known normals (`known_idx`: `train/good`,
`data.sources`) and the calibration images (`calibration_idx`: known normals the teacher did not train on,
the val part's `train/good` images; the teacher's own training images score lower than normal images it
never saw, so quantiles taken on them mark too much). Every other train-part image is unlabelled. With
`mask.image_labels=true` both sets are every normal train-part image (the weak-supervision variant).

Why more than one threshold: a quantile of the normal pixels marks that share of every normal image as
defective, so the normal images (most of the train part) teach false positives. The rules below use the
normal images' distribution in other ways:

- gating: an image whose score (max of its map) stays within the calibration images' scores gets an empty
  mask; the level is a fixed quantile of their scores (`quantile`), or where their scores separate best
  from the unlabelled train images' (`separation`: the level that maximises the gap between the two
  empirical distribution functions, as in a two-sample Kolmogorov-Smirnov test; it adapts to how well the
  teacher separates them, and needs no label of the unlabelled images);
- `evidence`: the maps' masks are used only where the gate flags more unlabelled train images than known
  normals would give (`teacher_evidence`, a binomial p-value at most this level); else none is and every
  image that is not a known normal counts as gated: with `gated=ignore` the run trains on the known normals
  alone, as `mask=synthetic_only` does;
- `normal_empty`: the known normals of the train part (the images the teacher trains on) get empty targets;
- `gated`: what a gated image that is not a known normal teaches: `empty` (no defect), or `ignore` (loss
  weight 0 on the whole image): a low score does not tell whether the teacher missed a defect, so the image
  is left out rather than taught as defect-free;
- MEBin (`mebin.py`): a threshold per image where its regions are stable;
- hysteresis (`skimage.filters.apply_hysteresis_threshold`): a region needs one pixel above the high
  threshold and grows through pixels above the low one;
- regions (`skimage.morphology`): regions below `min_area` pixels are dropped, holes up to `fill_holes`
  pixels filled;
- target `ignore`: pixels between the low and the high threshold that the rules left out get weight 0;
- target `soft`: the map calibrated to [0, 1] between the low and the high threshold (soft BCE); the same
  calibrated map is the distillation target (`mask.distill.weight`) beside hard targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest
from skimage.filters import apply_hysteresis_threshold
from skimage.morphology import remove_small_holes, remove_small_objects

from mvtec_seg.metrics import image_scores as _image_scores
from mvtec_seg.pseudo.mebin import mebin
from mvtec_seg.pseudo.thresholds import mask_threshold

TARGETS = ("hard", "ignore", "soft")
GATES = ("quantile", "separation")
GATED = ("empty", "ignore")


@dataclass
class Targets:
    """Derived targets over the manifest: `mask` (uint8 {0,1}, scored against GT), `target` (what the
    segmenter is trained on: the mask, or the soft map), `weight` (uint8 per-pixel loss weight, or None)
    and the record of the thresholds used."""

    mask: np.ndarray
    target: np.ndarray
    weight: np.ndarray | None
    record: dict
    soft: np.ndarray | None = None  # float16 calibrated map: the distillation target (mask.distill)


def strategy_label(settings: dict, rounds: int = 0) -> str:
    """A short name of the rules, e.g. `hysteresis 0.98/0.995 + gate 0.95 + area 16 + ignore + 1 round`."""
    th = settings["threshold"]
    s = th["strategy"]
    if s == "quantile":
        s += f" {th.get('quantile')}"
    elif s == "hysteresis":
        s += f" {th.get('low_quantile')}/{th.get('quantile')}"
    elif s == "fixed":
        s += f" {th.get('fixed')}"
    parts = [s]
    gate = settings.get("gate") or {}
    if gate.get("strategy") == "separation":
        parts.append("gate separation")
    elif gate.get("quantile") is not None:
        parts.append(f"gate {gate['quantile']}")
    if settings.get("normal_empty"):
        parts.append("normals empty")
    if settings.get("gated", "empty") == "ignore":
        parts.append("gated ignored")
    regions = settings.get("regions") or {}
    if regions.get("min_area"):
        parts.append(f"area {regions['min_area']}")
    if regions.get("fill_holes"):
        parts.append(f"holes {regions['fill_holes']}")
    if settings.get("target", "hard") != "hard":
        parts.append(settings["target"])
    if settings.get("synthetic_fraction"):
        parts.append(f"synthetic {settings['synthetic_fraction']}")
    if settings.get("evidence") is not None:
        parts.append(f"evidence {settings['evidence']}")
    if (settings.get("distill") or {}).get("weight"):
        parts.append(f"distill {settings['distill']['weight']}")
    if rounds:
        parts.append(f"{rounds} round" + ("s" if rounds > 1 else ""))
    return " + ".join(parts)


def image_scores(maps: np.ndarray) -> np.ndarray:
    """Image score = max of its map (`metrics.image_scores`, the one definition), as float32 numpy."""
    import torch

    return _image_scores(torch.from_numpy(np.asarray(maps, dtype=np.float32))).numpy()


def separation_level(normal: np.ndarray, others: np.ndarray) -> float:
    """The score level that best separates `normal` scores from `others`: the maximiser of
    F_normal(level) - F_others(level) over the observed scores (the two-sample KS statistic's location),
    the lowest such level on a tie. An image at or below it counts as normal."""
    levels = np.unique(np.concatenate([normal, others]))
    f_normal = np.searchsorted(np.sort(normal), levels, side="right") / len(normal)
    f_others = np.searchsorted(np.sort(others), levels, side="right") / len(others)
    return float(levels[int(np.argmax(f_normal - f_others))])


def gate_level(
    maps: np.ndarray,
    train_idx: np.ndarray,
    known_idx: np.ndarray,
    gate: dict,
    calibration_idx: np.ndarray | None = None,
) -> float | None:
    """The image score at or below which an image counts as normal (None: gating off): a quantile of the
    calibration images' scores, or where they separate from the unlabelled train images' (train-part
    images that are not in `known_idx`). `calibration_idx` defaults to `known_idx`."""
    strategy = gate.get("strategy", "quantile")
    if strategy == "quantile" and gate.get("quantile") is None:
        return None
    calibration = known_idx if calibration_idx is None else calibration_idx
    if len(calibration) == 0:
        raise ValueError("mask.gate needs known normal images to calibrate on")
    normal_scores = image_scores(maps[calibration])
    unlabelled = np.setdiff1d(train_idx, known_idx)
    if strategy == "separation" and len(unlabelled):
        return separation_level(normal_scores, image_scores(maps[unlabelled]))
    q = gate.get("quantile")
    return float(np.quantile(normal_scores, 0.99 if q is None else float(q)))


def teacher_evidence(calibration: np.ndarray, unlabelled: np.ndarray, level: float) -> dict:
    """Whether the teacher finds anything in the unlabelled pile, without GT: how many unlabelled train images
    score above the gate `level`, against how many would were they all normal. A normal image exceeds the
    level with probability at most (calibration images above it + 1) / (calibration images + 1) (the
    calibration images are exchangeable with unseen normals); `p_value` is the one-sided binomial test of
    the count against that rate. A large one says the teacher's maps of the unlabelled images look like its
    maps of known normals: its masks carry little beyond the synthetic defects."""
    n_cal, n = len(calibration), len(unlabelled)
    rate = (int((calibration > level).sum()) + 1) / (n_cal + 1)
    flagged = int((unlabelled > level).sum())
    p_value = binomtest(flagged, n, rate, alternative="greater").pvalue if n else 1.0
    return {
        "unlabelled": n,
        "flagged": flagged,
        "expected_if_normal": rate * n,
        "p_value": float(p_value),
    }


def maps_used(evidence: dict, level: float | None) -> bool:
    """Whether the maps' masks are used (`mask.evidence`): only where the evidence's p-value is at most
    `level` (None: always). Above it the gate flags the unlabelled images about as often as known normals,
    so the few it flags are as likely false alarms as defects: every image then gets an empty mask, the
    train part's known normals are taught defect-free and the rest weigh as gated images do (`gated`)."""
    return level is None or evidence["p_value"] <= float(level)


def hysteresis_masks(maps: np.ndarray, low: float, high: float) -> np.ndarray:
    """Per image: pixels above `low` connected to a pixel above `high`."""
    return np.stack(
        [apply_hysteresis_threshold(np.asarray(m, dtype=np.float32), low, high) for m in maps]
    ).astype(np.uint8)


def clean_regions(masks: np.ndarray, min_area: int = 0, fill_holes: int = 0) -> np.ndarray:
    """Drop regions smaller than `min_area` pixels and fill holes of at most `fill_holes` pixels."""
    out = np.asarray(masks).astype(bool)
    for i in range(len(out)):
        if min_area > 1:
            out[i] = remove_small_objects(out[i], max_size=int(min_area) - 1)
        if fill_holes > 0:
            out[i] = remove_small_holes(out[i], max_size=int(fill_holes))
    return out.astype(np.uint8)


def calibrate(maps: np.ndarray, low: float, high: float) -> np.ndarray:
    """Scores mapped linearly to [0, 1]: 0 at the low threshold, 1 at the high one (float32)."""
    span = max(high - low, 1e-12)
    return np.clip((np.asarray(maps, dtype=np.float32) - low) / span, 0.0, 1.0)


def derive_targets(
    maps: np.ndarray,
    train_idx: np.ndarray,
    known_idx: np.ndarray,
    settings: dict,
    calibration_idx: np.ndarray | None = None,
) -> Targets:
    """Apply the rules in `settings` (`cfg.mask` without `name`/`rounds`) to every map of the manifest.

    `known_idx`: the train part's known normals (emptied by `normal_empty`, never gated away as unlabelled);
    `calibration_idx` (default `known_idx`): the images the quantiles and the gate are calibrated on. Never
    GT, and no image label beyond these two sets.
    """
    th = settings["threshold"]
    strategy = th["strategy"]
    maps = np.asarray(maps, dtype=np.float32)
    calibration = known_idx if calibration_idx is None else calibration_idx
    high = mask_threshold(
        maps, train_idx, calibration, strategy, th.get("quantile", 0.995), th.get("fixed", 0.5)
    )
    target_kind = settings.get("target", "hard")
    if target_kind not in TARGETS:
        raise ValueError(f"mask.target={target_kind!r} is not one of {TARGETS}")
    distill = float((settings.get("distill") or {}).get("weight") or 0.0)
    needs_low = strategy in ("hysteresis", "mebin") or target_kind != "hard" or distill > 0
    low = high
    if needs_low:
        if len(calibration) == 0:
            raise ValueError("mask.threshold.low_quantile needs known normal images to calibrate on")
        low = min(high, float(np.quantile(maps[calibration], float(th.get("low_quantile", 0.98)))))
    record: dict = {"threshold": high, "low_threshold": low}
    if strategy == "hysteresis":
        masks = hysteresis_masks(maps, low, high)
    elif strategy == "mebin":
        options = th.get("mebin") or {}
        masks, per_image = mebin(maps, train_idx, **options)
        finite = per_image[np.isfinite(per_image)]
        record["mebin_thresholds"] = {
            "median": float(np.median(finite)) if len(finite) else None,
            "n_empty": int((~np.isfinite(per_image)).sum()),
        }
    else:
        masks = (maps >= high).astype(np.uint8)
    regions = settings.get("regions") or {}
    masks = clean_regions(masks, int(regions.get("min_area", 0)), int(regions.get("fill_holes", 0)))
    level = gate_level(maps, train_idx, known_idx, settings.get("gate") or {}, calibration)
    scores = image_scores(maps)
    gated = scores <= level if level is not None else np.zeros(len(maps), dtype=bool)
    used = True
    if level is not None:
        unlabelled = np.setdiff1d(train_idx, known_idx)
        record["evidence"] = teacher_evidence(scores[calibration], scores[unlabelled], level)
        used = record["evidence"]["maps_used"] = maps_used(record["evidence"], settings.get("evidence"))
    if not used:  # what synthetic only trains on: the known normals, nothing else
        gated[:] = True
    known_normal = np.zeros(len(maps), dtype=bool)
    if settings.get("normal_empty") or not used:
        known_normal[known_idx] = True
    gated |= known_normal
    masks[gated] = 0
    weight = None
    if settings.get("gated", "empty") == "ignore":
        weight = np.ones(maps.shape, dtype=np.uint8)
        weight[gated & ~known_normal] = 0
    target: np.ndarray = masks
    if target_kind == "ignore":
        uncertain = (maps >= low) & (maps < high) & (masks == 0) & ~gated[:, None, None]
        weight = (~uncertain).astype(np.uint8) * (1 if weight is None else weight)
    elif target_kind == "soft":
        target = calibrate(maps, low, high).astype(np.float16)
        target[gated] = 0
    soft = None
    if distill > 0:
        soft = calibrate(maps, low, high).astype(np.float16)
        soft[gated] = 0
    record |= {"gate_level": level, "n_gated": int(gated.sum())}
    return Targets(masks, target, weight, record, soft)
