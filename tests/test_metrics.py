"""The metrics are instruments: each is checked against an independent brute-force reference
(`references.py`, which shares no code with ``mvtec_seg.metrics``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from references import ref_ap, ref_aupro_from_points, ref_auroc, ref_pro_points
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from mvtec_seg.metrics import (
    METRIC_LABELS,
    METRIC_NAMES,
    AnomalyMetrics,
    UndefinedMetricWarning,
    aupro,
    auroc,
    average_precision,
    binary_clf_curve,
    compute_all,
    image_scores,
    iou,
    precision_recall_curve,
    precision_recall_iou,
    pro_curve,
    roc_curve,
)

TOL = 1e-6
LIMITS = (0.3, 0.05, 1.0)

# ---------------------------------------------------------------------------------------------
# random cases
# ---------------------------------------------------------------------------------------------


def _random_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.integers(0, 6)
    m = np.zeros((h, w), dtype=bool)
    if kind == 0:  # normal image
        return m
    if kind == 1:  # one or two rectangles (possibly touching)
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
            m[y : y + rng.integers(1, 5), x : x + rng.integers(1, 5)] = True
    elif kind == 2:  # scattered single pixels
        idx = rng.choice(h * w, size=rng.integers(1, 6), replace=False)
        m.reshape(-1)[idx] = True
    elif kind == 3:  # diagonal chains: only 8-connectivity joins them
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        for k in range(rng.integers(2, 5)):
            m[y + k, x + k] = True
        m[rng.integers(0, h), rng.integers(0, w)] = True
    else:  # random blobs with many diagonal contacts
        m = rng.random((h, w)) < rng.uniform(0.05, 0.3)
    return m


def make_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """3-6 images of ~12x12 with a mix of mask shapes and score styles; at least one region."""
    rng = np.random.default_rng(seed)
    n, h, w = int(rng.integers(3, 7)), int(rng.integers(10, 14)), int(rng.integers(10, 14))
    target = np.stack([_random_mask(rng, h, w) for _ in range(n)])
    if not target.any():
        target[0, rng.integers(0, h), rng.integers(0, w)] = True
    style = seed % 4
    preds = rng.random((n, h, w)) + rng.uniform(0.0, 0.8) * target
    if style == 1:
        preds = np.round(preds, 1)  # heavy ties
    elif style == 2:
        preds = np.round(preds, 2)
    elif style == 3:
        preds = (preds - 0.7) * 1e3  # outside [0, 1], negatives
    return preds.astype(np.float64), target


SEEDS = list(range(60))

# ---------------------------------------------------------------------------------------------
# exactness against the references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_and_ap_match_bruteforce(seed: int) -> None:
    preds, target = make_case(seed)
    s, y = preds.ravel(), target.ravel()
    assert auroc(torch.from_numpy(preds), torch.from_numpy(target)) == pytest.approx(ref_auroc(s, y), abs=TOL)
    assert average_precision(torch.from_numpy(preds), torch.from_numpy(target)) == pytest.approx(
        ref_ap(s, y), abs=TOL
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_aupro_matches_bruteforce(seed: int) -> None:
    preds, target = make_case(seed)
    points = ref_pro_points(preds, target)
    for limit in LIMITS:
        got = aupro(torch.from_numpy(preds), torch.from_numpy(target), fpr_limit=limit)
        assert got == pytest.approx(ref_aupro_from_points(points, limit), abs=TOL), limit
    fpr, pro = pro_curve(torch.from_numpy(preds), torch.from_numpy(target))
    ref = np.array(points)
    np.testing.assert_allclose(fpr.numpy(), ref[:, 0], atol=TOL)
    np.testing.assert_allclose(pro.numpy(), ref[:, 1], atol=TOL)


@pytest.mark.parametrize("seed", SEEDS[:20])
def test_curves_match_bruteforce(seed: int) -> None:
    """The curves viz draws are the metrics' own: ROC/PR points and the PRO curve cut at the limit."""
    preds, target = make_case(seed)
    s, y = preds.ravel(), target.ravel()
    thresholds = sorted(set(s.tolist()), reverse=True)
    tpr_ref = [0.0] + [np.sum((s >= t) & y) / y.sum() for t in thresholds]
    fpr_ref = [0.0] + [np.sum((s >= t) & ~y) / (~y).sum() for t in thresholds]
    fpr, tpr = roc_curve(torch.from_numpy(preds), torch.from_numpy(target))
    np.testing.assert_allclose(fpr.numpy(), fpr_ref, atol=TOL)
    np.testing.assert_allclose(tpr.numpy(), tpr_ref, atol=TOL)
    precision, recall = precision_recall_curve(torch.from_numpy(preds), torch.from_numpy(target))
    assert float(np.sum(np.diff(np.r_[0.0, recall.numpy()]) * precision.numpy())) == pytest.approx(
        ref_ap(s, y), abs=TOL
    )
    points = ref_pro_points(preds, target)
    for limit in LIMITS:
        fpr, pro = pro_curve(torch.from_numpy(preds), torch.from_numpy(target), fpr_limit=limit)
        assert fpr[-1].item() == pytest.approx(limit) and bool(torch.all(fpr <= limit))
        area = float(np.sum(np.diff(fpr.numpy()) * (pro.numpy()[1:] + pro.numpy()[:-1])) / 2) / limit
        assert area == pytest.approx(ref_aupro_from_points(points, limit), abs=TOL)


