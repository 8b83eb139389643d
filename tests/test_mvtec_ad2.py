"""MVTec AD 2's metrics against brute force, their record in a run (`summary.json`, `mvtec_ad2.json`), the
evaluation server's output format of `predict`, and one end-to-end `train(cfg)` per new layout."""

from __future__ import annotations

import io
import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import _save, compose_cfg, make_fake_mvtec_ad2, make_fake_visa
from omegaconf import OmegaConf
from PIL import Image
from references import ref_aupro_from_points, ref_pro_points
from trained_runs import TINY_TRANSFUSION, unet_run

from mvtec_seg.builders import build_datamodule
from mvtec_seg.data.mvtec import load_rgb
from mvtec_seg.data.mvtec_ad2 import (
    SUBMISSION_MAPS,
    SUBMISSION_MASKS,
    check_submission,
    submission_categories,
    tiff_bytes,
    write_submission_files,
)
from mvtec_seg.errors import UserError
from mvtec_seg.inference import load_trained, resize_map
from mvtec_seg.layout_metrics import MVTEC_AD2_RECORD
from mvtec_seg.metrics import UndefinedMetricWarning, aupro, mvtec_ad2_metrics, normal_threshold, seg_f1
from mvtec_seg.models.base import anomaly_maps
from mvtec_seg.predict import main, predict
from mvtec_seg.train import train

STANDARD = {"test/image_AUROC", "test/pixel_AUROC", "test/pixel_AP", "test/pixel_AUPRO", "test/IoU"}
STANDARD |= {"test/IoU_at_threshold"}  # at the run's decision threshold, every layout
EXTRA = {"test/SegF1", "test/pixel_AUPRO_0.05"}

# --- metrics against brute force ---------------------------------------------------------------------------


def _ref_seg_f1(maps: np.ndarray, masks: np.ndarray, threshold: float) -> float:
    tp = fp = fn = 0
    for score, gt in zip(maps.reshape(-1).tolist(), masks.reshape(-1).tolist(), strict=True):
        hit = score >= threshold
        tp += hit and gt
        fp += hit and not gt
        fn += (not hit) and gt
    return 2 * tp / (2 * tp + fp + fn)


