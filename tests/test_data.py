"""The MVTec reader, the split manifest, the decoded cache and the DataModule, on tiny fake trees."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REAL_BOTTLE, _save, make_fake_mvtec
from PIL import Image

from mvtec_seg.data.cache import decoded_arrays
from mvtec_seg.data.datamodule import MVTecDataModule
from mvtec_seg.data.mvtec import MaskNotes, load_mask, load_rgb, scan_category
from mvtec_seg.data.split import allocate, load_or_create_manifest, make_split
from mvtec_seg.errors import UserError


def test_scan_counts_and_masks(fake_mvtec):
    samples = scan_category(fake_mvtec)
    assert len(samples) == 10 + 3 + 4 + 3
    defect = [s for s in samples if s.defect_type != "good"]
    assert all(s.gt_mask.endswith("_mask.png") and s.source == "test" for s in defect)
    assert {s.defect_type for s in samples} == {"good", "scratch", "hole"}
    assert sum(s.source == "train" for s in samples) == 10


@pytest.mark.parametrize("channels", ["gray", "rgba"])
def test_grayscale_and_rgba_become_rgb(tmp_path, channels):
    cat = make_fake_mvtec(tmp_path, channels=channels, size=(30, 50))
    img = load_rgb(cat / "train" / "good" / "000.png", 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    if channels == "gray":
        assert np.array_equal(img[..., 0], img[..., 1])


def test_mask_binarised_at_half_range_not_dilated(tmp_path):
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[10:30, 10:30] = 255
    _save(tmp_path / "m.png", mask)
    small = load_mask(tmp_path / "m.png", 50)
    assert set(np.unique(small)) <= {0, 1}
    # area is preserved (400 px at 100x100 -> 100 px at 50x50); thresholding at > 0 would give more
    assert abs(int(small.sum()) - 100) <= 10
    up = load_mask(tmp_path / "m.png", 256)
    assert abs(int(up.sum()) - 400 * (256 / 100) ** 2) / (400 * (256 / 100) ** 2) < 0.05


@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("no_root", "data folder not found"),
        ("no_train", "train/good"),
        ("missing_mask", "missing mask"),
        ("extra_mask", "has no test image"),
    ],
)
def test_bad_layouts_name_the_path(tmp_path, breakage, expected):
    cat = make_fake_mvtec(tmp_path)
    if breakage == "no_root":
        cat = tmp_path / "nope"
    elif breakage == "no_train":
        for p in (cat / "train" / "good").iterdir():
            p.unlink()
    elif breakage == "missing_mask":
        (cat / "ground_truth" / "hole" / "001_mask.png").unlink()
    elif breakage == "extra_mask":
        _save(cat / "ground_truth" / "hole" / "099_mask.png", np.zeros((40, 40), np.uint8))
    with pytest.raises(UserError, match=expected) as err:
        scan_category(cat)
    assert str(cat) in str(err.value) or str(tmp_path) in str(err.value)


def test_mask_size_mismatch_and_unreadable_image(tmp_path):
    cat = make_fake_mvtec(tmp_path)
    _save(cat / "ground_truth" / "hole" / "000_mask.png", np.zeros((20, 20), np.uint8))
    _, manifest = load_or_create_manifest(cat, tmp_path / "cache", "fake", 0)
    with pytest.raises(UserError, match="000_mask.png.*20x20.*40x40"):
        decoded_arrays(manifest, cat, tmp_path / "cache", 32)
    cat2 = make_fake_mvtec(tmp_path, name="fake2")
    (cat2 / "test" / "good" / "001.png").write_bytes(b"not a png")
    _, manifest2 = load_or_create_manifest(cat2, tmp_path / "cache", "fake2", 0)
    with pytest.raises(UserError, match="cannot read image .*001.png"):
        decoded_arrays(manifest2, cat2, tmp_path / "cache", 32)


def test_allocate_is_7_1_2_and_covers_small_strata():
    assert allocate(100, (0.7, 0.1, 0.2)) == (70, 10, 20)
    assert allocate(229, (0.7, 0.1, 0.2)) == (160, 23, 46)
    assert allocate(3, (0.7, 0.1, 0.2)) == (1, 1, 1)
    for n in range(0, 40):
        assert sum(allocate(n, (0.7, 0.1, 0.2))) == n


def test_split_stratified_reproducible_disjoint(tmp_path):
    cat = make_fake_mvtec(tmp_path, n_train=30, n_good=10, defects={"a": 20, "b": 11, "c": 5})
    samples = scan_category(cat)
    rows = make_split(samples, seed=3)
    assert rows == make_split(list(reversed(samples)), seed=3)  # order of discovery does not matter
    assert rows != make_split(samples, seed=4)
    images = [r["image"] for r in rows]
    assert len(images) == len(set(images)) == len(samples)
    for defect in ("good", "a", "b", "c"):
        parts = {r["part"] for r in rows if r["defect_type"] == defect}
        assert parts == {"train", "val", "test"}, defect
    n = {p: sum(r["part"] == p for r in rows) for p in ("train", "val", "test")}
    assert abs(n["train"] / len(rows) - 0.7) < 0.05 and abs(n["test"] / len(rows) - 0.2) < 0.05


def test_manifest_saved_once_and_guarded(tmp_path):
    cat = make_fake_mvtec(tmp_path)
    path, m1 = load_or_create_manifest(cat, tmp_path / "cache", "fake", 0)
    mtime = path.stat().st_mtime_ns
    path2, m2 = load_or_create_manifest(cat, tmp_path / "cache", "fake", 0)
    assert path2 == path and path.stat().st_mtime_ns == mtime and m1 == m2
    assert json.loads(path.read_text())["samples"][0].keys() >= {
        "image",
        "gt_mask",
        "defect_type",
        "part",
        "label",
    }
    _save(cat / "test" / "good" / "099.png", np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(UserError, match="different files"):
        load_or_create_manifest(cat, tmp_path / "cache", "fake", 0)


def test_datamodule_batches(tmp_path):
    cat = make_fake_mvtec(tmp_path, size=(30, 50))
    dm = MVTecDataModule(cat, tmp_path / "cache", "fake", image_size=32, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0
    assert batch["gt_mask"].shape == (4, 1, 32, 32)
    assert set(batch) >= {"image", "gt_mask", "target_mask", "gt_label", "defect_type", "path", "index"}
    test = [b for b in dm.test_dataloader()]
    labels = torch.cat([b["gt_label"] for b in test])
    masks = torch.cat([b["gt_mask"] for b in test])
    assert torch.equal(labels.bool(), masks.flatten(1).amax(1).bool())
    counts = dm.counts()
    assert counts["train"] + counts["val"] + counts["test"] == 20
    # the known-normal training subset (TransFusion, mask=synthetic_only): train/good only, never test/good
    dm2 = MVTecDataModule(cat, tmp_path / "cache", "fake", image_size=32, train_subset="known_normal")
    paths = [p for b in dm2.train_dataloader() for p in b["path"]]
    assert paths and all(p.startswith("train/good/") for p in paths)
    rows = dm2.manifest["samples"]
    normal = dm2.indices("train", normal_only=True)
    assert any(rows[i]["source"] == "test" for i in normal)  # test/good in the train part: not a known normal
    assert set(dm2.indices("train", known_normal=True)) == {i for i in normal if rows[i]["source"] == "train"}


def test_flip_augmentation_moves_mask_with_image(tmp_path):
    cat = make_fake_mvtec(tmp_path)
    dm = MVTecDataModule(cat, tmp_path / "cache", "fake", image_size=32)
    ds = dm.dataset("test", augment=True)
    plain = dm.dataset("test", augment=False)
    i = next(k for k in range(len(ds)) if plain[k]["gt_label"] == 1)
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        a, p = ds[i], plain[i]
        for dims in ([], [-1], [-2], [-1, -2]):
            ref_img = p["image"].flip(dims) if dims else p["image"]
            if torch.equal(a["image"], ref_img):
                ref_mask = p["gt_mask"].flip(dims) if dims else p["gt_mask"]
                assert torch.equal(a["gt_mask"], ref_mask)
                seen.add(tuple(dims))
    assert len(seen) >= 3


@pytest.mark.skipif(not REAL_BOTTLE.is_dir(), reason="real MVTec bottle data not present at ../shared/data")
def test_real_bottle_official_counts():
    samples = scan_category(REAL_BOTTLE)
    assert sum(s.source == "train" for s in samples) == 209
    assert sum(s.source == "test" for s in samples) == 83
    assert sum(s.gt_mask is not None for s in samples) == 63
    assert {s.defect_type for s in samples} == {"good", "broken_large", "broken_small", "contamination"}


# --- decoding by the type's range ---------------------------------------------------------------------------------


def test_16_bit_images_are_scaled_by_the_type_range(tmp_path):
    """A flat 16-bit image of v*257 decodes as its 8-bit twin of v, whatever the image's own maximum."""
    for v in (100, 3, 255):
        Image.fromarray(np.full((6, 6), v * 257, np.uint16)).save(tmp_path / f"g{v}.png")
        Image.fromarray(np.full((6, 6), v, np.uint8)).save(tmp_path / f"e{v}.png")
        assert np.array_equal(load_rgb(tmp_path / f"g{v}.png", None), load_rgb(tmp_path / f"e{v}.png", None))
    ramp = (np.arange(36, dtype=np.uint16).reshape(6, 6) * 1000).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert np.array_equal(load_rgb(tmp_path / "ramp.png", None)[..., 0], img_as_ubyte_rounded(ramp))