@pytest.mark.parametrize("seed", SEEDS[:20])
def test_compute_all_matches_bruteforce(seed: int) -> None:
    preds, target = make_case(seed)
    # one extra all-normal image guarantees both image classes
    preds = np.concatenate([preds, np.full((1, *preds.shape[1:]), preds.min())])
    target = np.concatenate([target, np.zeros((1, *target.shape[1:]), dtype=bool)])
    threshold = float(np.median(preds))
    got = compute_all(
        torch.from_numpy(preds), torch.from_numpy(target), iou_threshold=threshold, fpr_limit=0.3
    )
    assert tuple(got) == METRIC_NAMES
    img_scores = np.array([preds[i].max() for i in range(preds.shape[0])])
    img_labels = np.array([target[i].any() for i in range(preds.shape[0])])
    pred_bin = preds >= threshold
    expected = {
        "image_AUROC": ref_auroc(img_scores, img_labels),
        "pixel_AUROC": ref_auroc(preds.ravel(), target.ravel()),
        "pixel_AP": ref_ap(preds.ravel(), target.ravel()),
        "pixel_AUPRO": ref_aupro_from_points(ref_pro_points(preds, target), 0.3),
        "IoU": np.sum(pred_bin & target) / np.sum(pred_bin | target),
    }
    for name in METRIC_NAMES:
        assert got[name] == pytest.approx(expected[name], abs=TOL), name
        assert isinstance(got[name], float)


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_torchmetrics_on_unit_interval_scores(seed: int) -> None:
    """A second, external implementation (valid when no sigmoid is triggered: scores in [0, 1])."""
    preds, target = make_case(seed * 4 + 1)  # tied scores in [0, 1]
    p, t = torch.from_numpy(preds).clamp(0, 1), torch.from_numpy(target).long()
    assert auroc(p, t) == pytest.approx(binary_auroc(p, t).item(), abs=1e-6)
    assert average_precision(p, t) == pytest.approx(binary_average_precision(p, t).item(), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# hand-checked cases
# ---------------------------------------------------------------------------------------------


def test_every_metric_has_one_label() -> None:
    assert sorted(METRIC_LABELS) == sorted(METRIC_NAMES)


def test_binary_clf_curve_one_point_per_distinct_score() -> None:
    scores = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.1, 0.9], dtype=torch.float64)
    labels = torch.tensor([1, 0, 1, 1, 0, 0])
    fps, tps, thr = binary_clf_curve(scores, labels)
    assert thr.tolist() == [0.9, 0.5, 0.1]
    assert tps.tolist() == [1, 3, 3]
    assert fps.tolist() == [1, 2, 3]


