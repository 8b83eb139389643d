"""Pseudo-mask rules (gating, hysteresis, regions, ignore, soft), the weighted loss, and the new options end
to end (self-training round included) in `debug=fast`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEACHER_FAST, compose_cfg, with_teacher
from segmentation_models_pytorch.losses import DiceLoss

from mvtec_seg.builders import build_datamodule
from mvtec_seg.models.segmenter.loss import SegmentationLoss, weighted_bce, weighted_dice
from mvtec_seg.pseudo.masks import load_targets
from mvtec_seg.pseudo.rules import (
    calibrate,
    clean_regions,
    derive_targets,
    gate_level,
    hysteresis_masks,
    strategy_label,
    teacher_evidence,
)
from mvtec_seg.train import train


def _settings(**over) -> dict:
    s = {
        "threshold": {"strategy": "quantile", "quantile": 0.9, "low_quantile": 0.5, "fixed": 0.5},
        "gate": {"quantile": None},
        "regions": {"min_area": 0, "fill_holes": 0},
        "target": "hard",
    }
    for k, v in over.items():
        s[k] = {**s[k], **v} if isinstance(v, dict) else v
    return s


def _maps() -> np.ndarray:
    """Images 0-1 normal noise in [0, 0.4]; image 2 a 3x3 blob at 0.9 with a 0.6 halo and a lone 0.95 pixel;
    image 3 a weak blob at 0.45 only."""
    rng = np.random.default_rng(0)
    maps = rng.uniform(0.0, 0.4, (4, 12, 12)).astype(np.float32)
    maps[2, 2:7, 2:7] = 0.6
    maps[2, 3:6, 3:6] = 0.9
    maps[2, 10, 10] = 0.95
    maps[3, 5:8, 5:8] = 0.45
    return maps


def test_gating_empties_images_within_the_normal_score_distribution():
    maps = _maps()
    normal = np.array([0, 1])
    level = gate_level(maps, np.arange(4), normal, {"quantile": 1.0})
    assert level == pytest.approx(maps[:2].max())
    plain = derive_targets(maps, np.arange(4), normal, _settings())
    gated = derive_targets(maps, np.arange(4), normal, _settings(gate={"quantile": 1.0}))
    assert plain.mask[:2].any()  # the 0.9 quantile of normal pixels marks pixels of the normal images
    assert not gated.mask[:2].any() and gated.record["n_gated"] == 2
    assert np.array_equal(gated.mask[2:], plain.mask[2:])  # anomalous images untouched


def test_hysteresis_grows_from_high_seeds_through_low_pixels():
    maps = _maps()
    m = hysteresis_masks(maps, low=0.5, high=0.8)
    assert m[2, 2:7, 2:7].all()  # halo joined through the 0.9 core
    assert not m[3].any()  # 0.45 never reaches low
    assert not hysteresis_masks(maps[3:], low=0.42, high=0.8).any()  # above low but no seed: dropped
    assert m[2, 10, 10] == 1 and m.sum() == 25 + 1


def test_region_rules_drop_small_regions_and_fill_holes():
    mask = np.zeros((1, 10, 10), dtype=np.uint8)
    mask[0, 1:6, 1:6] = 1
    mask[0, 3, 3] = 0  # a 1-pixel hole
    mask[0, 8, 8] = 1  # a 1-pixel region
    out = clean_regions(mask, min_area=2, fill_holes=1)
    assert out[0, 8, 8] == 0 and out[0, 3, 3] == 1 and out.sum() == 25
    assert np.array_equal(clean_regions(mask), mask)  # defaults change nothing


def test_ignore_weights_zero_only_uncertain_unmarked_pixels():
    maps = _maps()
    t = derive_targets(
        maps,
        np.arange(4),
        np.array([0, 1]),
        _settings(threshold={"strategy": "fixed", "fixed": 0.8}, target="ignore"),
    )
    low, high = t.record["low_threshold"], t.record["threshold"]
    assert high == 0.8 and low < high
    assert t.weight is not None and t.weight.dtype == np.uint8
    uncertain = (maps >= low) & (maps < high) & (t.mask == 0)
    assert np.array_equal(t.weight == 0, uncertain)
    assert (t.weight[2, 3:6, 3:6] == 1).all() and (t.weight[2, 2, 2] == 0)  # halo ignored, core kept


def test_soft_target_is_the_calibrated_map():
    maps = _maps()
    t = derive_targets(maps, np.arange(4), np.array([0, 1]), _settings(target="soft", gate={"quantile": 1.0}))
    low, high = t.record["low_threshold"], t.record["threshold"]
    assert t.target.dtype == np.float16 and t.weight is None
    assert not t.target[:2].any()  # gated images: zero target
    expected = calibrate(maps[2:], low, high)
    assert np.allclose(t.target[2:].astype(np.float32), expected, atol=1e-3)
    assert expected.min() == 0.0 and expected.max() == 1.0 and ((expected > 0) & (expected < 1)).any()
    assert set(np.unique(t.mask)) <= {0, 1}


def test_fixed_threshold_is_kept_and_labelled():
    maps = _maps()
    t = derive_targets(maps, np.arange(4), np.array([0, 1]), _settings(threshold={"strategy": "fixed"}))
    assert t.record["threshold"] == 0.5 and np.array_equal(t.mask, (maps >= 0.5).astype(np.uint8))
    assert strategy_label(_settings(threshold={"strategy": "fixed"})) == "fixed 0.5"
    label = strategy_label(
        _settings(threshold={"strategy": "hysteresis"}, gate={"quantile": 0.9}, target="ignore"), 2
    )
    assert label == "hysteresis 0.5/0.9 + gate 0.9 + ignore + 2 rounds"


def test_weighted_loss_matches_smp_without_weights_and_ignores_weight_zero():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.7).float()
    ones = torch.ones_like(target)
    ref = DiceLoss(mode="binary", from_logits=True)(logits, target)
    assert weighted_dice(logits, target) == pytest.approx(float(ref), abs=1e-6)
    assert weighted_dice(logits, target, ones) == pytest.approx(float(ref), abs=1e-6)
    bce = torch.nn.BCEWithLogitsLoss()(logits, target)
    assert weighted_bce(logits, target, ones) == pytest.approx(float(bce), abs=1e-6)
    # changing logits where the weight is 0 changes neither term
    weight = ones.clone()
    weight[:, :, :4] = 0
    other = logits.clone()
    other[:, :, :4] += 5.0
    loss = SegmentationLoss(1.0, 1.0)
    a, b = loss(logits, target, weight), loss(other, target, weight)
    assert float(a["loss"]) == pytest.approx(float(b["loss"]))
    assert float(loss(other, target)["loss"]) != pytest.approx(float(a["loss"]))
    # soft targets are accepted (soft BCE)
    soft = torch.rand(2, 1, 8, 8)
    assert torch.isfinite(loss(logits, soft, ones)["loss"])


FAST = TEACHER_FAST  # the session teacher (conftest.teacher_cache)


@pytest.mark.slow
def test_new_options_end_to_end_with_a_self_training_round(tmp_path, teacher_cache):
    with_teacher(teacher_cache, tmp_path)
    over = [
        "mask=pseudo",
        *FAST,
        "mask.threshold.strategy=hysteresis",
        "mask.gate.quantile=0.9",
        "mask.regions.min_area=4",
        "mask.target=ignore",
        "mask.rounds=1",
        "mask.evidence=null",  # the tiny teacher's masks, whatever its evidence
    ]
    cfg = compose_cfg(tmp_path, over)
    summary = train(cfg)
    assert summary["status"] == "ok"
    info = summary["pseudo"]
    assert info["round"] == 1 and [r["round"] for r in info["rounds"]] == [0, 1]
    assert info["label"].startswith("hysteresis") and info["label"].endswith("1 round")
    first, last = (Path(r["dir"]) for r in info["rounds"])
    assert last.is_relative_to(first) and (last.parent.parent / "maps.npy").exists()  # round under round 0
    dm = build_datamodule(cfg)
    dm.prepare()
    for record in info["rounds"]:
        q = record["quality"]["train"]
        assert set(q) == {"IoU", "precision", "recall", "normal_nonempty"}
        masks = np.load(Path(record["dir"]) / "masks.npy")
        normal = dm.indices("train", normal_only=True)
        assert q["normal_nonempty"] == pytest.approx(masks[normal].reshape(len(normal), -1).any(1).mean())
        target, weight, _ = load_targets(record)
        assert weight is not None and weight.shape == target.shape == masks.shape
    # the datamodule serves the weight map next to the target, flipped and cropped with it
    target, weight, _ = load_targets(info)
    dm.set_target_masks(target, weight)
    batch = next(iter(dm.val_dataloader()))
    assert batch["target_weight"].shape == batch["target_mask"].shape
    idx = batch["index"].numpy()
    assert np.array_equal(batch["target_weight"][:, 0].numpy(), weight[idx].astype(np.float32))
    # a second run reuses every round (no retraining: same folders, same maps file)
    mtime = (last.parent.parent / "maps.npy").stat().st_mtime_ns
    again = train(compose_cfg(tmp_path, over + [f"paths.run_dir={tmp_path / 'again'}"]))
    assert [r["dir"] for r in again["pseudo"]["rounds"]] == [r["dir"] for r in info["rounds"]]
    assert (last.parent.parent / "maps.npy").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_a_run_whose_teacher_shows_no_evidence_trains_like_synthetic_only(tmp_path, teacher_cache):
    from mvtec_seg.pseudo.masks import chain_sets

    with_teacher(teacher_cache, tmp_path)
    cfg = compose_cfg(tmp_path, ["mask=pseudo", *FAST, "mask.evidence=0"])  # no p-value is at most 0
    summary = train(cfg)
    info = summary["pseudo"]
    assert summary["status"] == "ok" and info["evidence"]["maps_used"] is False
    target, weight, _ = load_targets(info)
    assert target.sum() == 0 and weight is not None
    dm = build_datamodule(cfg)
    dm.prepare()
    dm.set_target_masks(target, weight)
    known = chain_sets(dm, info["settings"])[1]
    assert sorted(dm.dataset("train").indices.tolist()) == sorted(known.tolist())  # the known normals only
    # the val part's targets mark nothing: the decision threshold is chosen on the synthetic validation set
    chosen = summary["decision_threshold"]
    assert chosen["targets"] == "synthetic_val" and math.isfinite(chosen["value"])
    assert math.isfinite(summary["metrics"]["test/IoU_at_threshold"])


def test_teacher_evidence_counts_flagged_unlabelled_images_against_the_normal_rate():
    calibration = np.array([0.1, 0.2, 0.3, 0.4])  # one of four above 0.35: rate (1 + 1) / (4 + 1)
    unlabelled = np.array([0.05, 0.36, 0.5, 0.9, 0.2])
    e = teacher_evidence(calibration, unlabelled, level=0.35)
    assert e["unlabelled"] == 5 and e["flagged"] == 3
    assert e["expected_if_normal"] == pytest.approx(5 * 0.4)
    # the binomial tail P(X >= 3), X ~ B(5, 0.4), summed by hand
    tail = sum(math.comb(5, k) * 0.4**k * 0.6 ** (5 - k) for k in range(3, 6))
    assert e["p_value"] == pytest.approx(tail)


def test_teacher_evidence_separates_a_blind_teacher_from_one_that_sees():
    rng = np.random.default_rng(0)
    calibration = rng.normal(0.0, 1.0, 80)
    level = float(np.quantile(calibration, 0.99))
    blind = teacher_evidence(calibration, rng.normal(0.0, 1.0, 400), level)
    seeing = teacher_evidence(
        calibration, np.concatenate([rng.normal(0, 1, 300), rng.normal(4, 1, 100)]), level
    )
    assert blind["p_value"] > 0.01 > 1e-6 > seeing["p_value"]
    assert seeing["flagged"] >= 90


def test_derive_targets_records_the_teachers_evidence_only_with_a_gate():
    maps = _maps()
    normal = np.array([0, 1])
    gated = derive_targets(maps, np.arange(4), normal, _settings(gate={"quantile": 1.0}))
    assert gated.record["evidence"]["unlabelled"] == 2 and gated.record["evidence"]["flagged"] == 2
    assert "evidence" not in derive_targets(maps, np.arange(4), normal, _settings()).record


def _blind_and_seeing_maps() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(maps, known normals, calibration images) of 60 images: 0-9 known normals, 10-19 calibration,
    20-59 unlabelled; each map noise in [0, 0.4] with a random 4x4 bump of height 0.3-0.5."""
    rng = np.random.default_rng(1)
    maps = rng.uniform(0.0, 0.4, (60, 16, 16)).astype(np.float32)
    for i, (y, x) in enumerate(rng.integers(0, 12, (60, 2))):
        maps[i, y : y + 4, x : x + 4] += rng.uniform(0.3, 0.5)
    return maps, np.arange(10), np.arange(10, 20)


