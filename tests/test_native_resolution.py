"""`evaluation.resolution=native`: each test map upsampled to its image's own size and scored against the
mask read from disk, checked against brute force on images of different sizes; and its record in a run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import _save, compose_cfg, make_fake_mvtec
from PIL import Image
from references import ref_ap, ref_aupro_from_points, ref_auroc, ref_pro_points_images

from mvtec_seg.data.layouts import decode_mask_native
from mvtec_seg.data.mvtec import resize_map
from mvtec_seg.metrics.out_of_core import CHUNK_PIXELS
from mvtec_seg.native_metrics import native_test_metrics
from mvtec_seg.summary import PREDICTIONS_FILE

SIZES = [(9, 13), (12, 8), (7, 7), (10, 11), (8, 12)]  # (H, W): every image its own size
MODEL = 6


def _fake_run(
    tmp_path: Path, layout: str
) -> tuple[SimpleNamespace, Path, list[np.ndarray], list[np.ndarray]]:
    """A category of five test images of different sizes (three with a defect, one of them two regions and
    one a 0/1 mask), a run folder with their model-size maps; returns the native maps and masks too."""
    rng = np.random.default_rng(3)
    root = tmp_path / "cat"
    rows, maps, labels = [], [], []
    for i, (h, w) in enumerate(SIZES):
        image = f"test/{'good' if i < 2 else 'crack'}/{i:03d}.png"
        _save(root / image, rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        row = {"image": image, "gt_mask": None, "label": int(i >= 2), "part": "test"}
        if i >= 2:
            mask = np.zeros((h, w), np.uint8)
            mask[1:3, 1:4] = 255
            if i == 3:
                mask[-2:, -3:] = 255  # a second region
            if i == 4:
                mask = (mask > 0).astype(np.uint8)  # a 0/1 mask
            row["gt_mask"] = f"ground_truth/crack/{i:03d}_mask.png"
            _save(root / row["gt_mask"], mask)
        rows.append(row)
        maps.append(np.round(rng.random((MODEL, MODEL)) * 8) / 8)  # ties on purpose
        labels.append(row["label"])
    run = tmp_path / "run"
    run.mkdir()
    np.savez(
        run / PREDICTIONS_FILE,
        index=np.arange(len(rows)),
        anomaly_map=np.stack(maps).astype(np.float32),
        gt_mask=np.zeros((len(rows), MODEL, MODEL), np.uint8),
        gt_label=np.array(labels, np.uint8),
    )
    dm = SimpleNamespace(manifest={"samples": rows}, category_dir=root, layout=layout)
    native_maps = [resize_map(m.astype(np.float32), hw) for m, hw in zip(maps, SIZES, strict=True)]
    native_masks = [
        decode_mask_native(root / r["gt_mask"]) if r["gt_mask"] else np.zeros(hw, np.uint8)
        for r, hw in zip(rows, SIZES, strict=True)
    ]
    return dm, run, native_maps, native_masks


@pytest.mark.parametrize("chunk", [3, CHUNK_PIXELS])  # 3: many sorted runs and blocks, ties across them
def test_native_metrics_match_brute_force_on_images_of_different_sizes(tmp_path, chunk):
    dm, run, maps, masks = _fake_run(tmp_path, "mvtec_ad2")
    assert [m.shape for m in masks] == SIZES and int(masks[4].sum()) == 6  # the 0/1 mask read as defect
    got = native_test_metrics(
        dm, run, iou_threshold=0.5, fpr_limit=0.3, seg_threshold=0.6, decision_threshold=0.55, chunk=chunk
    )
    assert sorted(p.name for p in run.iterdir()) == [PREDICTIONS_FILE]  # the spilled pixels are deleted
    scores = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    labels = np.concatenate([m.ravel() for m in masks]).astype(bool)
    points = ref_pro_points_images(maps, masks)
    pred, gt = scores >= 0.5, labels
    seg = scores >= 0.6
    expected = {
        "test/image_AUROC": ref_auroc(np.array([m.max() for m in maps]), np.array([0, 0, 1, 1, 1], bool)),
        "test/pixel_AUROC": ref_auroc(scores, labels),
        "test/pixel_AP": ref_ap(scores, labels),
        "test/pixel_AUPRO": ref_aupro_from_points(points, 0.3),
        "test/IoU": (pred & gt).sum() / (pred | gt).sum(),
        "test/pixel_AUPRO_0.05": ref_aupro_from_points(points, 0.05),
        "test/SegF1": 2 * (seg & gt).sum() / (2 * (seg & gt).sum() + (seg & ~gt).sum() + (~seg & gt).sum()),
        "test/IoU_at_threshold": ((scores >= 0.55) & gt).sum() / ((scores >= 0.55) | gt).sum(),
    }
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(float(value), abs=1e-9), name
    # not the model-size figures: the masks there are other pixels
    model = native_test_metrics(SimpleNamespace(**{**vars(dm), "layout": "mvtec"}), run, 0.5, 0.3)
    assert set(model) == set(expected) - {"test/pixel_AUPRO_0.05", "test/SegF1", "test/IoU_at_threshold"}


@pytest.mark.slow
def test_a_run_at_native_resolution_records_it(tmp_path):
    data = tmp_path / "data"
    make_fake_mvtec(data, name="widget", size=(40, 52))
    base = [
        f"data.root={data}",
        "category=custom",
        "category.name=widget",
        "debug=fast",
        "data.image_size=32",
    ]
    from mvtec_seg.train import train

    summary = train(
        compose_cfg(tmp_path, [*base, "evaluation.resolution=native", "trainer.limit_test_batches=null"])
    )
    assert summary["status"] == "ok" and summary["resolution"] == "native"
    run = Path(summary["run_dir"])
    assert json.loads((run / "summary.json").read_text())["resolution"] == "native"
    with np.load(run / PREDICTIONS_FILE) as pred:
        assert pred["anomaly_map"].shape[1:] == (32, 32)
    with Image.open(data / "widget" / "ground_truth" / "scratch" / "000_mask.png") as im:
        assert im.size == (52, 40)  # scored at this size, not at 32 px
    assert 0.0 <= summary["metrics"]["test/pixel_AUROC"] <= 1.0


@pytest.mark.slow
def test_mvtec_ad2_at_native_resolution_records_its_metrics_so(tmp_path):
    from conftest import make_fake_mvtec_ad2

    from mvtec_seg.layout_metrics import MVTEC_AD2_RECORD
    from mvtec_seg.train import train

    make_fake_mvtec_ad2(tmp_path / "ad2", size=(40, 52), n_train=10, n_val=5, n_good=4, n_bad=6)
    overrides = [
        f"data.root={tmp_path / 'ad2'}",
        "category=custom",
        "category.name=can",
        "data.layout=mvtec_ad2",
        "debug=fast",
        "data.image_size=32",
        "trainer.limit_test_batches=null",
        "evaluation.resolution=native",
    ]
    summary = train(compose_cfg(tmp_path, overrides))
    run = Path(summary["run_dir"])
    record = json.loads((run / MVTEC_AD2_RECORD).read_text())
    assert summary["resolution"] == record["resolution"] == "native"
    extra = {"test/SegF1", "test/pixel_AUPRO_0.05"}
    assert record["metrics"] == {k: summary["metrics"][k] for k in extra}
    dm = SimpleNamespace(
        manifest=json.loads(Path(summary["split"]["manifest"]).read_text()),
        category_dir=tmp_path / "ad2" / "can",
        layout="mvtec_ad2",
    )
    again = native_test_metrics(
        dm, run, 0.5, 0.3, record["threshold"], summary["decision_threshold"]["value"]
    )
    assert again == pytest.approx(summary["metrics"], abs=1e-12)