def test_auroc_hand_example_with_ties() -> None:
    # pairs (pos, neg): (0.9 vs 0.9)=1/2, (0.9 vs 0.5)=1, (0.5 vs 0.9)=0, (0.5 vs 0.5)=1/2 -> 2/4
    assert auroc(torch.tensor([0.9, 0.5, 0.9, 0.5]), torch.tensor([1, 1, 0, 0])) == pytest.approx(0.5)
    assert auroc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1, 0, 0])) == 1.0


def test_aupro_hand_example() -> None:
    # one 1x4 image; pixels 0 and 2 are separate regions, pixels 1 and 3 are normal.
    # curve: (0,0) (0,.5) (.5,.5) (.5,1) (1,1) (1,1)
    preds = torch.tensor([[[0.9, 0.8, 0.2, 0.1]]])
    target = torch.tensor([[[1, 0, 1, 0]]])
    assert aupro(preds, target, fpr_limit=1.0) == pytest.approx(0.75)
    assert aupro(preds, target, fpr_limit=0.3) == pytest.approx(0.5)  # .3*.5 / .3
    assert aupro(preds, target, fpr_limit=0.5) == pytest.approx(0.5)  # vertical jump at the limit
    fpr, pro = pro_curve(preds, target)
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    assert pro.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0, 1.0]


def test_aupro_diagonal_neighbours_form_one_region() -> None:
    # a 2x2 block and a pixel touching it diagonally: one region of 5 pixels under 8-connectivity
    target = torch.zeros(1, 5, 5, dtype=torch.bool)
    target[0, 0:2, 0:2] = True
    target[0, 2, 2] = True
    preds = torch.zeros(1, 5, 5)
    preds[0, 2, 2] = 1.0  # only the diagonal pixel is found
    fpr, pro = pro_curve(preds, target)
    assert pro[1].item() == pytest.approx(1 / 5)  # 4-connectivity would give mean(0, 1) = 0.5
    assert fpr[1].item() == 0.0


def test_regions_do_not_connect_across_images() -> None:
    # same pixel set in two images = two regions; hitting one image only gives PRO 0.5, not 1
    target = torch.ones(2, 2, 2, dtype=torch.bool)
    target[:, 1, 1] = False
    preds = torch.zeros(2, 2, 2)
    preds[0, 0, :] = 1.0
    preds[0, 1, 0] = 1.0
    _, pro = pro_curve(preds, target)
    assert pro[1].item() == pytest.approx(0.5)


def test_aupro_divides_by_limit_not_last_fpr() -> None:
    # perfect separation: PRO is 1 right from FPR 0, so the normalised area is exactly 1
    target = torch.zeros(2, 6, 6, dtype=torch.bool)
    target[0, 1:3, 1:4] = True
    preds = target.float() + 0.01 * torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(0))
    for limit in LIMITS:
        assert aupro(preds, target, fpr_limit=limit) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_aupro_rejects_bad_limit(bad: float) -> None:
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(torch.rand(1, 4, 4), torch.ones(1, 4, 4), fpr_limit=bad)


def test_scores_are_used_as_they_are_no_sigmoid() -> None:
    preds, target = make_case(7)
    p, t = torch.from_numpy(preds), torch.from_numpy(target)
    unit = (p - p.min()) / (p.max() - p.min())
    for transformed in (p * 1e3 + 5e3, p - 1e4, unit * 1e3 - 300.0, torch.exp(unit) - 2.0):
        assert auroc(transformed, t) == pytest.approx(auroc(unit, t), abs=1e-12)
        assert average_precision(transformed, t) == pytest.approx(average_precision(unit, t), abs=1e-12)
        assert aupro(transformed, t) == pytest.approx(aupro(unit, t), abs=1e-9)
    # large positive scores: a sigmoid would saturate them all to 1.0 (AUROC 0.5); exact gives 1.0
    big = torch.tensor([1000.0, 2000.0, 3000.0, 4000.0], dtype=torch.float32)
    assert auroc(big, torch.tensor([0, 0, 1, 1])) == 1.0


