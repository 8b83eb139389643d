"""`mvtec_seg.predict`: new images of any size and channel count through a trained model, batched, with the
run's decision threshold; per-image files and predictions.csv agree with a one-image-at-a-time reference;
bad input is one clear line. Models are built directly (no training), so the tests take seconds."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trained_runs import TINY_TRANSFUSION, save_checkpoint, tiny_module, unet_run

from mvtec_seg.cli import command_args, compose_command
from mvtec_seg.data.mvtec import load_rgb, resize_rgb
from mvtec_seg.errors import UserError
from mvtec_seg.inference import load_trained, resize_map
from mvtec_seg.metrics import f1_optimal_threshold
from mvtec_seg.models.base import anomaly_maps
from mvtec_seg.predict import CSV_COLUMNS, PREDICTIONS_CSV, input_files, main, predict

SIZES = {
    "sub/a.png": (40, 40),
    "b.png": (30, 50),
    "sub/c.png": (64, 48),
    "d.png": (20, 20),
    "e.jpg": (33, 35),
}


def _write_images(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    for rel, (h, w) in SIZES.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel == "b.png":  # grey
            Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(path)
        elif rel == "sub/c.png":  # RGBA
            Image.fromarray(rng.integers(0, 255, (h, w, 4), dtype=np.uint8)).save(path)
        elif rel == "d.png":  # 16-bit grey
            Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16)).save(path)
        else:
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return folder


def _reference_map(module, path: Path, size: int) -> np.ndarray:
    """One image alone, read exactly as the training cache reads it (`load_rgb(path, size)`)."""
    image = torch.from_numpy(np.array(load_rgb(path, size))).permute(2, 0, 1)[None].float() / 255.0
    return anomaly_maps(module, image)[0].numpy()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("predict")
    images = _write_images(tmp / "images")
    run_dir, module = unet_run(tmp, threshold=None)
    refs = {rel: _reference_map(module, images / rel, 32) for rel in SIZES}
    threshold = float(np.median([r.max() for r in refs.values()]))  # splits the images
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["decision_threshold"]["value"] = threshold  # the run's recorded threshold
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return {
        "tmp": tmp,
        "images": images,
        "run": run_dir,
        "module": module,
        "refs": refs,
        "threshold": threshold,
    }


def _rows(csv_path: Path) -> dict[str, dict[str, str]]:
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        return {Path(r["path"]).relative_to(csv_path.parent.parent / "images").as_posix(): r for r in reader}


def test_inputs_are_read_as_in_training(setup: dict) -> None:
    for rel in SIZES:
        full = load_rgb(setup["images"] / rel, None)
        assert full.shape == (*SIZES[rel], 3)
        assert np.array_equal(resize_rgb(full, 32), load_rgb(setup["images"] / rel, 32))


def test_batched_prediction_matches_one_image_at_a_time(setup: dict) -> None:
    out = setup["tmp"] / "pred"
    result = predict(setup["run"], str(setup["images"]), output=out, batch_size=2)
    thr = setup["threshold"]
    assert result["threshold"] == thr and result["csv"] == out / PREDICTIONS_CSV
    rows = _rows(result["csv"])
    assert set(rows) == set(SIZES)
    decisions = set()
    for rel, (h, w) in SIZES.items():
        row, ref = rows[rel], setup["refs"][rel]
        name = row["name"]
        assert name == Path(rel).with_suffix("").as_posix().replace("/", "_")
        assert float(row["image_score"]) == pytest.approx(float(ref.max()), abs=1e-5)
        amap = np.load(out / f"{name}_map.npy")
        assert amap.dtype == np.float32 and amap.shape == (h, w)  # back at the input's size
        np.testing.assert_allclose(amap, resize_map(ref, (h, w)), atol=1e-5)
        mask = np.asarray(Image.open(out / f"{name}_mask.png"))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, amap >= thr)
        assert int(row["defect_area_px"]) == int((mask == 255).sum())
        assert row["decision"] == ("anomalous" if float(row["image_score"]) >= thr else "normal")
        decisions.add(row["decision"])
        overlay = np.asarray(Image.open(out / f"{name}_overlay.png"))
        assert overlay.shape == (h, w, 3)
    assert decisions == {"anomalous", "normal"}


def test_threshold_override_and_default_output(setup: dict) -> None:
    result = predict(setup["run"], str(setup["images"] / "b.png"), threshold=1.01)
    assert result["output"] == setup["run"] / "predictions"
    (row,) = result["rows"]
    assert row.decision == "normal" and row.defect_area_px == 0
    with pytest.raises(UserError, match="is not empty .* overwrite=true"):  # the first call's files are there
        predict(setup["run"], str(setup["images"] / "sub" / "*.png"), threshold=-1.0)
    result = predict(setup["run"], str(setup["images"] / "sub" / "*.png"), threshold=-1.0, overwrite=True)
    assert [r.name for r in result["rows"]] == ["a", "c"]  # glob names are relative to the common folder
    assert all(r.decision == "anomalous" and r.defect_area_px > 0 for r in result["rows"])
    assert not list(result["output"].glob("b_*"))  # replaced, not mixed with the first call's maps


def test_transfusion_checkpoint_outside_a_run(setup: dict, tmp_path: Path) -> None:
    module = tiny_module(tmp_path, TINY_TRANSFUSION)
    ckpt = save_checkpoint(module, tmp_path / "teacher" / "model.ckpt")
    trained = load_trained(ckpt)
    assert trained.model == "transfusion" and trained.image_size == 32 and trained.threshold is None
    with pytest.raises(UserError, match="records no decision threshold"):
        predict(ckpt, str(setup["images"] / "sub" / "a.png"))
    result = predict(ckpt, str(setup["images"] / "sub" / "a.png"), threshold=0.0, output=tmp_path / "p")
    (row,) = result["rows"]
    ref = _reference_map(module, setup["images"] / "sub" / "a.png", 32)
    assert row.image_score == pytest.approx(float(ref.max()), abs=1e-5)
    assert np.load(tmp_path / "p" / "a_map.npy").shape == SIZES["sub/a.png"]


def test_f1_optimal_threshold_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(5, 60))
        scores = rng.integers(0, 8, n).astype(np.float32) / 7  # many ties
        labels = rng.random(n) < 0.3
        if not labels.any():
            labels[0] = True
        best = (-1.0, None)
        for thr in sorted(set(scores.tolist()), reverse=True):
            pred = scores >= thr
            tp = int((pred & labels).sum())
            f1 = 2 * tp / (pred.sum() + labels.sum())
            if f1 > best[0] + 1e-12:
                best = (f1, thr)
        thr, f1 = f1_optimal_threshold(torch.from_numpy(scores), torch.from_numpy(labels))
        assert f1 == pytest.approx(best[0]) and thr == pytest.approx(best[1])
    with pytest.warns(UserWarning, match="no positive"):
        thr, f1 = f1_optimal_threshold(torch.rand(10), torch.zeros(10, dtype=torch.bool))
    assert np.isnan(thr) and np.isnan(f1)


def _bad_inputs(setup: dict, tmp: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    broken = tmp / "broken.png"
    broken.write_bytes(b"not a png at all")
    garbage = tmp / "garbage.ckpt"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    plain = tmp / "plain.ckpt"
    torch.save({"weight": torch.zeros(2)}, plain)
    seg = save_checkpoint(setup["module"], tmp / "bare_unet.ckpt")
    run, img = str(setup["run"]), str(setup["images"] / "b.png")
    return {
        "missing run": ([f"run={tmp / 'nope'}", f"input={img}"], "run not found"),
        "not a run folder": ([f"run={empty}", f"input={img}"], "is not a run folder"),
        "empty folder": ([f"run={run}", f"input={empty}"], "holds no images"),
        "no such input": ([f"run={run}", f"input={tmp / 'none.png'}"], "input not found"),
        "empty glob": ([f"run={run}", f"input={empty}/*.png"], "matches no image files"),
        "unreadable image": ([f"run={run}", f"input={broken}"], "cannot read image"),
        "garbage checkpoint": ([f"run={garbage}", f"input={img}"], "cannot read checkpoint"),
        "plain state dict": ([f"run={plain}", f"input={img}"], "is not a mvtec_seg checkpoint"),
        "bare segmenter": ([f"run={seg}", f"input={img}"], "pass image_size="),
        "unknown key": ([f"run={run}", f"input={img}", "colour=red"], "unknown setting 'colour'"),
        "not key=value": ([run], "is not key=value"),
        "missing input": ([f"run={run}"], "input= is required"),
        "bad number": ([f"run={run}", f"input={img}", "threshold=high"], "is not a number"),
    }


def test_bad_input_is_one_line_exit_2(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for case, (argv, message) in _bad_inputs(setup, tmp_path).items():
        assert main(argv) == 2, case
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (case, err)


def test_every_input_is_checked_before_anything_is_written(setup: dict, tmp_path: Path) -> None:
    """An image that fails to decode in a later batch leaves no output and no temporary behind."""
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / name)
    (images / "c.png").write_bytes((images / "c.png").read_bytes()[:100])  # a valid header, truncated data
    out = tmp_path / "out"
    with pytest.raises(UserError, match="cannot read image .*c.png"):
        predict(setup["run"], str(images), output=out, batch_size=1, threshold=0.5)
    assert not out.exists() and list(tmp_path.iterdir()) == [images]
    with pytest.raises(UserError, match="decompression bomb .* max_image_pixels="):
        predict(setup["run"], str(images), output=out, threshold=0.5, max_image_pixels=10)
    assert not out.exists()


def test_output_must_be_new_or_empty_unless_overwrite(setup: dict, tmp_path: Path) -> None:
    image = setup["images"] / "d.png"
    stale = tmp_path / "out" / "old_map.npy"
    stale.parent.mkdir()
    stale.write_bytes(b"from an earlier call")
    with pytest.raises(UserError, match="is not empty"):
        predict(setup["run"], str(image), output=stale.parent, threshold=0.5)
    assert stale.is_file()
    result = predict(setup["run"], str(image), output=stale.parent, threshold=0.5, overwrite=True)
    assert sorted(p.name for p in result["output"].iterdir()) == [
        "d_map.npy",
        "d_mask.png",
        "d_overlay.png",
        PREDICTIONS_CSV,
    ]
    with pytest.raises(UserError, match="is a file"):
        predict(setup["run"], str(image), output=stale.parent / "d_map.npy", threshold=0.5)
    for argv, message in (
        (["threshold=nan"], "must be a finite number"),
        (["batch_size=0"], "batch_size=0 must be at least 1"),
        (["overwrite=maybe"], "overwrite='maybe' is not true or false"),
        (["batch_size=two"], "batch_size='two' is not a whole number"),
    ):
        cfg = compose_command("predict", [f"run={setup['run']}", f"input={image}", *argv])
        with pytest.raises(UserError, match=message):
            predict(**command_args(cfg, predict, required=("run", "input")))


def test_names_stay_unique(tmp_path: Path) -> None:
    for rel in ("a_b/c.png", "a/b_c.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / rel)
    names = [n for _, n in input_files(str(tmp_path))]
    assert sorted(names) == ["a_b_c", "a_b_c_2"]


@pytest.mark.slow
def test_cli(setup: dict, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "mvtec_seg.predict", f"run={setup['run']}"]
    ok = subprocess.run(
        [*cmd, f"input={setup['images']}", f"output={tmp_path / 'o'}", "trainer=cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "5 images" in ok.stdout and (tmp_path / "o" / PREDICTIONS_CSV).is_file()
    # its mistakes: test_bad_input_is_one_line_exit_2 in-process; the shared wrapper in a real process:
    # test_export.py
