"""The selection/split algorithms against the brute-force references, their edge cases, and the torch
path (the one CUDA tensors take) run on CPU tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from references import ref_ap, ref_aupro_from_points, ref_auroc, ref_pro_points
from test_metrics import make_case

from mvtec_seg.metrics import (
    METRIC_NAMES,
    AnomalyMetrics,
    UndefinedMetricWarning,
    aupro,
    auroc,
    average_precision,
    compute_all,
)
from mvtec_seg.metrics import split as S

TOL = 1e-6
LIMITS = (0.3, 0.05, 0.5, 1.0)


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make CPU tensors take the path CUDA tensors take (torch ops where the tensor lives)."""
    monkeypatch.setattr(S, "_on_device", lambda x: isinstance(x, torch.Tensor))


def _ref_aupro(preds: np.ndarray, target: np.ndarray, limit: float) -> float:
    return ref_aupro_from_points(ref_pro_points(preds, target), limit)


@pytest.mark.filterwarnings("ignore:image_AUROC undefined")
@pytest.mark.parametrize("seed", range(60, 72))
def test_torch_path_matches_bruteforce(seed: int, torch_path: None) -> None:
    preds, target = make_case(seed)
    p, t = torch.from_numpy(preds).float(), torch.from_numpy(target)
    p64 = p.double().numpy()  # the float32 scores, exactly
    points = ref_pro_points(p64, target)
    for limit in LIMITS:
        assert aupro(p, t, fpr_limit=limit) == pytest.approx(ref_aupro_from_points(points, limit), abs=TOL)
    assert auroc(p, t) == pytest.approx(ref_auroc(p64.ravel(), target.ravel()), abs=TOL)
    assert average_precision(p, t) == pytest.approx(ref_ap(p64.ravel(), target.ravel()), abs=TOL)
    got = compute_all(p, t, iou_threshold=0.5, fpr_limit=0.3)
    assert got["pixel_AUPRO"] == pytest.approx(ref_aupro_from_points(points, 0.3), abs=TOL)


