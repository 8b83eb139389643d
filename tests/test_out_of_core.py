"""`metrics.out_of_core`: the metrics of pixels spilled to disk equal the in-memory `AnomalyMetrics` and
brute force, with chunks so small that tied scores straddle the sorted runs and the blocks and the FPR limit
falls inside a tie group; its order statistic and counts against numpy; its folder is deleted."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from references import ref_ap, ref_aupro_from_points, ref_auroc, ref_pro_points_images

from mvtec_seg.metrics import AnomalyMetrics, UndefinedMetricWarning
from mvtec_seg.metrics.functional import METRIC_NAMES
from mvtec_seg.metrics.out_of_core import OutOfCoreMetrics, _kth_smallest, _sort_runs

Image = tuple[np.ndarray, np.ndarray]
EXTRA = {"pixel_AUPRO_0.05": 0.05, "pixel_AUPRO_1": 1.0}


def _images(seed: int, n: int = 6, levels: int | None = 6) -> list[Image]:
    """Images of different sizes, scores quantised to ``levels`` values (ties) or float64 noise (rounded to
    float32 when scored), masks of several 8-connected regions, one image without a defect."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(4, 15, 2))
        mask = rng.random((h, w)) < (0.0 if i == 0 else 0.25)
        amap = rng.random((h, w)) + 0.4 * mask * rng.random((h, w))  # defects score higher, not always
        if levels:
            amap = np.round(amap * (levels - 1)) / (levels - 1)
        out.append((amap if levels is None else amap.astype(np.float32), mask.astype(np.uint8)))
    return out


def _in_memory(images: list[Image], fpr_limit: float = 0.3) -> dict[str, float]:
    metric = AnomalyMetrics(iou_threshold=0.5, fpr_limit=fpr_limit)
    for amap, mask in images:
        metric.update(torch.as_tensor(amap)[None], torch.as_tensor(mask)[None])
    out = {k: float(v) for k, v in metric.compute().items()}
    return out | {name: metric.aupro(limit, name) for name, limit in EXTRA.items()}


def _out_of_core(images: list[Image], chunk: int, tmp_path, fpr_limit: float = 0.3) -> dict[str, float]:
    with OutOfCoreMetrics(0.5, fpr_limit, folder=tmp_path, chunk=chunk) as metric:
        for amap, mask in images:
            metric.update(amap, mask)
        return metric.compute(EXTRA)


def _assert_equal(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[name]), name
        else:
            assert got[name] == pytest.approx(value, abs=1e-9), name


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 1 << 20])
def test_out_of_core_equals_in_memory(seed, chunk, tmp_path):
    images = _images(seed, levels=None if seed == 5 else 2 + seed)
    expected = _in_memory(images)
    assert not any(math.isnan(v) for v in expected.values())  # both classes, regions: every metric defined
    _assert_equal(_out_of_core(images, chunk, tmp_path), expected)


def _tied_normals_across_runs(normal: np.ndarray, run: int) -> bool:
    """Some score occurs in two of the sorted runs (its counts are summed over runs)."""
    runs = [set(normal[s : s + run].tolist()) for s in range(0, normal.size, run)]
    return any(sum(v in r for r in runs) >= 2 for v in set(normal.tolist()))


