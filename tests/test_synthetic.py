"""The synthetic generator: exact MVTec layout, exact masks, determinism, difficulty and parallel safety."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mvtec_seg.data import synthetic
from mvtec_seg.data.synthetic import DEFECT_TYPES, generate_category, render_sample
from mvtec_seg.errors import UserError

SMALL = {"image_size": 64, "n_train": 4, "n_test_good": 2, "n_test_per_defect": 3}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


@pytest.fixture(scope="module")
def default_categories(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both default categories, generated once for the module (about a second each)."""
    root = tmp_path_factory.mktemp("synthetic")
    return {kind: generate_category(root, kind=kind, seed=0) for kind in ("object", "texture")}


@pytest.mark.parametrize("kind", ["object", "texture"])
def test_layout_is_exactly_mvtec(default_categories: dict[str, Path], kind: str) -> None:
    cat = default_categories[kind]
    assert cat.name == ("synthetic" if kind == "object" else "synthetic_texture")
    assert sorted(p.name for p in cat.iterdir() if p.is_dir()) == ["ground_truth", "test", "train"]
    assert [p.name for p in (cat / "train").iterdir()] == ["good"]
    assert sorted(p.name for p in (cat / "train" / "good").iterdir()) == [f"{i:03d}.png" for i in range(60)]
    defects = DEFECT_TYPES[kind]
    assert sorted(p.name for p in (cat / "test").iterdir()) == sorted(["good", *defects])
    assert sorted(p.name for p in (cat / "test" / "good").iterdir()) == [f"{i:03d}.png" for i in range(12)]
    assert sorted(p.name for p in (cat / "ground_truth").iterdir()) == sorted(defects)
    for d in defects:
        assert sorted(p.name for p in (cat / "test" / d).iterdir()) == [f"{i:03d}.png" for i in range(10)]
        assert sorted(p.name for p in (cat / "ground_truth" / d).iterdir()) == [
            f"{i:03d}_mask.png" for i in range(10)
        ]
        for i in range(10):
            with Image.open(cat / "test" / d / f"{i:03d}.png") as img:
                assert img.mode == "RGB" and img.size == (128, 128)
            with Image.open(cat / "ground_truth" / d / f"{i:03d}_mask.png") as m:
                assert m.mode == "L" and m.size == (128, 128)
                mask = np.asarray(m)
            assert set(np.unique(mask)) == {0, 255}, "masks are binary 0/255 and never empty"
    # No temporary or lock leftovers next to the category.
    assert sorted(p.name for p in cat.parent.iterdir() if p.name.startswith(".")) == []


def test_the_project_reader_accepts_it(default_categories: dict[str, Path]) -> None:
    mvtec = pytest.importorskip("mvtec_seg.data.mvtec")
    samples = mvtec.scan_category(default_categories["object"])
    assert len(samples) == 60 + 12 + 4 * 10
    assert sum(s.gt_mask is not None for s in samples) == 40


@pytest.mark.parametrize("kind", ["object", "texture"])
@pytest.mark.parametrize("defect_index", range(4))
def test_mask_is_exactly_the_changed_pixels(kind: str, defect_index: int) -> None:
    """Render the same scene with and without the defect (same noise): the difference is the mask."""
    defect = DEFECT_TYPES[kind][defect_index]
    for seed in range(4):
        clean = synthetic._SCENES[kind](np.random.default_rng(seed), 128)
        rng = np.random.default_rng(seed)
        dirty = synthetic._SCENES[kind](rng, 128)
        mask = synthetic._DEFECTS[defect](rng, dirty, 1.0)
        # Same exposure jitter and sensor noise for both renders.
        a = synthetic._finish(np.random.default_rng(99), clean)
        b = synthetic._finish(np.random.default_rng(99), dirty)
        changed = np.any(a != b, axis=-1)
        assert mask.any()
        assert not (changed & ~mask).any(), f"{defect}: pixels outside the mask changed"
        assert changed[mask].mean() > 0.9, f"{defect}: most mask pixels must visibly change"


def test_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    a = _files(generate_category(tmp_path / "a", kind="object", seed=3, **SMALL))
    b = _files(generate_category(tmp_path / "b", kind="object", seed=3, **SMALL))
    c = _files(generate_category(tmp_path / "c", kind="object", seed=4, **SMALL))
    assert a == b, "same seed must give byte-identical files"
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".png") and "ground_truth" not in k]
    assert all(a[k] != c[k] for k in images), "another seed must give other images"


