"""TransFusion as a first-class model and the pseudo-mask stage, end to end in `debug=fast`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEACHER_FAST, TINY_TEACHER, compose_cfg, with_teacher

from mvtec_seg.builders import build_datamodule
from mvtec_seg.errors import UserError
from mvtec_seg.io_utils import png_bytes
from mvtec_seg.metrics import precision_recall_iou
from mvtec_seg.models.transfusion.lightning_model import TransFusion
from mvtec_seg.models.transfusion.loss import TransFusionLoss
from mvtec_seg.pseudo.masks import chain_sets, ensure_pseudo_masks
from mvtec_seg.pseudo.thresholds import mask_threshold
from mvtec_seg.teacher import teacher_dir
from mvtec_seg.train import train

FAST_TEACHER = TEACHER_FAST  # the session teacher (conftest.teacher_cache)


@pytest.fixture(scope="module")
def pseudo_run(tmp_path_factory, teacher_cache):
    tmp = with_teacher(teacher_cache, tmp_path_factory.mktemp("pseudo"))
    # the plain quantile rule (the default adds hysteresis, gate, area and a round; see test_pseudo_rules.py)
    plain = [
        "mask.threshold.strategy=quantile",
        "mask.gate.quantile=null",
        "mask.regions.min_area=0",
        "mask.rounds=0",
    ]
    cfg = compose_cfg(tmp, ["mask=pseudo", *plain, *FAST_TEACHER])
    return tmp, cfg, train(cfg)


def test_pseudo_run_builds_teacher_masks_and_reports_quality(pseudo_run):
    tmp, cfg, summary = pseudo_run
    assert summary["status"] == "ok" and summary["mask"] == "pseudo"
    info = summary["pseudo"]
    assert info["strategy"] == "quantile" and np.isfinite(info["threshold"])
    assert set(info["quality"]["train"]) == {"IoU", "precision", "recall", "normal_nonempty"}
    pdir = Path(info["dir"])
    masks = np.load(pdir / "masks.npy")
    assert masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    assert len(list((pdir / "png").glob("*.png"))) == len(masks)
    # the recorded quality is what the stored masks give against GT on the train part
    dm = build_datamodule(cfg)
    idx = dm.indices("train")
    q = precision_recall_iou(masks[idx], np.asarray(dm.gt_masks[idx]))
    for k, v in q.items():
        assert info["quality"]["train"][k] == pytest.approx(v, nan_ok=True)
    # the threshold is the configured quantile of the maps on the calibration images: the val part's
    # train/good images, never a test/good one (no image labels)
    maps = np.load(info["maps"])
    _, _, calibration = chain_sets(dm, {"image_labels": False})
    rows = dm.manifest["samples"]
    assert all(rows[i]["part"] == "val" and rows[i]["source"] == "train" for i in calibration)
    expected = mask_threshold(maps, idx, calibration, "quantile", cfg.mask.threshold.quantile)
    assert info["threshold"] == pytest.approx(expected)
    saved = json.loads((Path(cfg.paths.run_dir) / "summary.json").read_text())
    assert saved["pseudo"]["threshold"] == pytest.approx(info["threshold"])


def test_second_run_reuses_and_threshold_change_rebuilds(pseudo_run):
    tmp, cfg, first = pseudo_run
    tdir = Path(first["pseudo"]["teacher"])
    ckpt_mtime = (tdir / "model.ckpt").stat().st_mtime_ns
    dm = build_datamodule(cfg)
    dm.prepare()
    masks, info = ensure_pseudo_masks(cfg, dm)
    assert info["dir"] == first["pseudo"]["dir"] and (tdir / "model.ckpt").stat().st_mtime_ns == ckpt_mtime
    other = compose_cfg(tmp, ["mask=pseudo", *FAST_TEACHER, "mask.threshold.strategy=fixed"])
    masks2, info2 = ensure_pseudo_masks(other, dm)
    assert info2["dir"] != info["dir"] and info2["threshold"] == 0.5
    assert info2["teacher"] == info["teacher"]  # same teacher, new masks
    assert np.array_equal(
        masks2, (np.load(first["pseudo"]["maps"]).astype(np.float32) >= 0.5).astype(np.uint8)
    )
    otsu = compose_cfg(tmp, ["mask=pseudo", *FAST_TEACHER, "mask.threshold.strategy=otsu"])
    assert ensure_pseudo_masks(otsu, dm)[1]["dir"] not in (info["dir"], info2["dir"])
    retrained = compose_cfg(tmp, ["mask=pseudo", *FAST_TEACHER, "teacher.params.optimizer.lr=0.001"])
    assert teacher_dir(retrained, dm) != tdir  # a changed teacher setting never reuses stale weights
    rescored = compose_cfg(tmp, ["mask=pseudo", *FAST_TEACHER, "evaluation.iou_threshold=0.3"])
    assert teacher_dir(rescored, dm) == tdir  # a scoring setting does not retrain


def test_model_transfusion_is_scored_like_the_segmenters(pseudo_run):
    tmp, _, first = pseudo_run
    cfg = compose_cfg(tmp, ["model=transfusion", *FAST_TEACHER, f"paths.run_dir={tmp / 'tf_run'}"])
    summary = train(cfg)
    assert summary["model"] == "transfusion" and summary["mask"] == "none"
    assert set(summary["metrics"]) == {
        f"test/{m}"
        for m in ("image_AUROC", "pixel_AUROC", "pixel_AP", "pixel_AUPRO", "IoU", "IoU_at_threshold")
    }
    assert summary["checkpoint"] == str(Path(first["pseudo"]["teacher"]) / "model.ckpt")  # shared teacher
    assert summary["split"] == first["split"]  # same manifest, same test part
    assert (tmp / "tf_run" / "test_predictions.npz").exists()
    module = TransFusion.load_from_checkpoint(summary["checkpoint"], map_location="cpu", weights_only=True)
    assert module.hparams.net["base_channels"] == cfg.teacher.params.net.base_channels


def test_user_checkpoint_must_match_architecture(pseudo_run):
    tmp, _, first = pseudo_run
    ckpt = Path(first["pseudo"]["teacher"]) / "model.ckpt"
    good = compose_cfg(
        tmp,
        [
            "model=transfusion",
            *FAST_TEACHER,
            f"teacher.checkpoint={ckpt}",
            f"paths.run_dir={tmp / 'user_ckpt'}",
        ],
    )
    assert train(good)["status"] == "ok"
    bad = compose_cfg(
        tmp,
        [
            "model=transfusion",
            *FAST_TEACHER,
            f"teacher.checkpoint={ckpt}",
            "teacher.params.net.base_channels=16",
            f"paths.run_dir={tmp / 'bad_ckpt'}",
        ],
    )
    with pytest.raises(UserError, match="does not match the TransFusion architecture"):
        train(bad)
    missing = compose_cfg(
        tmp,
        [
            "model=transfusion",
            *FAST_TEACHER,
            f"teacher.checkpoint={tmp / 'nope.ckpt'}",
            f"paths.run_dir={tmp / 'no_ckpt'}",
        ],
    )
    with pytest.raises(UserError, match="nope.ckpt not found"):
        train(missing)


def test_edited_mask_rebuilds_only_the_pseudo_masks_and_says_so(pseudo_run, caplog):
    """The teacher and its maps never read GT masks; the pseudo masks' recorded quality does. The edit is
    undone at the end (mtime too), and the original artefacts are then found again by their content."""
    tmp, cfg, first = pseudo_run
    dm = build_datamodule(cfg)
    dm.prepare()
    row = next(r for r in dm.manifest["samples"] if r["gt_mask"] and r["part"] == "train")
    path = dm.category_dir / row["gt_mask"]
    original, st = path.read_bytes(), path.stat()
    try:
        path.write_bytes(png_bytes(np.full((128, 128), 255, np.uint8)))
        edited = build_datamodule(cfg)
        edited.prepare()
        with caplog.at_level(logging.WARNING, logger="mvtec_seg.data.files"):
            _, info = ensure_pseudo_masks(cfg, edited)
        assert info["dir"] != first["pseudo"]["dir"] and info["maps"] == first["pseudo"]["maps"]
        assert info["teacher"] == first["pseudo"]["teacher"]
        lines = [r.getMessage() for r in caplog.records if "rebuilding the pseudo masks" in r.getMessage()]
        assert len(lines) == 1 and f"changed: {row['gt_mask']}" in lines[0]
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    dm.manifest = None
    dm.prepare()
    assert ensure_pseudo_masks(cfg, dm)[1]["dir"] == first["pseudo"]["dir"]


def test_missing_texture_folder_is_a_clear_error(tmp_path):
    cfg = compose_cfg(
        tmp_path,
        ["model=transfusion", *FAST_TEACHER, f"teacher.params.anomalies.texture_dir={tmp_path / 'dtd'}"],
    )
    with pytest.raises(UserError, match="dtd"):
        train(cfg)
    (tmp_path / "empty").mkdir()
    cfg = compose_cfg(
        tmp_path,
        ["model=transfusion", *FAST_TEACHER, f"teacher.params.anomalies.texture_dir={tmp_path / 'empty'}"],
    )
    with pytest.raises(UserError, match="empty"):
        train(cfg)


def test_non_finite_loss_stops_keeps_checkpoint_and_resumes(tmp_path, monkeypatch):
    original = TransFusionLoss.forward
    calls = {"n": 0}

    def flaky(self, out):
        calls["n"] += 1
        terms = original(self, out)
        if calls["n"] == 3:  # epoch 2 (of 2 batches per epoch)
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(TransFusionLoss, "forward", flaky)
    overrides = [
        "model=transfusion",
        "debug=fast",
        *TINY_TEACHER,
        "teacher.trainer.max_epochs=3",
        "teacher.trainer.limit_train_batches=2",
        "data.image_size=32",
        "checkpoint.last_every_s=0",  # last.ckpt of every epoch, so epoch 0's is there
    ]
    cfg = compose_cfg(tmp_path, overrides)
    with pytest.raises(UserError, match="non-finite.*last good checkpoint: .*last.ckpt"):
        train(cfg)
    dm = build_datamodule(cfg)
    dm.prepare()
    final = teacher_dir(cfg, dm)
    partial = final.with_name(final.name + ".partial")
    assert (partial / "last.ckpt").exists() and not final.exists()
    assert torch.load(partial / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 0
    monkeypatch.setattr(TransFusionLoss, "forward", original)
    summary = train(compose_cfg(tmp_path, overrides + [f"paths.run_dir={tmp_path / 'again'}"]))
    assert summary["status"] == "ok"
    info = json.loads((final / "info.json").read_text())
    assert info["epochs"] == 3  # resumed at epoch 1 and finished, not restarted from scratch