def _case(rng: np.random.Generator, n: int = 3, size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    maps = rng.integers(0, 8, (n, size, size)).astype(np.float32) / 7  # coarse values: many ties
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        if rng.random() < 0.8:
            y, x = rng.integers(0, size - 3, 2)
            masks[i, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = 1
    masks[0, 0, 0] = 1  # at least one region
    return maps, masks


@pytest.mark.parametrize("seed", range(12))
def test_metrics_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    maps, masks = _case(rng)
    normal = rng.normal(0.3, 0.1, (2, 12, 12)).astype(np.float32)
    expected = statistics.fmean(normal.reshape(-1).tolist()) + 3 * statistics.pstdev(
        normal.reshape(-1).tolist()
    )
    assert normal_threshold(normal) == pytest.approx(expected, rel=1e-12)
    for threshold in (*np.unique(maps).tolist(), float(maps.max()) + 1.0):  # every tie, and nothing predicted
        assert seg_f1(maps, masks, threshold) == pytest.approx(_ref_seg_f1(maps, masks, threshold), abs=1e-12)
    ref = ref_aupro_from_points(ref_pro_points(maps, masks), 0.05)
    values, threshold = mvtec_ad2_metrics(torch.from_numpy(maps), torch.from_numpy(masks), normal)
    assert threshold == pytest.approx(expected, rel=1e-12)
    assert values["pixel_AUPRO_0.05"] == pytest.approx(ref, abs=1e-9)
    assert values["SegF1"] == pytest.approx(_ref_seg_f1(maps, masks, threshold), abs=1e-12)


def test_undefined_cases_are_nan_with_a_reason():
    empty = np.zeros((1, 4, 4), np.float32)
    with pytest.warns(
        UndefinedMetricWarning, match="no anomalous pixel in the ground truth and none predicted"
    ):
        assert np.isnan(seg_f1(empty, np.zeros((1, 4, 4), np.uint8), 0.5))
    assert seg_f1(np.ones((1, 4, 4), np.float32), np.zeros((1, 4, 4), np.uint8), 0.5) == 0.0  # FP only
    with pytest.warns(UndefinedMetricWarning, match="no normal image"):
        assert np.isnan(normal_threshold(np.zeros((0, 4, 4), np.float32)))


def test_tiff_is_single_channel_float16_clipped():
    amap = np.array([[0.25, 1e9], [-1e9, 0.5]], np.float32)
    back = tifffile.imread(io.BytesIO(tiff_bytes(amap)))
    assert back.dtype == np.float16 and back.shape == (2, 2) and np.isfinite(back).all()
    assert back[0, 0] == np.float16(0.25) and back[0, 1] == np.finfo(np.float16).max


# --- predict: the evaluation server's format ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ad2_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ad2_predict")
    run_dir, module = unet_run(tmp, threshold=None)
    cat = make_fake_mvtec_ad2(tmp / "data", n_private=3, n_private_mixed=2)
    rng = np.random.default_rng(5)
    _save(cat / "test_private" / "001_regular.png", rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    _save(cat / "test_private_mixed" / "000_mixed.png", rng.integers(0, 255, (64, 48), dtype=np.uint8))
    refs = {}
    for path in sorted((cat / "test_private").glob("*.png")) + sorted(
        (cat / "test_private_mixed").glob("*.png")
    ):
        image = torch.from_numpy(np.array(load_rgb(path, 32))).permute(2, 0, 1)[None].float() / 255.0
        with Image.open(path) as im:
            hw = (im.height, im.width)
        refs[f"can/{path.parent.name}/{path.stem}"] = resize_map(anomaly_maps(module, image)[0].numpy(), hw)
    threshold = float(np.median(np.concatenate([r.reshape(-1) for r in refs.values()])))
    (run_dir / MVTEC_AD2_RECORD).write_text(json.dumps({"threshold": threshold}))
    return {"tmp": tmp, "run": run_dir, "cat": cat, "refs": refs, "threshold": threshold}


def test_submission_folder_is_what_the_server_takes(ad2_run):
    out = ad2_run["tmp"] / "submission"
    result = predict(ad2_run["run"], str(ad2_run["cat"]), output=out, trainer="cpu", format="mvtec_ad2")
    assert result["csv"] is None and result["threshold"] == ad2_run["threshold"]  # the run's recorded one
    assert {p.name for p in out.iterdir()} == {SUBMISSION_MAPS, SUBMISSION_MASKS}  # nothing else at the top
    for top, suffix in ((SUBMISSION_MAPS, ".tiff"), (SUBMISSION_MASKS, ".png")):
        assert {p.name for p in (out / top).iterdir()} == {"can"}
        assert {p.name for p in (out / top / "can").iterdir()} == {"test_private", "test_private_mixed"}
        files = {p.relative_to(out / top).with_suffix("").as_posix() for p in (out / top).rglob(f"*{suffix}")}
        assert files == set(ad2_run["refs"])
    for name, ref in ad2_run["refs"].items():
        amap = tifffile.imread(out / SUBMISSION_MAPS / f"{name}.tiff")
        assert amap.dtype == np.float16 and amap.shape == ref.shape
        np.testing.assert_allclose(amap.astype(np.float32), ref, atol=2e-3)
        mask = np.asarray(Image.open(out / SUBMISSION_MASKS / f"{name}.png"))
        assert mask.ndim == 2 and set(np.unique(mask).tolist()) <= {0, 255}
        clear = np.abs(ref - ad2_run["threshold"]) > 1e-5
        assert np.array_equal((mask == 255)[clear], (ref >= ad2_run["threshold"])[clear])
    for row in result["rows"]:  # the area reported is the mask written
        mask = np.asarray(Image.open(out / SUBMISSION_MASKS / f"{row.name}.png"))
        assert row.defect_area_px == int((mask == 255).sum()) and row.path.endswith(
            f"{Path(row.name).name}.png"
        )


def test_submission_named_after_the_runs_category(ad2_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ad2_run["run"], run)
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.category.name, cfg.data.layout = "can", "mvtec_ad2"
    OmegaConf.save(cfg, run / "config.yaml")
    renamed = tmp_path / "can_copy"
    shutil.copytree(ad2_run["cat"], renamed)
    out = tmp_path / "s"
    done = predict(run, str(renamed), output=out, trainer="cpu", format="mvtec_ad2", check=True)
    assert [p.name for p in (out / SUBMISSION_MAPS).iterdir()] == ["can"]  # not "can_copy"
    # checked whole: the seven other categories are missing, twice (maps and masks), and nothing else
    assert len(done["problems"]) == 14 and all("can" not in p.split(": ")[0] for p in done["problems"])
    with pytest.raises(UserError, match="check=true checks an MVTec AD 2 submission"):
        predict(run, str(renamed), output=tmp_path / "v", check=True)
    other = tmp_path / "fabric"
    shutil.copytree(ad2_run["cat"], other)
    with pytest.raises(UserError, match="is MVTec AD 2's fabric, but the run was trained on can"):
        predict(run, str(other), output=tmp_path / "t", trainer="cpu", format="mvtec_ad2")
    with pytest.raises(UserError, match="'can_copy' .* is none of them"):  # a run of another layout
        predict(ad2_run["run"], str(renamed), output=tmp_path / "u", trainer="cpu", format="mvtec_ad2")


def _full_submission(tmp_path: Path) -> tuple[Path, Path]:
    """A submission of all eight categories (2 + 1 images each, 6x8 px) and the private images it is for."""
    data, out = tmp_path / "data", tmp_path / "submission"
    for category in submission_categories():
        for split, n in (("test_private", 2), ("test_private_mixed", 1)):
            for i in range(n):
                _save(data / category / split / f"{i:03d}_regular.png", np.zeros((6, 8, 3), np.uint8))
                amap = np.full((6, 8), 0.25, np.float32)
                write_submission_files(out, f"{category}/{split}/{i:03d}_regular", amap, amap > 0.5)
    return out, data


def test_submission_check_finds_what_the_server_refuses(tmp_path, capsys):
    out, data = _full_submission(tmp_path)
    assert len(submission_categories()) == 8
    assert check_submission(out, data) == [] and check_submission(out) == []
    assert main(["check=true", f"output={out}", f"input={data}"]) == 0
    assert "complete against" in capsys.readouterr().out
    maps, masks = out / SUBMISSION_MAPS, out / SUBMISSION_MASKS
    shutil.rmtree(maps / "can" / "test_private_mixed")  # a missing split
    (maps / "rice" / "test_private" / "001_regular.tiff").unlink()  # a short count
    tifffile.imwrite(maps / "vial" / "test_private" / "000_regular.tiff", np.zeros((6, 8), np.float32))
    Image.fromarray(np.full((6, 8), 7, np.uint8)).save(masks / "walnuts" / "test_private" / "000_regular.png")
    (masks / "fabric" / "test_private" / ".000_regular.png.x1y2.tmp").write_bytes(b"")  # a killed write
    shutil.rmtree(maps / "sheet_metal")  # a missing category (of the maps)
    (out / "notes.txt").write_text("x")
    write_submission_files(
        out, "wallplugs/test_private/000_regular", np.zeros((5, 8)), np.zeros((5, 8), bool)
    )
    problems = check_submission(out, data)
    expected = [
        f"{maps / 'can' / 'test_private_mixed'}: missing",
        f"{maps / 'rice' / 'test_private'}: 1 files, 2 images — missing 001_regular",
        f"{maps / 'vial' / 'test_private' / '000_regular.tiff'}: float32 [6, 8], the server takes 2-D float16",
        f"{masks / 'walnuts' / 'test_private' / '000_regular.png'}: holds values [7] besides 0 and 255",
        f"{masks / 'fabric' / 'test_private' / '.000_regular.png.x1y2.tmp'}: not a .png file of the submission",
        f"{maps / 'sheet_metal'}: missing",
        f"{out / 'notes.txt'}: not part of a submission",
        f"{out}/*/wallplugs/test_private/000_regular: [5, 8] pixels, the image has [6, 8]",
    ]
    for start in expected:
        assert sum(p.startswith(start) for p in problems) == 1, (start, problems)
    assert len(problems) == len(expected), problems
    assert all("\n" not in p for p in problems)
    assert main(["check=true", f"output={out}", f"input={data}"]) == 1
    printed = capsys.readouterr()
    assert printed.out.splitlines() == problems and "the server would refuse it" in printed.err
    # without the images: maps and masks must still agree, file by file
    assert any(p.startswith("rice/test_private: 1 maps and 2 masks") for p in check_submission(out))
    assert check_submission(tmp_path / "nowhere") == [
        f"{tmp_path / 'nowhere'}: not a folder — pass the submission folder (holding anomaly_images/)"
    ]


def test_submission_errors_are_one_line(ad2_run, tmp_path, capsys):
    (ad2_run["run"] / MVTEC_AD2_RECORD).rename(tmp_path / "record.json")
    try:
        with pytest.raises(
            UserError, match="records no threshold chosen on normal images .* pass threshold="
        ):
            predict(ad2_run["run"], str(ad2_run["cat"]), output=tmp_path / "s", format="mvtec_ad2")
        done = predict(
            ad2_run["run"], str(ad2_run["cat"]), output=tmp_path / "s", format="mvtec_ad2", threshold=0.5
        )
        assert done["threshold"] == 0.5 and (tmp_path / "s" / SUBMISSION_MAPS).is_dir()
    finally:
        (tmp_path / "record.json").rename(ad2_run["run"] / MVTEC_AD2_RECORD)
    with pytest.raises(UserError, match="has no images in test_private or test_private_mixed"):
        predict(ad2_run["run"], str(ad2_run["cat"] / "train"), output=tmp_path / "t", format="mvtec_ad2")
    broken = make_fake_mvtec_ad2(tmp_path / "broken")
    (broken / "test_private_mixed" / "001_mixed.png").write_bytes(b"not a png")
    assert (
        main([f"run={ad2_run['run']}", f"input={broken}", f"output={tmp_path / 'u'}", "format=mvtec_ad2"])
        == 2
    )
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "cannot read image" in lines[0] and "001_mixed.png" in lines[0]
    assert not (tmp_path / "u").exists()  # stopped before anything was written
    with pytest.raises(UserError, match=r"format='tiff' is not one of \['default', 'mvtec_ad2'\]"):
        predict(ad2_run["run"], str(ad2_run["cat"]), format="tiff")


# --- one end-to-end run per layout -------------------------------------------------------------------------


def _run(tmp: Path, layout: str, root: Path, *extra: str):
    name = {"visa": "candle", "mvtec_ad2": "can"}[layout]
    cfg = compose_cfg(
        tmp, [f"category={layout}/{name}", f"data.root={root}", "debug=fast", "data.image_size=32", *extra]
    )
    return cfg, train(cfg)


@pytest.mark.slow
def test_visa_end_to_end(tmp_path):
    make_fake_visa(tmp_path / "visa")
    cfg, summary = _run(tmp_path, "visa", tmp_path / "visa")
    assert summary["status"] == "ok" and set(summary["metrics"]) == STANDARD  # no extra metrics for VisA
    manifest = json.loads(Path(summary["split"]["manifest"]).read_text())
    assert (
        manifest["layout"] == "visa"
        and sum(summary["split"][f"n_{p}"] for p in ("train", "val", "test")) == 18
    )
    assert not (Path(cfg.paths.run_dir) / MVTEC_AD2_RECORD).exists()


def test_mvtec_ad2_end_to_end_records_its_metrics(tmp_path):
    make_fake_mvtec_ad2(tmp_path / "ad2", n_train=10, n_val=5, n_good=4, n_bad=6)
    cfg, summary = _run(tmp_path, "mvtec_ad2", tmp_path / "ad2", "trainer.limit_test_batches=null")
    run = Path(cfg.paths.run_dir)
    assert summary["status"] == "ok" and set(summary["metrics"]) == STANDARD | EXTRA
    on_disk = json.loads((run / "summary.json").read_text())
    record = json.loads((run / MVTEC_AD2_RECORD).read_text())
    assert record["metrics"] == {k: on_disk["metrics"][k] for k in EXTRA}
    # recomputed from the saved test maps and from the val part's normal images alone
    pred = np.load(run / "test_predictions.npz")
    assert seg_f1(pred["anomaly_map"], pred["gt_mask"], record["threshold"]) == pytest.approx(
        summary["metrics"]["test/SegF1"], abs=1e-12
    )
    assert aupro(pred["anomaly_map"], pred["gt_mask"], fpr_limit=0.05) == pytest.approx(
        summary["metrics"]["test/pixel_AUPRO_0.05"], abs=1e-12
    )
    dm = build_datamodule(cfg)
    normal = dm.dataset("val", normal_only=True)
    assert record["n_images"] == len(normal) > 0
    module = load_trained(run).module
    maps = anomaly_maps(module, torch.stack([normal[i]["image"] for i in range(len(normal))]))
    assert normal_threshold(maps) == pytest.approx(record["threshold"], rel=1e-5)
    # and the run's submission for the server, with that threshold
    result = predict(run, str(tmp_path / "ad2" / "can"), trainer="cpu", format="mvtec_ad2")
    assert result["output"] == run / "submission" and result["threshold"] == record["threshold"]
    assert len(list((run / "submission" / SUBMISSION_MAPS).rglob("*.tiff"))) == 3 + 2


def test_mvtec_ad2_official_protocol_thresholds_on_validation_good(tmp_path):
    """Official parts with the teacher: train/good trains it, validation/good alone sets the threshold,
    test_public is scored."""
    make_fake_mvtec_ad2(tmp_path / "ad2", n_train=6, n_val=3, n_good=2, n_bad=3)
    cfg, summary = _run(
        tmp_path,
        "mvtec_ad2",
        tmp_path / "ad2",
        *TINY_TRANSFUSION,
        "data.protocol=official",
        "trainer.limit_test_batches=null",
    )
    assert (
        summary["split"]["n_train"] == 6
        and summary["split"]["n_val"] == 3
        and summary["split"]["n_test"] == 5
    )
    record = json.loads((Path(cfg.paths.run_dir) / MVTEC_AD2_RECORD).read_text())
    assert record["n_images"] == 3 and np.isfinite(record["threshold"])
    assert set(summary["metrics"]) == STANDARD | EXTRA and 0.0 <= summary["metrics"]["test/SegF1"] <= 1.0
