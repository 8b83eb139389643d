"""`data.layout=visa|mvtec_ad2`: the readers on tiny trees in each layout, both protocols, the per-layout mask
rule, the content-keyed cache, the config groups, and the bad-input battery (one line naming the file and
the fix, exit code 2) that the MVTec reader already holds."""

from __future__ import annotations

import csv
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF_DIR, _save, compose_cfg, make_fake_mvtec_ad2, make_fake_visa

from mvtec_seg import __main__ as cli
from mvtec_seg.data.cache import decoded_dir
from mvtec_seg.data.datamodule import MVTecDataModule
from mvtec_seg.data.layouts import CATEGORIES, LAYOUTS, load_mask_nonzero, scan
from mvtec_seg.data.mvtec import load_mask
from mvtec_seg.data.mvtec_ad2 import private_test_images
from mvtec_seg.data.split import load_or_create_manifest, part_counts
from mvtec_seg.errors import UserError
from mvtec_seg.train import train


def _dm(cat: Path, cache: Path, layout: str, protocol: str = "split") -> MVTecDataModule:
    dm = MVTecDataModule(cat, cache, cat.name, image_size=40, protocol=protocol, layout=layout)
    dm.prepare()
    return dm


# --- readers and protocols ---------------------------------------------------------------------------------


def test_visa_scan_pairs_folders_masks_and_split_file(tmp_path):
    cat = make_fake_visa(tmp_path / "visa")
    make_fake_visa(tmp_path / "visa", name="pcb1", n_normal=5, n_anomaly=3, seed=1)  # another object's rows
    samples = scan(cat, "visa")
    assert len(samples) == 12 + 6
    assert {s.defect_type for s in samples} == {"good", "anomaly"}
    anomalous = [s for s in samples if s.label == 1]
    assert all(s.gt_mask == f"Data/Masks/Anomaly/{Path(s.image).stem}.png" for s in anomalous)
    assert all(s.image.startswith("Data/Images/") and not s.image.startswith("candle/") for s in samples)
    assert {s.source for s in anomalous} == {"test"} and sum(s.source == "train" for s in samples) == 9
    assert len(scan(cat.parent / "pcb1", "visa")) == 8


def test_visa_protocols(tmp_path):
    cat = make_fake_visa(tmp_path / "visa", n_normal=30, n_anomaly=20, n_test_normal=6)
    _, official = load_or_create_manifest(
        cat, tmp_path / "cache", "candle", 0, protocol="official", layout="visa"
    )
    by_image = {s.image: s.source for s in scan(cat, "visa")}
    assert all(r["part"] == by_image[r["image"]] for r in official["samples"])  # the CSV's split, as is
    assert part_counts(official) == {"train": 24, "val": 0, "test": 26} and official["layout"] == "visa"
    path, split = load_or_create_manifest(cat, tmp_path / "cache", "candle", 0, layout="visa")
    assert path.name == "visa_seed0.json"
    assert part_counts(split) == {"train": 35, "val": 5, "test": 10}  # every image pooled, 7:1:2
    for defect in ("good", "anomaly"):
        assert {r["part"] for r in split["samples"] if r["defect_type"] == defect} == {"train", "val", "test"}


def test_mvtec_ad2_protocols_and_private_images(tmp_path):
    cat = make_fake_mvtec_ad2(tmp_path / "ad2", n_train=20, n_val=6, n_good=5, n_bad=10)
    samples = scan(cat, "mvtec_ad2")
    assert {s.source for s in samples} == {"train", "validation", "test_public"}
    assert not any("private" in s.image for s in samples)  # predicted, never split or scored
    assert {s.gt_mask for s in samples if s.label} == {
        f"test_public/ground_truth/bad/{i:03d}_regular_mask.png" for i in range(10)
    }
    _, official = load_or_create_manifest(
        cat, tmp_path / "cache", "can", 0, protocol="official", layout="mvtec_ad2"
    )
    parts = {p: [r for r in official["samples"] if r["part"] == p] for p in ("train", "val", "test")}
    assert {r["image"].split("/")[0] for r in parts["train"]} == {"train"}
    assert {r["image"] for r in parts["val"]} == {f"validation/good/{i:03d}_regular.png" for i in range(6)}
    assert all(r["label"] == 0 for r in parts["val"]) and len(parts["test"]) == 15
    _, split = load_or_create_manifest(cat, tmp_path / "cache", "can", 0, layout="mvtec_ad2")
    assert sum(part_counts(split).values()) == 41
    val_sources = {r["source"] for r in split["samples"] if r["part"] == "val"}
    assert len(val_sources) > 1  # validation/good is pooled with the rest under the split protocol
    names = [name for _, name in private_test_images(cat)]
    assert names == [f"can/test_private/{i:03d}_regular" for i in range(3)] + [
        f"can/test_private_mixed/{i:03d}_mixed" for i in range(2)
    ]


