"""End-to-end: a `debug=fast` run writes a complete run folder; checkpoints reload; dry runs build and stop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg

from mvtec_seg.metrics import compute_all
from mvtec_seg.models.segmenter import Segmenter
from mvtec_seg.summary import IOU_AT_THRESHOLD
from mvtec_seg.train import train

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AP", "pixel_AUPRO", "IoU")


@pytest.fixture(scope="module")
def fast_run(segmenter_run):
    """The session's tiny U-Net run (conftest.segmenter_run): its config and summary."""
    return segmenter_run["cfg"], segmenter_run["summary"]


def test_run_folder_is_complete(fast_run):
    cfg, summary = fast_run
    run = Path(cfg.paths.run_dir)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["model"] == "unet" and on_disk["mask"] == "gt"
    assert set(on_disk["metrics"]) == {f"test/{m}" for m in (*METRICS, IOU_AT_THRESHOLD)}
    assert on_disk["params"] > 1_000_000
    assert on_disk["throughput"]["train_images_per_s"] > 0 and on_disk["time"]["train_s"] > 0
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "best.ckpt").exists()
    n_overlays = min(on_disk["split"]["n_test"], cfg.evaluation.max_overlays)
    assert n_overlays > 0 and len(list((run / "overlays").glob("*.png"))) == n_overlays
    assert {p.name for p in (run / "curves").glob("*.png")} >= {"roc_pixel.png", "pro_curve.png"}


def test_summary_metrics_match_saved_predictions(fast_run):
    """The numbers in summary.json are recomputable from the saved maps and GT: nothing hidden in between."""
    cfg, summary = fast_run
    pred = np.load(Path(cfg.paths.run_dir) / "test_predictions.npz")
    assert len(pred["index"]) == summary["split"]["n_test"]
    again = compute_all(
        torch.from_numpy(pred["anomaly_map"].astype(np.float32)),
        torch.from_numpy(pred["gt_mask"]),
        torch.from_numpy(pred["gt_label"]),
    )
    for m in METRICS:
        assert again[m] == pytest.approx(summary["metrics"][f"test/{m}"], abs=1e-6), m


def test_load_from_checkpoint_safe(fast_run):
    cfg, _ = fast_run
    ckpt = Path(cfg.paths.run_dir) / "checkpoints" / "best.ckpt"
    model = Segmenter.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    assert model.hparams.net["encoder_name"] == "resnet18"
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    assert out["anomaly_map"].shape == (2, 64, 64)
    assert float(out["anomaly_map"].min()) >= 0.0 and float(out["anomaly_map"].max()) <= 1.0
    assert torch.equal(out["pred_score"], out["anomaly_map"].flatten(1).amax(1))


@pytest.mark.parametrize("model", ["deeplab", "transfusion"])
def test_dry_run_builds_the_model_and_trains_nothing(tmp_path, model):
    """One meaning for every model: check the data, build the model and trainer, record the size, stop."""
    cfg = compose_cfg(tmp_path, ["dry_run=true", f"model={model}"])
    summary = train(cfg)
    expected = {"deeplab": 26_000_000, "transfusion": 2_000_000}[model]
    assert summary["status"] == "dry_run" and summary["params"] > expected
    assert not (Path(cfg.paths.run_dir) / "checkpoints").exists()
    assert not (Path(cfg.paths.cache_dir) / "transfusion").exists()  # no teacher trained
    assert json.loads((Path(cfg.paths.run_dir) / "summary.json").read_text())["status"] == "dry_run"


def test_decision_threshold_is_the_best_val_f1_and_predict_uses_it(fast_run, tmp_path):
    """The run records the val-part map value with the highest pixel F1 (no threshold on a fine grid does
    better); `predict` decides with it by default."""
    from mvtec_seg.builders import build_datamodule
    from mvtec_seg.predict import predict

    cfg, summary = fast_run
    rec = summary["decision_threshold"]
    assert rec["n_images"] == summary["split"]["n_val"] and rec["targets"] == "gt"
    run = Path(cfg.paths.run_dir)
    model = Segmenter.load_from_checkpoint(run / "checkpoints" / "best.ckpt", map_location="cpu").eval()
    dm = build_datamodule(cfg)
    dm.prepare()
    val = [dm.dataset("val")[i] for i in range(len(dm.dataset("val")))]
    with torch.no_grad():
        maps = model.anomaly_map(torch.stack([v["image"] for v in val])).numpy()
    gt = np.stack([v["target_mask"][0].numpy() > 0.5 for v in val])

    def f1(t: float) -> float:
        tp = np.count_nonzero((maps >= t) & gt)
        return 2 * tp / (np.count_nonzero(maps >= t) + np.count_nonzero(gt))

    assert f1(rec["value"]) == pytest.approx(rec["f1"], abs=1e-9)
    assert all(f1(t) <= rec["f1"] + 1e-12 for t in np.quantile(maps, np.linspace(0, 1, 201)))
    first = sorted(Path(cfg.data.root).rglob("test/*/000.png"))[0]
    result = predict(run, str(first), output=tmp_path / "p")
    assert result["threshold"] == rec["value"] and len(result["rows"]) == 1