def img_as_ubyte_rounded(arr: np.ndarray) -> np.ndarray:
    """scikit-image's uint16 -> float conversion (x / 65535), then to 8 bits with rounding."""
    from skimage.util import img_as_float

    return np.rint(img_as_float(arr) * 255).astype(np.uint8)


@pytest.mark.parametrize(
    "levels, dtype, defect",
    [
        ((0, 1), np.uint8, True),  # a 0/1 label mask: binary, the 1s are defect
        ((0, 255), np.uint8, True),
        ((0, 65535), np.uint16, True),
        ((7, 200), np.uint8, True),  # two levels, whatever they are: the upper one is defect
    ],
)
def test_two_level_masks_are_binary_whatever_their_levels(tmp_path, levels, dtype, defect):
    mask = np.full((20, 20), levels[0], dtype)
    mask[5:10, 5:10] = levels[1]
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = load_mask(tmp_path / "m.png", 20)
    assert out[5:10, 5:10].all() == defect and out.sum() == 25


def test_noisy_mask_is_binarised_by_the_type_range_and_named(tmp_path):
    """Compression noise (values 0..3, no defect) stays normal; the file is named as changed."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 4, (20, 20), dtype=np.uint8)).save(tmp_path / "noise.png")
    notes = MaskNotes()
    assert load_mask(tmp_path / "noise.png", 20, notes=notes).sum() == 0
    assert notes.soft == [tmp_path / "noise.png"] and notes.changed[tmp_path / "noise.png"] > 250
    faint = np.zeros((20, 20), np.uint8)
    faint[0:4, 0:4], faint[10:12, 10:12] = 255, 120  # one real defect, a faint grey patch, a third level
    faint[19, 19] = 60
    Image.fromarray(faint).save(tmp_path / "few.png")
    notes = MaskNotes()
    assert load_mask(tmp_path / "few.png", 20, notes=notes).sum() == 16
    assert notes.soft == [tmp_path / "few.png"] and notes.changed == {}  # 5 px dropped: a few, not named