def test_visa_masks_mark_any_nonzero_pixel(tmp_path, caplog):
    """VisA's rule, passed down per layout: 0/1 and multi-valued masks keep every region and their area;
    MVTec's half-range rule would drop a region of value 1 next to one of value 3."""
    mask = np.zeros((40, 40), np.uint8)
    mask[0:10, 0:10] = 1
    mask[20:40, 20:40] = 3
    _save(tmp_path / "m.png", mask)
    nonzero = load_mask_nonzero(tmp_path / "m.png", 20)
    assert nonzero[:5, :5].all() and nonzero[10:, 10:].all() and int(nonzero.sum()) == 25 + 100
    assert not load_mask(tmp_path / "m.png", 20)[:5, :5].any()  # the MVTec rule loses it
    cat = make_fake_visa(tmp_path / "visa", mask_value=1)
    _save(cat / "Data" / "Masks" / "Anomaly" / "000.png", mask)
    with caplog.at_level(logging.WARNING, logger="mvtec_seg.data.cache"):
        dm = _dm(cat, tmp_path / "cache", "visa")
    assert not [r for r in caplog.records if "not binary" in r.getMessage()]
    rows = dm.manifest["samples"]
    row = next(i for i, r in enumerate(rows) if r["gt_mask"] == "Data/Masks/Anomaly/000.png")
    assert np.asarray(dm.gt_masks[row])[:10, :10].all() and int(np.asarray(dm.gt_masks[row]).sum()) == 500
    other = next(i for i, r in enumerate(rows) if r["gt_mask"] == "Data/Masks/Anomaly/001.png")
    assert int(np.asarray(dm.gt_masks[other]).sum()) == 100  # a 0/1 mask's square
    plain = {k: v for k, v in dm.manifest.items() if k != "layout"}  # the rule is part of the cache key
    assert decoded_dir(dm.manifest, tmp_path, 40, dm.file_state) != decoded_dir(
        plain, tmp_path, 40, dm.file_state
    )


# --- content-keyed cache -----------------------------------------------------------------------------------

TREES: dict[str, tuple[Callable[..., Path], str]] = {
    "visa": (make_fake_visa, "Data/Masks/Anomaly/002.png"),
    "mvtec_ad2": (make_fake_mvtec_ad2, "test_public/ground_truth/bad/002_regular_mask.png"),
}


