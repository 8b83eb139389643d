"""Shared fixtures: offline environment, a tiny fake MVTec tree, and Hydra Compose API helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mvtec_seg.config import CONF_DIR as _CONF_DIR
from mvtec_seg.config import compose_config
from mvtec_seg.precision import NATIVE_BF16_ENV

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# runs take the same precision on every machine (float32); tests of the bf16 default set it themselves
os.environ.setdefault(NATIVE_BF16_ENV, "0")

CONF_DIR = str(_CONF_DIR)
REAL_BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec" / "bottle"


TINY_TEACHER = [
    "teacher.trainer.max_epochs=1",
    "teacher.trainer.limit_train_batches=2",
    "teacher.params.net.base_channels=8",
    "teacher.params.net.channel_mult=[1,2]",
    "teacher.params.net.attention_levels=[]",
    "teacher.params.net.num_steps=4",
    "teacher.params.net.norm_groups=4",
]
"""A teacher of a few thousand parameters and 4 steps, trained for two batches: for the tests of what is built
on its maps (pseudo masks, selection, sweeps, comparisons), where its quality does not matter."""


def compose_cfg(tmp_path: Path, overrides: list[str] | None = None):
    """Compose the real config with outputs and caches redirected into tmp_path."""
    base = [
        f"paths.output_dir={tmp_path / 'outputs'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.run_dir={tmp_path / 'run'}",
        "trainer.enable_progress_bar=false",
    ]
    return compose_config(base + list(overrides or []))


TEACHER_FAST = ["debug=fast", *TINY_TEACHER, "data.image_size=32"]
"""A `debug=fast` run on the synthetic category with the tiny teacher: the teacher `teacher_cache` holds."""
PSEUDO_FAST = ["mask=pseudo", *TEACHER_FAST]


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding the synthetic category, its split, and the tiny teacher of `PSEUDO_FAST` with its maps,
    built once a session. `with_teacher` copies it into a test's own cache: the test starts where the teacher
    is done and writes nothing another test reads."""
    from mvtec_seg.builders import build_datamodule
    from mvtec_seg.teacher import ensure_teacher, teacher_maps

    tmp = tmp_path_factory.mktemp("teacher")
    cfg = compose_cfg(tmp, PSEUDO_FAST)
    dm = build_datamodule(cfg)
    dm.prepare()
    teacher_maps(cfg, dm, ensure_teacher(cfg, dm))
    return tmp / "cache"


def with_teacher(teacher_cache: Path, tmp_path: Path) -> Path:
    """`tmp_path` with a copy of the session's teacher cache as its `cache` (compose_cfg's cache folder)."""
    shutil.copytree(teacher_cache, tmp_path / "cache")
    return tmp_path


SEGMENTER_RUN = [
    "category=custom",
    "category.name=widget",
    "debug=fast",
    "data.image_size=32",
    "trainer.limit_test_batches=null",
    "checkpoint.last_every_s=0",
]
"""The settings of `segmenter_run` (with `data.root` and `paths.run_dir`)."""


@pytest.fixture(scope="session")
def segmenter_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One finished tiny U-Net run on GT masks (a fake `widget` category), trained once a session; tests read
    it, or copy its folder before they change anything."""
    from mvtec_seg.train import train

    tmp = tmp_path_factory.mktemp("segmenter")
    data = tmp / "data"
    make_fake_mvtec(data, name="widget")
    run_dir = tmp / "run"
    cfg = compose_cfg(tmp, [f"data.root={data}", *SEGMENTER_RUN, f"paths.run_dir={run_dir}"])
    return {"tmp": tmp, "data": data, "run": run_dir, "cfg": cfg, "summary": train(cfg)}


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


def make_fake_visa(
    root: Path,
    name: str = "candle",
    size: tuple[int, int] = (40, 40),
    n_normal: int = 12,
    n_anomaly: int = 6,
    n_test_normal: int = 3,
    mask_value: int = 1,
    seed: int = 0,
) -> Path:
    """A tiny VisA category as distributed: JPEG images, masks with 0/`mask_value`, and its rows in
    `<root>/split_csv/1cls.csv` (the last `n_test_normal` normal images and every anomaly in `test`)."""
    import csv

    rng = np.random.default_rng(seed)
    cat = root / name
    h, w = size
    rows = []
    for i in range(n_normal):
        rel = f"Data/Images/Normal/{i:04d}.JPG"
        _save(cat / rel, rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        rows.append(
            [name, "train" if i < n_normal - n_test_normal else "test", "normal", f"{name}/{rel}", ""]
        )
    for i in range(n_anomaly):
        rel, mask_rel = f"Data/Images/Anomaly/{i:03d}.JPG", f"Data/Masks/Anomaly/{i:03d}.png"
        _save(cat / rel, rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[h // 4 : h // 2, w // 4 : w // 2] = mask_value
        _save(cat / mask_rel, mask)
        rows.append([name, "test", "anomaly", f"{name}/{rel}", f"{name}/{mask_rel}"])
    split = root / "split_csv" / "1cls.csv"
    split.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if split.exists():  # other categories' rows stay
        with open(split, newline="") as fh:
            kept = [r for r in list(csv.reader(fh))[1:] if r and r[0] != name]
    with open(split, "w", newline="") as fh:
        csv.writer(fh).writerows([["object", "split", "label", "image", "mask"], *kept, *rows])
    return cat


def make_fake_mvtec_ad2(
    root: Path,
    name: str = "can",
    size: tuple[int, int] = (40, 40),
    n_train: int = 8,
    n_val: int = 4,
    n_good: int = 3,
    n_bad: int = 4,
    n_private: int = 3,
    n_private_mixed: int = 2,
    seed: int = 0,
) -> Path:
    """A tiny MVTec AD 2 category: train/good, validation/good, test_public/{good,bad} with 0/255 masks, and
    mask-less test_private/ and test_private_mixed/."""
    rng = np.random.default_rng(seed)
    cat = root / name
    h, w = size

    def image() -> np.ndarray:
        return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)

    for folder, n in (("train/good", n_train), ("validation/good", n_val), ("test_public/good", n_good)):
        for i in range(n):
            _save(cat / folder / f"{i:03d}_regular.png", image())
    for i in range(n_bad):
        _save(cat / "test_public" / "bad" / f"{i:03d}_regular.png", image())
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[h // 4 : h // 2, w // 4 : w // 2] = 255
        _save(cat / "test_public" / "ground_truth" / "bad" / f"{i:03d}_regular_mask.png", mask)
    for i in range(n_private):
        _save(cat / "test_private" / f"{i:03d}_regular.png", image())
    for i in range(n_private_mixed):
        _save(cat / "test_private_mixed" / f"{i:03d}_mixed.png", image())
    return cat


def run_cli(
    args: list[str], cwd: Path, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m mvtec_seg <args>` in a fresh process, offline (W&B disabled unless `env` says), output
    captured."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mvtec_seg", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