@pytest.mark.parametrize("seed", range(4))
def test_torch_path_equals_numpy_path(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    preds, target = make_case(seed)
    p, t = torch.from_numpy(preds).float(), torch.from_numpy(target)[:, None]
    p[-1] = p.min()  # an all-low image: both image classes when the last image is normal
    expected = compute_all(p, t, iou_threshold=0.6, fpr_limit=0.2)
    monkeypatch.setattr(S, "_on_device", lambda x: isinstance(x, torch.Tensor))
    got = compute_all(p, t, iou_threshold=0.6, fpr_limit=0.2)
    metric = AnomalyMetrics(iou_threshold=0.6, fpr_limit=0.2)
    metric.update(p[:2], t[:2])
    metric.update(p[2:], t[2:])
    from_class = {k: v.item() for k, v in metric.compute().items()}
    for name in METRIC_NAMES:
        if math.isnan(expected[name]):
            assert math.isnan(got[name]) and math.isnan(from_class[name])
            continue
        assert got[name] == pytest.approx(expected[name], abs=1e-12), name
        assert from_class[name] == pytest.approx(expected[name], abs=1e-12), name


@pytest.mark.parametrize("seed", range(72, 80))
def test_selection_equals_sorted_path(seed: int) -> None:
    """aupro (partition, sorts only the pixels above the limit) == compute_all (all normal pixels sorted)."""
    preds, target = make_case(seed)
    preds = np.concatenate([preds, np.zeros((1, *preds.shape[1:]))])
    target = np.concatenate([target, np.zeros((1, *target.shape[1:]), dtype=bool)])
    for limit in LIMITS:
        full = compute_all(preds, target, fpr_limit=limit)["pixel_AUPRO"]
        assert aupro(preds, target, fpr_limit=limit) == pytest.approx(full, abs=1e-12)


def test_limit_reached_exactly_at_a_curve_point() -> None:
    """10 normal pixels with distinct scores: FPR 0.3 is a curve point, then a tie with anomalous pixels."""
    preds = np.array([[[0.95, 0.9, 0.8, 0.7, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.7, 0.02]]])
    target = np.array([[[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1]]], dtype=bool)
    # 11 normal pixels; a normal and an anomalous pixel tie at 0.7 (a diagonal segment)
    for limit in (0.2, 0.3, 0.4, 0.1, 1.0):
        got = aupro(preds, target, fpr_limit=limit)
        assert got == pytest.approx(_ref_aupro(preds, target, limit), abs=TOL), limit
    n_normal = int((~target).sum())
    for k in range(1, n_normal + 1):
        limit = k / n_normal
        assert aupro(preds, target, fpr_limit=limit) == pytest.approx(
            _ref_aupro(preds, target, limit), abs=TOL
        )


def test_all_scores_tied_and_single_region() -> None:
    target = np.zeros((2, 5, 5), dtype=bool)
    target[0, 1:3, 1:4] = True  # one region
    flat = np.full((2, 5, 5), 0.5)
    for limit in LIMITS:
        # one curve point, (1, 1), reached diagonally: area limit**2 / 2, divided by limit
        assert aupro(flat, target, fpr_limit=limit) == pytest.approx(limit / 2)
        assert aupro(flat, target, fpr_limit=limit) == pytest.approx(_ref_aupro(flat, target, limit), abs=TOL)
    assert auroc(flat, target) == 0.5
    preds = np.random.default_rng(0).random((2, 5, 5)) + 0.3 * target
    for limit in LIMITS:
        assert aupro(preds, target, fpr_limit=limit) == pytest.approx(
            _ref_aupro(preds, target, limit), abs=TOL
        )


def test_no_anomalous_pixel_and_all_normal_maps() -> None:
    preds = torch.rand(3, 6, 6)
    with pytest.warns(UndefinedMetricWarning, match="no anomalous region"):
        assert math.isnan(aupro(preds, torch.zeros(3, 6, 6)))
    with pytest.warns(UndefinedMetricWarning, match="no anomalous"):
        assert math.isnan(auroc(preds, torch.zeros(3, 6, 6)))
    with pytest.warns(UndefinedMetricWarning, match="AP undefined"):
        assert math.isnan(average_precision(preds, torch.zeros(3, 6, 6)))
    # normal maps next to an anomalous one change AUPRO only through their normal pixels (FPR)
    target = torch.zeros(3, 6, 6, dtype=torch.bool)
    target[0, 2:4, 2:4] = True
    preds[0][target[0]] = 2.0
    assert aupro(preds, target) == pytest.approx(1.0)
    assert aupro(preds, target) == pytest.approx(_ref_aupro(preds.double().numpy(), target.numpy(), 0.3))


def test_float32_scores_are_not_widened_and_give_the_same_value() -> None:
    preds, target = make_case(5)
    p32 = preds.astype(np.float32)
    sp = S.split_pixels(p32, target)
    assert sp.normal.dtype == np.float32 and sp.anomalous.dtype == np.float32
    assert aupro(p32, target) == pytest.approx(aupro(p32.astype(np.float64), target), abs=1e-12)


def test_region_sizes_are_per_image_and_8_connected() -> None:
    mask = np.zeros((2, 4, 4), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True  # diagonal: one region of 2
    mask[0, 3, 3] = True
    mask[1, 0, 0] = True  # same place, other image: its own region
    sizes, n_regions = S.region_sizes(mask)
    assert n_regions == 3 and sizes.tolist() == [2, 2, 1, 1]
    big = np.zeros((S._LABEL_CHUNK + 3, 3, 3), dtype=bool)
    big[:, 1, 1] = True
    sizes, n_regions = S.region_sizes(big)  # several labelling chunks
    assert n_regions == S._LABEL_CHUNK + 3 and set(sizes.tolist()) == {1}
