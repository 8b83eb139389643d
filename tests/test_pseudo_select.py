"""GT-free pseudo masks that adapt: MEBin (against a brute-force reading of its definition), the separation
gate, known normals left empty, synthetic defects for students and for the synthetic validation set, and
`mask.select=auto` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PSEUDO_FAST, compose_cfg, with_teacher
from scipy import ndimage

from mvtec_seg.builders import build_datamodule, build_model
from mvtec_seg.models.segmenter.synthetic import SyntheticDefects
from mvtec_seg.pseudo.mebin import mebin, region_counts, stable_level
from mvtec_seg.pseudo.rules import derive_targets, separation_level
from mvtec_seg.pseudo.select import choose
from mvtec_seg.pseudo.synthetic_val import ensure_synthetic_val
from mvtec_seg.train import train

RULES = {
    "threshold": {"strategy": "quantile", "quantile": 0.9, "low_quantile": 0.5, "fixed": 0.5},
    "gate": {"strategy": "quantile", "quantile": None},
    "regions": {"min_area": 0, "fill_holes": 0},
    "target": "hard",
}


def _brute_mebin(maps, reference, rate, min_interval, erode):
    """MEBin as the paper states it, one image and one level at a time (scipy's 2-D labelling)."""
    peaks = [maps[i].max() for i in reference]
    lo, hi = min(peaks), max(peaks)
    thresholds = []
    for m in maps:
        norm = np.where(m < lo, 0, np.clip((m - lo) / (hi - lo) * 255, 0, 255))
        counts = []
        for level in range(255, -1, -rate):
            b = ndimage.binary_erosion(norm > level, structure=np.ones((erode, erode), bool))
            counts.append(ndimage.label(b, structure=np.ones((3, 3)))[1])
        runs, i = [], 0
        while i < len(counts):  # (count, length, end) of every constant run
            j = i
            while j + 1 < len(counts) and counts[j + 1] == counts[i]:
                j += 1
            runs.append((counts[i], j - i + 1, j))
            i = j + 1
        ok = [r for r in runs if r[0] > 0 and r[1] >= min_interval]
        if not ok:
            thresholds.append(np.inf)
            continue
        longest = max(r[1] for r in ok)
        first = next(r for r in ok if max(s[1] for s in ok if s[0] == r[0]) == longest)
        best_of_count = max((r for r in ok if r[0] == first[0]), key=lambda r: r[1])
        thresholds.append((255 - best_of_count[2] * rate) / 255 * (hi - lo) + lo)
    return np.array(thresholds, dtype=np.float32)


@pytest.mark.parametrize("seed", range(4))
def test_mebin_equals_a_brute_force_reading_of_its_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    maps = rng.random((6, 24, 24)).astype(np.float32) * 0.3
    yy, xx = np.mgrid[:24, :24]
    for i in range(1, 6):  # one to three smooth blobs of different strengths
        for _ in range(int(rng.integers(1, 4))):
            cy, cx, r = rng.integers(4, 20), rng.integers(4, 20), rng.uniform(2, 5)
            maps[i] += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    reference = np.arange(6)
    masks, thresholds = mebin(maps, reference, sample_rate=8, min_interval=3, erode=2)
    expected = _brute_mebin(maps, reference, 8, 3, 2)
    np.testing.assert_allclose(thresholds, expected, rtol=1e-5)
    assert np.array_equal(masks, (maps > thresholds[:, None, None]).astype(np.uint8))
    assert np.isinf(thresholds).sum() == np.isinf(expected).sum() and masks[np.isfinite(thresholds)].any()


def test_region_counts_keep_slices_apart_and_stable_runs_pick_the_longest() -> None:
    b = np.zeros((3, 8, 8), dtype=bool)
    b[0, 1, 1] = b[0, 5, 5] = True  # two regions
    b[1] = True  # one region touching both neighbours in the stack
    b[2, 0, 0] = b[2, 1, 1] = True  # diagonal neighbours: one 8-connected region
    assert region_counts(b).tolist() == [2, 1, 1]
    assert stable_level(np.array([0, 2, 2, 2, 1, 1, 1, 1, 3]), 3) == 7
    assert stable_level(np.array([0, 0, 1, 2, 1]), 2) is None


def test_separation_gate_adapts_to_the_normal_scores() -> None:
    normal = np.array([0.1, 0.2, 0.3, 0.35])
    others = np.array([0.32, 0.6, 0.7, 0.8])
    # 0.3 and 0.35 both reach F_n - F_o = 0.75: the lower level gates fewer images
    assert separation_level(normal, others) == pytest.approx(0.3)
    others = np.array([0.36, 0.6, 0.7, 0.8])
    assert separation_level(normal, others) == pytest.approx(0.35)  # F_n - F_o = 1
    maps = np.zeros((8, 4, 4), dtype=np.float32)
    for i, s in enumerate([*normal, *others]):
        maps[i, 1, 1] = s
    t = derive_targets(maps, np.arange(8), np.arange(4), RULES | {"gate": {"strategy": "separation"}})
    assert t.record["gate_level"] == pytest.approx(0.35)
    assert t.record["n_gated"] == 4 and not t.mask[:4].any() and t.mask[4:].any()


def test_known_normals_get_empty_targets_and_distill_gets_the_calibrated_map() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((6, 8, 8)).astype(np.float32)
    normal = np.array([0, 1, 2])
    plain = derive_targets(maps, np.arange(6), normal, RULES)
    assert plain.mask[normal].any() and plain.soft is None
    t = derive_targets(maps, np.arange(6), normal, RULES | {"normal_empty": True, "distill": {"weight": 1.0}})
    assert not t.mask[normal].any() and np.array_equal(t.mask[3:], plain.mask[3:])
    assert t.soft.dtype == np.float16 and not t.soft[normal].any() and (t.soft[3:] > 0).any()
    assert float(t.soft.max()) <= 1.0


def test_synthetic_defects_have_exact_masks_and_go_on_known_normal_rows_only() -> None:
    images = torch.full((6, 3, 32, 32), 0.5)
    defects = SyntheticDefects(kind="texture", seed=0)
    out, mask = defects(images)
    assert mask.shape == (6, 1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.flatten(1).sum(1) > 0).all()
    assert torch.equal(out[mask.expand_as(out) == 0], images[mask.expand_as(out) == 0])  # untouched outside
    batch = {
        "image": images,
        "target_mask": torch.zeros(6, 1, 32, 32),
        "target_weight": torch.zeros(6, 1, 32, 32),
        "gt_label": torch.tensor([0, 0, 0, 0, 1, 1]),  # row 3: a normal image that is not known (test/good)
        "known_normal": torch.tensor([True, True, True, False, False, False]),
    }
    pasted = SyntheticDefects(kind="texture", seed=1).paste(batch, fraction=1.0)
    changed = (pasted["image"] != images).flatten(1).any(1)
    assert changed[:3].all() and not changed[3:].any()  # the label is never read
    assert torch.equal(pasted["target_mask"][3:], batch["target_mask"][3:])
    assert pasted["target_mask"][:3].flatten(1).any(1).all()
    assert (pasted["target_weight"][:3] == 1).all() and (pasted["target_weight"][3:] == 0).all()
    none = SyntheticDefects(kind="texture", seed=1).paste(batch, fraction=0.0)
    assert torch.equal(none["image"], images)


def test_choose_takes_the_best_synthetic_score_and_the_first_on_a_tie() -> None:
    records = [
        {"synthetic_val": {"pixel_AUPRO": 0.5, "pixel_AP": 0.2}},
        {"synthetic_val": {"pixel_AUPRO": 0.7, "pixel_AP": 0.1}},
        {"synthetic_val": {"pixel_AUPRO": 0.7, "pixel_AP": 0.1}},
        {"synthetic_val": {"pixel_AUPRO": float("nan"), "pixel_AP": 0.9}},
        {"synthetic_val": None},
    ]
    assert choose(records) == 1


FAST = [*PSEUDO_FAST, "mask.rounds=0"]  # the session teacher (conftest.teacher_cache)


def test_synthetic_val_set_is_cached_and_keyed_by_its_settings(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, FAST)
    dm = build_datamodule(cfg)
    dm.prepare()
    images, masks, labels = ensure_synthetic_val(cfg, dm)
    n = len(dm.indices("val", normal_only=True))
    assert (
        len(images) == n * (1 + cfg.synthetic_val.per_image)
        and labels.sum() == n * cfg.synthetic_val.per_image
    )
    assert not masks[labels == 0].any() and all(m.any() for m in masks[labels == 1])
    again = ensure_synthetic_val(cfg, dm)
    assert np.array_equal(again[0], images)
    other = compose_cfg(tmp_path, [*FAST, "synthetic_val.per_image=1"])
    assert len(ensure_synthetic_val(other, dm)[0]) == 2 * n
    assert len(list((tmp_path / "cache" / "synthetic_val").rglob("images.npy"))) == 2


@pytest.mark.slow
def test_select_auto_trains_each_candidate_and_tests_the_chosen_one(
    tmp_path: Path, teacher_cache: Path
) -> None:
    with_teacher(teacher_cache, tmp_path)
    candidates = (
        "mask.candidates=[{synthetic_fraction: 0.5}, {threshold: {strategy: mebin}, normal_empty: true}]"
    )
    summary = train(compose_cfg(tmp_path, [*FAST, "mask.select=auto", candidates]))
    selection = summary["pseudo"]["selection"]
    records = selection["candidates"]
    assert len(records) == 2 and selection["chosen"] == choose(records)
    for r in records:
        assert Path(r["checkpoint"]).is_file() and 0.0 <= r["synthetic_val"]["pixel_AUPRO"] <= 1.0
    chosen = records[selection["chosen"]]
    assert summary["checkpoint"] == chosen["checkpoint"]
    assert summary["metrics"]["test/pixel_AUPRO"] == pytest.approx(chosen["test_metrics"]["test/pixel_AUPRO"])
    assert records[0]["settings"]["synthetic_fraction"] == 0.5
    assert records[1]["settings"]["threshold"]["strategy"] == "mebin"
    assert [r["protocol"] for r in records] == ["known normals", "known normals"]
    saved = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert saved["pseudo"]["selection"]["label"] == chosen["label"]


def test_students_get_synthetic_defects_and_distillation_from_the_mask_settings(
    tmp_path: Path, teacher_cache: Path
) -> None:
    with_teacher(teacher_cache, tmp_path)
    cfg = compose_cfg(tmp_path, [*FAST, "mask.synthetic_fraction=0.25", "mask.distill.weight=0.5"])
    module = build_model(cfg)
    assert module.hparams.synthetic == {"fraction": 0.25, "kind": "object", "seed": 0}
    assert module.hparams.distill_weight == 0.5
    summary = train(cfg)
    assert summary["status"] == "ok" and summary["pseudo"]["synthetic_val"]["pixel_AUPRO"] is not None
    assert "synthetic 0.25" in summary["pseudo"]["label"]