def test_image_auroc_uses_the_max() -> None:
    # image 0 (anomalous) has a single hot pixel but a low mean; image 1 (normal) a high flat map
    amap = torch.zeros(2, 4, 4)
    amap[0, 0, 0] = 1.0
    amap[1] = 0.5
    mask = torch.zeros(2, 4, 4)
    mask[0, 0, 0] = 1
    assert image_scores(amap).tolist() == [1.0, 0.5]
    assert compute_all(amap, mask)["image_AUROC"] == 1.0  # the mean would rank them the other way


def test_iou_and_precision_recall() -> None:
    preds = torch.tensor([[[0.2, 0.5, 0.7, 0.9]]])  # >= 0.5 -> [0,1,1,1]
    target = torch.tensor([[[1, 1, 0, 0]]])
    assert iou(preds, target) == pytest.approx(1 / 4)
    assert iou(preds, target, threshold=0.8) == pytest.approx(0 / 3)
    res = precision_recall_iou(preds >= 0.5, target)
    assert res == pytest.approx({"IoU": 1 / 4, "precision": 1 / 3, "recall": 1 / 2})


def test_compute_all_accepts_channel_masks_float16_and_labels() -> None:
    preds, target = make_case(3)
    p = torch.from_numpy(preds).float()
    t = torch.from_numpy(target)
    ref = compute_all(p, t)
    assert compute_all(p, t[:, None].float()) == ref
    labels = torch.tensor([bool(m.any()) for m in t])
    assert compute_all(p, t, labels) == ref
    half = p.clamp(-60000, 60000).half()
    assert compute_all(half, t) == compute_all(half.float(), t)


def test_nan_scores_are_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        compute_all(torch.rand(2, 4, 4), torch.zeros(2, 4, 5))


# ---------------------------------------------------------------------------------------------
# undefined cases: NaN plus a warning that says why
# ---------------------------------------------------------------------------------------------


def test_auroc_one_class_is_nan_with_warning() -> None:
    with pytest.warns(UndefinedMetricWarning, match="no anomalous"):
        assert math.isnan(auroc(torch.rand(10), torch.zeros(10)))
    with pytest.warns(UndefinedMetricWarning, match="no normal"):
        assert math.isnan(auroc(torch.rand(10), torch.ones(10)))


def test_ap_no_positive_is_nan_with_warning() -> None:
    with pytest.warns(UndefinedMetricWarning, match="AP undefined"):
        assert math.isnan(average_precision(torch.rand(10), torch.zeros(10)))


def test_aupro_undefined_cases() -> None:
    with pytest.warns(UndefinedMetricWarning, match="no anomalous region"):
        assert math.isnan(aupro(torch.rand(2, 4, 4), torch.zeros(2, 4, 4)))
    with pytest.warns(UndefinedMetricWarning, match="no normal pixel"):
        assert math.isnan(aupro(torch.rand(2, 4, 4), torch.ones(2, 4, 4)))
    with pytest.warns(UndefinedMetricWarning):
        fpr, pro = pro_curve(torch.rand(2, 4, 4), torch.zeros(2, 4, 4))
    assert fpr.numel() == 0 and pro.numel() == 0


def test_iou_and_precision_recall_undefined() -> None:
    """Undefined means NaN with a warning, IoU included: without a GT defect pixel IoU could only be 0 (some
    pixel predicted) or 0/0, in the functional core, `compute_all` and `AnomalyMetrics` alike."""
    for preds in (torch.zeros(1, 3, 3), torch.ones(1, 3, 3)):
        with pytest.warns(UndefinedMetricWarning, match="IoU undefined: no anomalous pixel"):
            assert math.isnan(iou(preds, torch.zeros(1, 3, 3)))
        with pytest.warns(UndefinedMetricWarning) as record:
            res = precision_recall_iou(preds[0] > 0.5, torch.zeros(3, 3))
        assert math.isnan(res["IoU"]) and math.isnan(res["recall"])
    assert len(record) == 2  # precision is defined when something was predicted
    high = torch.full((2, 4, 4), 0.9)  # every pixel predicted anomalous, none is
    with pytest.warns(UndefinedMetricWarning, match="IoU undefined"):
        assert math.isnan(compute_all(high, torch.zeros(2, 4, 4))["IoU"])
    with pytest.warns(UndefinedMetricWarning, match="IoU undefined"):
        assert math.isnan(_class_values([(high, torch.zeros(2, 1, 4, 4))])["IoU"])
    assert iou(high, torch.ones(2, 4, 4)) == 1.0


