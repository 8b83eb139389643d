"""Figures: shapes, files, a fixed colour scale, and curves that agree with brute-force references."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mvtec_seg import viz
from mvtec_seg.errors import UserError
from mvtec_seg.metrics import functional


def _png(path: Path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


@pytest.fixture
def sample() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.random((48, 48, 3)).astype(np.float32)
    gt = np.zeros((48, 48), np.uint8)
    gt[10:20, 12:30] = 1
    amap = (0.4 * rng.random((48, 48)) + 0.5 * gt).astype(np.float32)
    return image, gt, amap


def test_import_does_not_load_matplotlib() -> None:
    code = "import sys, mvtec_seg.viz, mvtec_seg.io_utils; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_overlay_panel_shape_and_inputs(sample: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    image, gt, amap = sample
    panel = viz.overlay_panel(image, gt, amap, threshold=0.5, title="test/crack/000.png")
    w, h = viz.OVERLAY_FIGSIZE
    assert panel.shape == (int(h * viz.OVERLAY_DPI), int(w * viz.OVERLAY_DPI), 3) and panel.dtype == np.uint8
    assert panel.std() > 10
    # uint8 HWC, float CHW with a [1,H,W] mask, and an empty GT all work and give the same size.
    chw = viz.overlay_panel(image.transpose(2, 0, 1), gt[None], amap, 0.5, "")
    u8 = viz.overlay_panel((image * 255).astype(np.uint8), np.zeros_like(gt), amap, 0.5, "")
    assert chw.shape == u8.shape == panel.shape
    with pytest.raises(ValueError, match="differ in size"):
        viz.overlay_panel(image, gt[:20], amap, 0.5, "")


def test_overlay_uses_the_given_colour_scale(sample: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Two maps that differ by a constant render differently: there is no per-image normalisation."""
    image, gt, amap = sample
    # Threshold above both maps so the prediction panel is identical; only the heatmap can differ.
    a = viz.overlay_panel(image, gt, amap, threshold=5.0, title="", vmin=0.0, vmax=2.0)
    a2 = viz.overlay_panel(image, gt, amap, threshold=5.0, title="", vmin=0.0, vmax=2.0)
    b = viz.overlay_panel(image, gt, amap + 0.5, threshold=5.0, title="", vmin=0.0, vmax=2.0)
    assert np.array_equal(a, a2), "rendering is deterministic"
    assert np.abs(a.astype(int) - b.astype(int)).sum(axis=-1).astype(bool).mean() > 0.02


def test_save_overlays(tmp_path: Path, sample: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    image, gt, amap = sample
    images, gts = np.stack([image] * 3), np.stack([gt] * 3)
    maps = np.stack([amap, amap * 2, amap * 3])
    names = ["test/crack/000.png", "test/good/000.png", "test/good/000.png"]
    paths = viz.save_overlays(tmp_path / "ov", images, gts, maps, names, threshold=0.5)
    assert [p.name for p in paths] == ["test_crack_000.png", "test_good_000.png", "test_good_000_2.png"]
    for p in paths:
        assert _png(p).shape == (300, 1000, 3)
    # Default scale is the global min/max over all maps, not each map's own range.
    explicit = viz.save_overlays(
        tmp_path / "ex", images, gts, maps, names, 0.5, vmin=float(maps.min()), vmax=float(maps.max())
    )
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in explicit]
    assert len(viz.save_overlays(tmp_path / "few", images, gts, maps, names, 0.5, max_images=1)) == 1
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == [p.name for p in paths], (
        "no temp files left"
    )


def test_heat_overlay_fixed_scale_and_outline() -> None:
    """The one heat renderer: a constant map is not stretched to the full range, the GT is outlined."""
    image = np.zeros((8, 8, 3), np.uint8)
    gt = np.zeros((8, 8), np.uint8)
    gt[2:6, 2:6] = 1
    low, high = np.full((8, 8), 0.2, np.float32), np.full((8, 8), 0.8, np.float32)
    a, b = viz.heat_overlay(image, low, 0.0, 1.0), viz.heat_overlay(image, high, 0.0, 1.0)
    assert a.shape == (8, 8, 3) and a.dtype == np.float32 and not np.allclose(a, b)
    outlined = viz.heat_overlay(image, low, 0.0, 1.0, gt_mask=gt)
    edge = np.zeros((8, 8), bool)
    edge[2:6, 2:6] = True
    edge[3:5, 3:5] = False
    assert np.allclose(outlined[edge], (0.0, 1.0, 0.4)) and np.allclose(outlined[~edge], a[~edge])


