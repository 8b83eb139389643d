"""The one inference path: `loader_maps` batches `anomaly_maps` (order, kept fields, an empty loader), and
the teacher's maps through it are the module's own maps in manifest order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import PSEUDO_FAST, compose_cfg, with_teacher
from torch.utils.data import DataLoader
from trained_runs import TINY_UNET, tiny_module

from mvtec_seg.builders import build_datamodule, trainer_device
from mvtec_seg.models.base import anomaly_maps, loader_maps
from mvtec_seg.teacher import ensure_teacher, predict_maps


def test_loader_maps_equal_anomaly_maps_in_loader_order(tmp_path: Path) -> None:
    module = tiny_module(tmp_path, TINY_UNET)
    images = torch.rand(7, 3, 32, 32)
    rows = [{"image": images[i], "index": torch.tensor(i)} for i in range(7)]
    maps, kept = loader_maps(module, DataLoader(rows, batch_size=3), ("index",))
    assert maps.shape == (7, 32, 32) and maps.dtype == torch.float32 and maps.device.type == "cpu"
    assert kept["index"].tolist() == list(range(7))
    torch.testing.assert_close(maps, anomaly_maps(module, images), rtol=0, atol=1e-6)
    empty, nothing = loader_maps(module, DataLoader([], batch_size=3), ("index",))
    assert empty.shape[0] == 0 and nothing["index"].numel() == 0


def test_teacher_maps_are_the_modules_maps_in_manifest_order(tmp_path: Path, teacher_cache: Path) -> None:
    cfg = compose_cfg(with_teacher(teacher_cache, tmp_path), PSEUDO_FAST)
    dm = build_datamodule(cfg)
    dm.prepare()
    module = ensure_teacher(cfg, dm).module
    maps = predict_maps(cfg.teacher.trainer, module, dm)
    assert maps.dtype == np.float16 and len(maps) == len(dm.manifest["samples"])
    assert next(module.parameters()).device.type == "cpu"  # left where a Trainer leaves it
    first = torch.stack([dm.predict_dataloader().dataset[i]["image"] for i in (0, len(maps) - 1)])
    expected = anomaly_maps(module, first).numpy()
    assert np.abs(expected[0] - expected[1]).max() > 2e-3  # the two images' maps tell them apart
    np.testing.assert_allclose(maps[[0, len(maps) - 1]].astype(np.float32), expected, rtol=0, atol=5e-4)


def test_trainer_device_follows_the_accelerator() -> None:
    assert trainer_device({"accelerator": "cpu"}).type == "cpu"
    auto = trainer_device({"accelerator": "auto"}).type
    assert auto == ("cuda" if torch.cuda.is_available() else "cpu")
    assert trainer_device({}).type == auto  # no accelerator: Lightning's default, auto