def test_compute_all_all_normal_images() -> None:
    with pytest.warns(UndefinedMetricWarning) as record:
        res = compute_all(torch.rand(3, 5, 5) * 0.4, torch.zeros(3, 5, 5))
    assert all(math.isnan(v) for v in res.values())
    messages = " ".join(str(r.message) for r in record)
    for name in METRIC_NAMES:
        assert f"{name} undefined" in messages


# ---------------------------------------------------------------------------------------------
# torchmetrics classes
# ---------------------------------------------------------------------------------------------


def _class_values(batches, iou_threshold: float = 0.5, fpr_limit: float = 0.3) -> dict[str, float]:
    metric = AnomalyMetrics(iou_threshold=iou_threshold, fpr_limit=fpr_limit)
    for amap, mask in batches:
        metric.update(amap, mask)
    return {k: v.item() for k, v in metric.compute().items()}


@pytest.mark.parametrize("seed", range(6))
def test_metric_class_equals_functional_and_accumulates(seed: int) -> None:
    preds, target = make_case(seed)
    preds = np.concatenate([preds, np.zeros((1, *preds.shape[1:]))])  # ensure a normal image
    target = np.concatenate([target, np.zeros((1, *target.shape[1:]), dtype=bool)])
    amap = torch.from_numpy(preds).float()
    mask = torch.from_numpy(target).float()[:, None]  # [N,1,H,W] like the batches
    threshold = float(amap.median())
    expected = compute_all(amap, mask, iou_threshold=threshold, fpr_limit=0.05)
    one_call = _class_values([(amap, mask)], threshold, 0.05)
    splits = [(amap[:1], mask[:1]), (amap[1:3], mask[1:3]), (amap[3:], mask[3:])]
    several = _class_values(splits, threshold, 0.05)
    for name in METRIC_NAMES:
        assert one_call[name] == pytest.approx(expected[name], abs=1e-12), name
        assert several[name] == pytest.approx(expected[name], abs=1e-12), name


def test_anomaly_metrics_states_and_reset() -> None:
    """The class keeps the split pixels (4 bytes per normal pixel, 8 per anomalous one), not maps and masks."""
    m = AnomalyMetrics()
    assert m.full_state_update is False and m.higher_is_better is True
    amap = torch.rand(3, 6, 6)
    mask = torch.zeros(3, 1, 6, 6)
    mask[0, 0, 2:4, 2:4] = 1
    mask[1, 0, 0, 0] = 1
    m.update(amap, mask, torch.tensor([1, 1, 0]))
    assert m.normal_scores[0].dtype == torch.float32 and m.normal_scores[0].numel() == 3 * 36 - 5
    assert m.anomalous_scores[0].tolist() == amap[mask[:, 0] > 0].tolist()
    assert m.anomalous_region_sizes[0].tolist() == [4, 4, 4, 4, 1]
    assert int(m.n_regions) == 2
    kept = sum(s.numel() * s.element_size() for s in (m.normal_scores[0], m.anomalous_scores[0]))
    kept += m.anomalous_region_sizes[0].numel() * m.anomalous_region_sizes[0].element_size()
    assert kept == 4 * (3 * 36 - 5) + 8 * 5
    first = {k: v.item() for k, v in m.compute().items()}
    assert first == pytest.approx(compute_all(amap, mask), abs=1e-12)
    m.reset()
    assert m.normal_scores == [] and int(m.n_regions) == 0
    m.update(amap, mask)
    assert {k: v.item() for k, v in m.compute().items()} == pytest.approx(first, abs=1e-12)