@pytest.mark.parametrize("gated", ["ignore", "empty"])
def test_without_evidence_the_maps_masks_are_not_used(gated):
    maps, known, calibration = _blind_and_seeing_maps()
    train = np.concatenate([known, np.arange(20, 60)])
    settings = _settings(gate={"quantile": 0.9}, normal_empty=False, gated=gated, evidence=0.01)
    blind = derive_targets(maps, train, known, settings, calibration)
    assert blind.record["evidence"]["p_value"] > 0.01 and not blind.record["evidence"]["maps_used"]
    assert blind.mask.sum() == 0  # nothing from the maps, known normals taught defect-free
    weight = np.ones(len(maps)) if blind.weight is None else blind.weight.reshape(60, -1).min(1)
    assert weight[known].all() and (weight[20:] == (gated == "empty")).all()
    always = derive_targets(maps, train, known, settings | {"evidence": None}, calibration)
    assert always.record["evidence"]["maps_used"] and always.mask[20:].sum() > 0

    seeing = maps.copy()
    seeing[20:40, 6:10, 6:10] = 2.0  # half the unlabelled pile holds a defect the teacher sees
    used = derive_targets(seeing, train, known, settings, calibration)
    assert used.record["evidence"]["p_value"] < 1e-6 and used.record["evidence"]["maps_used"]
    assert used.mask[20:40, 6:10, 6:10].all()