@pytest.mark.parametrize("layout", TREES)
def test_cache_follows_the_files_bytes(tmp_path, caplog, layout):
    make, mask_rel = TREES[layout]
    cat, cache = make(tmp_path / "A"), tmp_path / "cache"
    dm = _dm(cat, cache, layout)
    row = next(i for i, r in enumerate(dm.manifest["samples"]) if r["gt_mask"] == mask_rel)
    edited = np.zeros((40, 40), np.uint8)
    edited[0:5, 0:5] = 255
    st = (cat / mask_rel).stat()
    _save(cat / mask_rel, edited)
    os.utime(cat / mask_rel, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: only the bytes tell
    with caplog.at_level(logging.WARNING, logger="mvtec_seg.data.files"):
        dm2 = _dm(cat, cache, layout)
    assert np.asarray(dm2.gt_masks[row])[:5, :5].all() and not np.asarray(dm.gt_masks[row])[:5, :5].any()
    assert any(f"changed: {mask_rel}" in r.getMessage() for r in caplog.records)
    copy = shutil.copytree(cat.parent, tmp_path / "B")  # identical bytes under another root: reused
    assert np.array_equal(np.asarray(_dm(copy / cat.name, cache, layout).images), np.asarray(dm2.images))
    assert len([p for p in (cache / "decoded" / cat.name).iterdir() if p.is_dir()]) == 2


def test_visa_split_file_change_stops_the_official_manifest(tmp_path):
    cat = make_fake_visa(tmp_path / "visa")
    _dm(cat, tmp_path / "cache", "visa", protocol="official")
    split = cat.parent / "split_csv" / "1cls.csv"
    split.write_text(
        split.read_text().replace(
            "candle,train,normal,candle/Data/Images/Normal/0000.JPG",
            "candle,test,normal,candle/Data/Images/Normal/0000.JPG",
        )
    )
    with pytest.raises(UserError, match="different files .*other defect types or official parts"):
        _dm(cat, tmp_path / "cache", "visa", protocol="official")


# --- config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["visa", "mvtec_ad2"])
def test_category_groups_set_the_layout(tmp_path, layout):
    names = sorted(p.stem for p in (Path(CONF_DIR) / "category" / layout).glob("*.yaml"))
    assert names == sorted(CATEGORIES[layout]) and len(names) == (12 if layout == "visa" else 8)
    for name in names:
        cfg = compose_cfg(tmp_path, [f"category={layout}/{name}"])
        assert cfg.category.name == name and cfg.data.layout == layout and cfg.category.generate is None
        assert cfg.category.kind in ("object", "texture") and cfg.task_name == f"unet_gt_{name}"
        if layout == "visa":
            assert cfg.category.kind == "object"
    assert compose_cfg(tmp_path).data.layout == "mvtec" and set(LAYOUTS) == {"mvtec", "visa", "mvtec_ad2"}


def test_unknown_layout_is_one_line_before_anything_is_read(tmp_path):
    cfg = compose_cfg(tmp_path, ["data.layout=visaa", "debug=fast"])
    with pytest.raises(
        UserError, match=r"data.layout='visaa' is not one of \['mvtec', 'visa', 'mvtec_ad2'\] — "
    ):
        train(cfg)
    assert not (tmp_path / "cache").exists()


def test_generated_category_keeps_the_mvtec_layout(tmp_path):
    with pytest.raises(UserError, match="category=synthetic is generated in the MVTec AD layout"):
        train(compose_cfg(tmp_path, ["data.layout=visa", "debug=fast"]))


# --- bad input: one line naming the file and the fix -------------------------------------------------------


def _rewrite_csv(cat: Path, edit: Callable[[list[list[str]]], list[list[str]]]) -> Path:
    path = cat.parent / "split_csv" / "1cls.csv"
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(edit(rows))
    return path


def _unlink_all(folder: Path) -> None:
    for p in folder.iterdir():
        p.unlink()


VISA_CASES: dict[str, tuple[Callable[[Path], object], str]] = {
    "no_normal_folder": (
        lambda c: shutil.rmtree(c / "Data/Images/Normal"),
        "Normal is missing or has no images",
    ),
    "empty_normal_folder": (
        lambda c: _unlink_all(c / "Data/Images/Normal"),
        "Normal is missing or has no images",
    ),
    "no_anomaly_folder": (lambda c: shutil.rmtree(c / "Data/Images/Anomaly"), "Anomaly is missing or has no"),
    "no_mask_folder": (lambda c: shutil.rmtree(c / "Data/Masks"), "has no mask folder"),
    "mask_missing": (lambda c: (c / "Data/Masks/Anomaly/001.png").unlink(), "missing mask"),
    "mask_extra": (
        lambda c: _save(c / "Data/Masks/Anomaly/099.png", np.zeros((40, 40), np.uint8)),
        "099.png has no anomaly image",
    ),
    "mask_other_size": (
        lambda c: _save(c / "Data/Masks/Anomaly/002.png", np.zeros((20, 30), np.uint8)),
        "002.png is 30x20 but its image is 40x40",
    ),
    "split_file_missing": (lambda c: (c.parent / "split_csv/1cls.csv").unlink(), "VisA split file"),
    "row_names_a_missing_file": (
        lambda c: (c / "Data/Images/Normal/0001.JPG").unlink(),
        "0001.JPG, which does not exist",
    ),
    "image_not_in_split_file": (
        lambda c: _save(c / "Data/Images/Normal/0099.JPG", np.zeros((40, 40, 3), np.uint8)),
        "0099.JPG is not listed in VisA split file",
    ),
    "split_file_without_a_column": (
        lambda c: _rewrite_csv(c, lambda rows: [r[:1] + r[2:] for r in rows]),
        "has no column split",
    ),
    "split_file_with_an_unknown_split": (
        lambda c: _rewrite_csv(c, lambda rows: [rows[0], ["candle", "training", *rows[1][2:]], *rows[2:]]),
        "split must be one of",
    ),
    "unreadable_image": (
        lambda c: (c / "Data/Images/Normal/0003.JPG").write_bytes(b"not a jpeg"),
        "cannot read image",
    ),
    "empty_image_file": (
        lambda c: (c / "Data/Images/Anomaly/000.JPG").write_bytes(b""),
        "000.JPG is an empty file (0 bytes)",
    ),
    "symlink_loop": (
        lambda c: os.symlink("loop.JPG", c / "Data/Images/Normal/loop.JPG"),
        "loop.JPG is a symlink that leads nowhere",
    ),
}
AD2_CASES: dict[str, tuple[Callable[[Path], object], str]] = {
    "empty_train_good": (lambda c: _unlink_all(c / "train/good"), "train/good is missing or has no images"),
    "empty_validation_good": (
        lambda c: _unlink_all(c / "validation/good"),
        "validation/good is missing or has no images",
    ),
    "no_test_public": (lambda c: shutil.rmtree(c / "test_public"), "test_public is missing"),
    "no_ground_truth_folder": (
        lambda c: shutil.rmtree(c / "test_public/ground_truth"),
        "test_public/bad has no ground-truth folder",
    ),
    "mask_missing": (
        lambda c: (c / "test_public/ground_truth/bad/001_regular_mask.png").unlink(),
        "missing mask",
    ),
    "mask_extra": (
        lambda c: _save(
            c / "test_public/ground_truth/bad/099_regular_mask.png", np.zeros((40, 40), np.uint8)
        ),
        "has no test image",
    ),
    "mask_other_size": (
        lambda c: _save(
            c / "test_public/ground_truth/bad/002_regular_mask.png", np.zeros((20, 30), np.uint8)
        ),
        "is 30x20 but its image is 40x40",
    ),
    "unreadable_image": (
        lambda c: (c / "validation/good/001_regular.png").write_bytes(b"not a png"),
        "cannot read image",
    ),
    "empty_image_file": (
        lambda c: (c / "test_public/good/000_regular.png").write_bytes(b""),
        "is an empty file (0 bytes)",
    ),
}
CASES = [("visa", name) for name in VISA_CASES] + [("mvtec_ad2", name) for name in AD2_CASES]


def _layout_cfg(tmp_path: Path, layout: str, root: Path):
    name = "candle" if layout == "visa" else "can"
    return compose_cfg(
        tmp_path, [f"category={layout}/{name}", f"data.root={root}", "debug=fast", "data.image_size=32"]
    )


@pytest.mark.parametrize(("layout", "case"), CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_broken_tree_is_one_line_naming_the_file(tmp_path, capsys, layout, case):
    cat = (make_fake_visa if layout == "visa" else make_fake_mvtec_ad2)(tmp_path / "data")
    breakage, expected = (VISA_CASES if layout == "visa" else AD2_CASES)[case]
    breakage(cat)
    cfg = _layout_cfg(tmp_path, layout, cat.parent)
    with pytest.raises(SystemExit) as stop, cli.one_line_errors():  # what the CLI prints, and its exit code
        train(cfg)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert stop.value.code == 2 and len(lines) == 1, lines
    assert expected in lines[0] and " — " in lines[0] and str(cat.parent) in lines[0], lines[0]
    assert not list(Path(cfg.paths.run_dir).rglob("*.ckpt"))


@pytest.mark.parametrize("layout", ["visa", "mvtec_ad2"])
def test_missing_category_folder(tmp_path, layout):
    cfg = _layout_cfg(tmp_path, layout, tmp_path / "nowhere")
    with pytest.raises(UserError, match=f"category folder not found: {tmp_path / 'nowhere'}") as err:
        train(cfg)
    assert "\n" not in str(err.value) and "set data.root" in str(err.value)