def test_images_do_not_depend_on_the_other_counts(tmp_path: Path) -> None:
    """Each image has its own seed, so adding training images leaves the test set unchanged."""
    a = _files(generate_category(tmp_path / "a", kind="texture", **SMALL))
    b = _files(generate_category(tmp_path / "b", kind="texture", **{**SMALL, "n_train": 7}))
    assert {k: v for k, v in a.items() if k.startswith(("test", "ground"))} == {
        k: v for k, v in b.items() if k.startswith(("test", "ground"))
    }


def test_existing_folder_with_other_settings_is_an_error(tmp_path: Path) -> None:
    generate_category(tmp_path, kind="object", seed=0, **SMALL)
    assert generate_category(tmp_path, kind="object", seed=0, **SMALL) == tmp_path / "synthetic"
    with pytest.raises(UserError, match="seed=0 \\(wanted 1\\)"):
        generate_category(tmp_path, kind="object", seed=1, **SMALL)
    with pytest.raises(UserError, match="unknown synthetic kind"):
        generate_category(tmp_path, kind="fabric")


def _best_threshold_iou(values: np.ndarray, labels: np.ndarray) -> float:
    """Best IoU any single global threshold (either direction) reaches: sort + cumsum over all pixels."""
    best = 0.0
    for v in (values, -values):
        y = labels[np.argsort(-v, kind="stable")]
        tp = np.cumsum(y)
        best = max(best, float(np.max(tp / (np.arange(1, len(y) + 1) + y.sum() - tp))))
    return best


@pytest.mark.parametrize("kind", ["object", "texture"])
def test_not_trivial(default_categories: dict[str, Path], kind: str) -> None:
    cat = default_categories[kind]
    train_paths = sorted((cat / "train" / "good").glob("*.png"))[:16]
    train = np.stack([_load(p).astype(np.float32) for p in train_paths])
    # Normal images vary: every pair differs clearly (pose, colour, lighting, noise).
    diffs = np.abs(train[:, None] - train[None]).mean(axis=(2, 3, 4))
    assert diffs[~np.eye(len(train), dtype=bool)].min() > 8.0  # sensor noise alone gives ~4
    # No single global threshold on grey level or on any colour channel segments the defects: the best one
    # stays under 0.3 IoU (the object's defects are clear enough for the demo's teacher to learn in minutes;
    # a U-Net trained on GT reaches about twice that).
    paths = sorted((cat / "test").rglob("*.png"))
    images = np.stack([_load(p).astype(np.float32) for p in paths]).reshape(-1, 3)
    masks = np.stack(
        [
            np.zeros((128, 128), bool)
            if p.parent.name == "good"
            else _load(cat / "ground_truth" / p.parent.name / f"{p.stem}_mask.png") > 0
            for p in paths
        ]
    ).ravel()
    for channel in (images.mean(axis=1), images[:, 0], images[:, 1], images[:, 2]):
        assert _best_threshold_iou(channel, masks) < 0.3
    # Defect sizes span small to medium.
    areas = [
        int((_load(p) > 0).sum())
        for d in DEFECT_TYPES[kind]
        for p in (cat / "ground_truth" / d).glob("*.png")
    ]
    assert min(areas) < 60 and max(areas) > 250


def test_render_sample_rejects_unknown_defect() -> None:
    with pytest.raises(ValueError, match="unknown defect"):
        render_sample("object", "hole", seed=0, index=0)
    image, mask = render_sample("texture", "good", seed=0, index=0, image_size=32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and not mask.any()


_GENERATE = """
import sys, time
from pathlib import Path
from mvtec_seg.data.synthetic import generate_category
while time.time() < float(sys.argv[2]):
    time.sleep(0.005)
generate_category(Path(sys.argv[1]), kind="object", seed=0, image_size=64, n_train=20, n_test_good=4,
                  n_test_per_defect=6)
"""


def test_parallel_generation_builds_one_complete_tree(tmp_path: Path) -> None:
    start = time.time() + 1.5  # both processes start generating at the same moment
    procs = [
        subprocess.Popen([sys.executable, "-c", _GENERATE, str(tmp_path), str(start)], stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    cat = tmp_path / "synthetic"
    files = _files(cat)
    assert len(files) == 20 + 4 + 2 * 4 * 6 + 1  # images, masks and synthetic.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic", "synthetic.lock"]
    assert files == _files(
        generate_category(
            tmp_path / "ref",
            kind="object",
            seed=0,
            image_size=64,
            n_train=20,
            n_test_good=4,
            n_test_per_defect=6,
        )
    )
