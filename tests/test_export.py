"""`mvtec_seg.export`: the ONNX graph run by onnxruntime matches PyTorch to 1e-4 on random and real inputs,
with any batch size; the JSON beside it says how to feed it. TransFusion: the one-step network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REAL_BOTTLE, make_fake_mvtec
from trained_runs import TINY_TRANSFUSION, save_checkpoint, tiny_module, unet_run

from mvtec_seg.data.mvtec import load_rgb
from mvtec_seg.export import OPSET, export_onnx, main

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOL = 1e-4


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _real_images(tmp: Path, size: int) -> torch.Tensor:
    """Two real bottle images when the shared data is there, else two synthetic ones, as model inputs."""
    if REAL_BOTTLE.is_dir():
        files = sorted((REAL_BOTTLE / "test" / "broken_large").glob("*.png"))[:2]
    else:
        files = sorted((make_fake_mvtec(tmp, "fake", size=(48, 48)) / "test" / "scratch").glob("*.png"))[:2]
    arr = np.stack([load_rgb(f, size) for f in files])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


@pytest.mark.slow
def test_segmenter_onnx_matches_pytorch(tmp_path: Path) -> None:
    run_dir, module = unet_run(tmp_path, threshold=0.37)
    path = export_onnx(run_dir)
    assert path == run_dir / "export" / "model.onnx"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["image_size"] == 32 and meta["threshold"] == 0.37 and meta["opset"] == OPSET
    assert meta["inputs"] == {"image": [3, 32, 32]} and meta["kind"] == "segmenter"
    assert meta["normalisation"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    sess = _session(path)
    for images in (torch.rand(3, 3, 32, 32), torch.rand(1, 3, 32, 32), _real_images(tmp_path, 32)):
        amap, score = sess.run(["anomaly_map", "pred_score"], {"image": images.numpy()})
        with torch.no_grad():
            ref = module.anomaly_map(images)
        assert amap.shape == tuple(ref.shape)
        np.testing.assert_allclose(amap, ref.numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(score, ref.flatten(1).amax(1).numpy(), atol=TOL, rtol=0)


@pytest.mark.slow
def test_transfusion_one_step_onnx_matches_pytorch(tmp_path: Path) -> None:
    module = tiny_module(tmp_path, TINY_TRANSFUSION)
    ckpt = save_checkpoint(module, tmp_path / "teacher" / "model.ckpt")
    path = export_onnx(ckpt, output=tmp_path / "tf.onnx")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["kind"] == "transfusion_one_step" and meta["threshold"] is None
    assert meta["reverse_process"]["betas"] == pytest.approx(module.model.betas.tolist())
    assert meta["inputs"] == {"x_t": [3, 32, 32], "prev_mask": [1, 32, 32], "t": []}
    sess = _session(path)
    real = _real_images(tmp_path, 32) * 2 - 1
    for x in (torch.rand(3, 3, 32, 32) * 2 - 1, real):
        b = len(x)
        prev = (torch.rand(b, 1, 32, 32) > 0.5).float()
        t = torch.randint(1, 4, (b,))
        outs = sess.run(None, {"x_t": x.numpy(), "prev_mask": prev.numpy(), "t": t.numpy()})
        with torch.no_grad():
            refs = module.model.net(x, prev, t)
        for got, ref in zip(outs, refs, strict=True):
            np.testing.assert_allclose(got, ref.numpy(), atol=TOL, rtol=0)


@pytest.mark.slow
def test_cli_rejects_bad_format_and_missing_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir, _ = unet_run(tmp_path, threshold=0.5)
    assert main([f"run={run_dir}", "format=tflite"]) == 2
    assert "format='tflite' is not supported" in capsys.readouterr().err
    assert main([f"run={run_dir}", f"output={tmp_path / 'x.pt'}"]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    bad = subprocess.run(
        [sys.executable, "-m", "mvtec_seg.export", f"run={tmp_path / 'nope'}", "format=onnx"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("error: run not found")