def test_ties_across_chunks_and_an_fpr_limit_inside_a_tie_group_match_brute_force(tmp_path):
    images = _images(11, n=5, levels=4)
    normal = np.concatenate([a[m == 0] for a, m in images])
    anomalous = np.concatenate([a[m != 0] for a, m in images])
    chunk = 16  # runs of 16 normal scores, blocks of 2 anomalous pixels
    assert _tied_normals_across_runs(normal, chunk) and _tied_normals_across_runs(anomalous, 2)
    # a limit strictly inside the second-highest normal tie group: the curve is cut within its segment
    values, counts = np.unique(normal, return_counts=True)
    above = int((normal > values[-2]).sum())
    limit = (above + counts[-2] / 2) / normal.size
    assert counts[-2] >= 2 and above / normal.size < limit < (above + counts[-2]) / normal.size
    got = _out_of_core(images, chunk, tmp_path, fpr_limit=limit)
    _assert_equal(got, _in_memory(images, fpr_limit=limit))
    maps, masks = [a for a, _ in images], [m for _, m in images]
    scores = np.concatenate([a.ravel() for a in maps]).astype(np.float64)
    labels = np.concatenate([m.ravel() for m in masks]) != 0
    points = ref_pro_points_images(maps, masks)
    pred = scores >= 0.5
    expected = {
        "image_AUROC": ref_auroc(np.array([a.max() for a in maps]), np.array([m.any() for m in masks])),
        "pixel_AUROC": ref_auroc(scores, labels),
        "pixel_AP": ref_ap(scores, labels),
        "pixel_AUPRO": ref_aupro_from_points(points, limit),
        "IoU": (pred & labels).sum() / (pred | labels).sum(),
        **{name: ref_aupro_from_points(points, lim) for name, lim in EXTRA.items()},
    }
    _assert_equal(got, {k: float(v) for k, v in expected.items()})


def test_order_statistic_and_counts_over_sorted_runs(tmp_path):
    x = np.array([3.0, -0.0, 0.0, -1.5, np.inf, 3.0, -np.inf, 2.0, 0.0, 3.0, -1.5, 7.25, 1e-40], np.float32)
    path = tmp_path / "scores.f32"
    x.tofile(path)
    runs = _sort_runs(path, x.size, run=3)
    assert all(np.all(np.diff(np.fromfile(path, np.float32)[s : s + 3]) >= 0) for s in range(0, x.size, 3))
    ordered = np.sort(x)
    assert [float(_kth_smallest(runs, k)) for k in range(x.size)] == ordered.tolist()
    for v in [*x, np.float32(-7), np.float32(2.5), np.float32(np.nextafter(np.float32(3), np.float32(4)))]:
        assert runs.count(v, "left") == int((x < v).sum())
        assert runs.count(v, "right") == int((x <= v).sum())


@pytest.mark.parametrize(
    "images",
    [
        [(np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros((3, 4), np.uint8))],  # no defect
        [(np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((2, 3), np.uint8))],  # no normal pixel
        [],  # nothing
    ],
)
def test_undefined_metrics_are_nan_with_a_warning_as_in_memory(images, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = (
            _in_memory(images)
            if images
            else {k: math.nan for k in (*METRIC_NAMES, *EXTRA)}  # AnomalyMetrics needs an update first
        )
    with pytest.warns(UndefinedMetricWarning):
        got = _out_of_core(images, 2, tmp_path)
    assert any(math.isnan(v) for v in got.values())
    _assert_equal(got, expected)


def test_the_spilled_pixels_are_on_disk_until_closed(tmp_path):
    amap = np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)
    mask = np.zeros((4, 5), np.uint8)
    mask[1:3, 1:3] = 1
    metric = OutOfCoreMetrics(folder=tmp_path, chunk=4)
    metric.update(amap, mask)
    metric.update(amap, np.zeros_like(mask))
    first = metric.compute()
    for f in metric._files.values():
        f.flush()
    sizes = {p.name: p.stat().st_size for p in metric.folder.iterdir()}
    assert sizes["normal.f32"] == 4 * (16 + 20) and sizes["anomalous.f32"] == sizes["sizes.i32"] == 4 * 4
    assert metric.compute() == first  # computing again (runs already sorted) changes nothing
    metric.close()
    assert list(tmp_path.iterdir()) == []


def test_a_map_with_nan_is_refused(tmp_path):
    with OutOfCoreMetrics(folder=tmp_path) as metric, pytest.raises(ValueError, match="NaN"):
        metric.update(np.array([[0.1, np.nan]], np.float32), np.array([[0, 1]], np.uint8))
    assert list(tmp_path.iterdir()) == []
