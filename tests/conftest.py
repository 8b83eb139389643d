"""Shared fixtures: offline environment, a tiny fake MVTec tree, and Hydra Compose API helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mvtec_seg.config import CONF_DIR as _CONF_DIR
from mvtec_seg.config import compose_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

CONF_DIR = str(_CONF_DIR)
REAL_BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec" / "bottle"


def compose_cfg(tmp_path: Path, overrides: list[str] | None = None):
    """Compose the real config with outputs and caches redirected into tmp_path."""
    base = [
        f"paths.output_dir={tmp_path / 'outputs'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.run_dir={tmp_path / 'run'}",
        "trainer.enable_progress_bar=false",
    ]
    return compose_config(base + list(overrides or []))


@pytest.fixture
def cfg_fast(tmp_path: Path):
    """The composed default config in `debug=fast`, outputs and caches under tmp_path."""
    return compose_cfg(tmp_path, ["debug=fast"])


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def make_fake_mvtec(
    root: Path,
    name: str = "fake",
    size: tuple[int, int] = (40, 40),
    n_train: int = 10,
    n_good: int = 3,
    defects: dict[str, int] | None = None,
    channels: str = "rgb",
    seed: int = 0,
) -> Path:
    """A tiny MVTec-layout category: random images, a square defect per defect image."""
    rng = np.random.default_rng(seed)
    defects = {"scratch": 4, "hole": 3} if defects is None else defects
    cat = root / name
    h, w = size

    def image() -> np.ndarray:
        if channels == "gray":
            return rng.integers(0, 255, (h, w), dtype=np.uint8)
        if channels == "rgba":
            return rng.integers(0, 255, (h, w, 4), dtype=np.uint8)
        return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)

    for i in range(n_train):
        _save(cat / "train" / "good" / f"{i:03d}.png", image())
    for i in range(n_good):
        _save(cat / "test" / "good" / f"{i:03d}.png", image())
    for d, n in defects.items():
        for i in range(n):
            _save(cat / "test" / d / f"{i:03d}.png", image())
            mask = np.zeros((h, w), dtype=np.uint8)
            mask[h // 4 : h // 2, w // 4 : w // 2] = 255
            _save(cat / "ground_truth" / d / f"{i:03d}_mask.png", mask)
    return cat


@pytest.fixture
def fake_mvtec(tmp_path: Path) -> Path:
    return make_fake_mvtec(tmp_path / "mvtec")


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m mvtec_seg <args>` in a fresh process, offline, output captured."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "mvtec_seg", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