def test_plot_curves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 32, 32), np.uint8)
    masks[3:, 8:16, 8:20] = 1
    maps = (rng.random(masks.shape) * 0.6 + 0.5 * masks).astype(np.float16)
    labels = np.array([0, 0, 0, 1, 1, 1])
    paths = viz.plot_curves(maps, masks, labels, tmp_path / "curves", fpr_limit=0.3)
    assert sorted(p.name for p in paths) == [
        "pr_pixel.png",
        "pro_curve.png",
        "roc_image.png",
        "roc_pixel.png",
    ]
    w, h = viz.CURVE_FIGSIZE
    for p in paths:
        assert _png(p).shape == (int(h * viz.CURVE_DPI), int(w * viz.CURVE_DPI), 3)

    # The legends carry the given metric values (a run passes its own), computed only when some are missing.
    def recompute(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(functional, "compute_all", recompute)
    given = {f"test/{m}": 0.5 for m in functional.METRIC_NAMES}
    assert len(viz.plot_curves(maps, masks, labels, tmp_path / "given", 0.3, metrics=given)) == 4
    with pytest.raises(AssertionError, match="recomputed"):
        viz.plot_curves(maps, masks, labels, tmp_path / "partial", 0.3, metrics={"test/pixel_AP": 0.5})
    monkeypatch.undo()
    # Undefined curves are skipped instead of failing: only normal images here.
    assert viz.plot_curves(maps[:3], masks[:3], labels[:3], tmp_path / "none") == []


def test_plot_loss_curves(tmp_path: Path) -> None:
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(
        "epoch,lr-Adam,step,train/loss,val/IoU,val/loss,val/pixel_AP\n"
        "0,0.001,9,,0.1,0.9,0.2\n"
        "0,,9,1.2,,,\n"
        "1,0.0005,19,,0.3,0.6,0.5\n"
        "1,,19,0.8,,,\n"
        "2,0.00025,29,,0.35,0.5,0.6\n"
        "2,,29,0.6,,,\n"
    )
    out = viz.plot_loss_curves(csv_path, tmp_path / "plots" / "loss.png")
    assert _png(out).shape == (400, 1500, 3)  # three panels: losses, scores, other (lr)
    series, has_epoch = viz._read_metrics_csv(csv_path)
    assert has_epoch and [v for _, _, v in series["train/loss"]] == [1.2, 0.8, 0.6]
    # Step-level logging is plotted against the step; an empty file still gives a figure.
    (tmp_path / "steps.csv").write_text("epoch,step,train/loss\n0,0,1.0\n0,1,0.9\n0,2,0.7\n")
    assert _png(viz.plot_loss_curves(tmp_path / "steps.csv", tmp_path / "s.png")).shape == (400, 500, 3)
    (tmp_path / "empty.csv").write_text("epoch,step\n")
    assert _png(viz.plot_loss_curves(tmp_path / "empty.csv", tmp_path / "e.png")).shape == (400, 500, 3)
    with pytest.raises(UserError, match="metrics file not found"):
        viz.plot_loss_curves(tmp_path / "missing.csv", tmp_path / "m.png")


def test_image_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    grey = rng.random((32, 32)).astype(np.float32)
    rows = [[rgb, grey, None], [rgb.astype(np.float32) / 255, (grey > 0.5).astype(np.uint8) * 255, rgb]]
    out = viz.image_grid(rows, ["unet", "deeplab"], ["image", "map", "mask"], tmp_path / "grid.png")
    assert _png(out).shape == (
        430,
        635,
        3,
    )  # (2 rows * 2 in + titles 0.3 in, 3 cols * 2 in + 0.35 in) * 100 dpi
    bare = viz.image_grid([[rgb]], None, None, tmp_path / "one.png", panel_inches=1.0)
    assert _png(bare).shape == (100, 100, 3)