def test_an_image_weighted_zero_everywhere_is_not_loaded_for_training(tmp_path):
    dm = build_datamodule(compose_cfg(tmp_path, ["debug=fast"]))
    dm.prepare()
    shape, train, val = dm.gt_masks.shape, dm.indices("train"), dm.indices("val")
    weight = np.ones(shape, dtype=np.uint8)
    weight[train[:3]] = 0  # gated and ignored: nothing to learn from
    weight[train[3], 0, 0] = 0  # partly ignored: still trained on
    weight[val[:2]] = 0
    dm.set_target_masks(np.zeros(shape, dtype=np.uint8), weight)
    assert sorted(dm.dataset("train").indices.tolist()) == sorted(train[3:].tolist())
    assert sorted(dm.dataset("val").indices.tolist()) == sorted(val.tolist())
    dm.use_gt_targets(train[:1])  # a labelled image (mask=mixed) is trained on again
    assert sorted(dm.dataset("train").indices.tolist()) == sorted([train[0], *train[3:]])


def test_a_teacher_without_evidence_is_named_in_one_line(caplog):
    from mvtec_seg.pseudo.masks import warn_without_evidence

    blind = {"unlabelled": 398, "flagged": 7, "expected_if_normal": 12.1, "p_value": 0.96}
    with caplog.at_level("WARNING", logger="mvtec_seg.pseudo.masks"):
        warn_without_evidence(blind, "tiles")
        warn_without_evidence(blind | {"flagged": 49, "p_value": 1e-40}, "tiles")
        warn_without_evidence(None, "tiles")  # no gate: nothing to say
        warn_without_evidence(blind | {"maps_used": False}, "tiles")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "7 of 398" in lines[0] and "compare with mask=synthetic_only" in lines[0]
    assert "not used (mask.evidence)" in lines[1]
