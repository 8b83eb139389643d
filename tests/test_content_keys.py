"""Cached artefacts are keyed by the bytes of the files they derive from: another root, an edited mask, a
replaced image or an added file never reuses stale arrays, teachers, maps or pseudo masks, and says why."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import _save, compose_cfg, make_fake_mvtec

from mvtec_seg.data.datamodule import MVTecDataModule
from mvtec_seg.errors import UserError
from mvtec_seg.pseudo.masks import teacher_pseudo_dir
from mvtec_seg.teacher import Teacher, maps_dir, teacher_dir


def _dm(cat: Path, cache: Path) -> MVTecDataModule:
    dm = MVTecDataModule(cat, cache, "widget", image_size=32, batch_size=4)
    dm.prepare()
    return dm


def _decoded_dirs(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "decoded" / "widget").iterdir() if p.is_dir())


def _rewrite_keeping_mtime(path: Path, array: np.ndarray) -> None:
    """Overwrite a file in place with new pixels and put its old mtime back (as `cp -p` or `rsync -t` do)."""
    st = path.stat()
    _save(path, array)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def two_roots(tmp_path):
    """Root A, and root B with the same file names and other pixels."""
    a = make_fake_mvtec(tmp_path / "A", name="widget", seed=0)
    b = make_fake_mvtec(tmp_path / "B", name="widget", seed=1)
    return a, b, tmp_path / "cache"


def test_same_names_under_another_root_are_read_again(two_roots, caplog):
    a, b, cache = two_roots
    dm_a = _dm(a, cache)
    with caplog.at_level(logging.WARNING, logger="mvtec_seg.data.files"):
        dm_b = _dm(b, cache)
    assert dm_b.manifest == dm_a.manifest  # the split depends on the names only
    assert not np.array_equal(np.asarray(dm_a.images), np.asarray(dm_b.images))  # B's own pixels
    assert len(_decoded_dirs(cache)) == 2
    lines = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
    assert len(lines) == 1 and "changed: " in lines[0] and f"now {b.resolve()}" in lines[0]
    # an identical copy under a third root reuses A's arrays: the key is the bytes, not the root
    c = shutil.copytree(a, a.parent.parent / "C" / "widget")
    assert np.array_equal(np.asarray(_dm(c, cache).images), np.asarray(dm_a.images))
    assert len(_decoded_dirs(cache)) == 2


def test_bad_files_under_another_root_are_found(two_roots):
    """The reported case: B has A's names, one mask of another size and a truncated PNG."""
    a, b, cache = two_roots
    _dm(a, cache)
    _save(b / "ground_truth" / "hole" / "001_mask.png", np.zeros((32, 48), np.uint8))
    with pytest.raises(UserError, match=r"001_mask.png is 48x32 but its image is 40x40"):
        _dm(b, cache)
    _save(b / "ground_truth" / "hole" / "001_mask.png", np.full((40, 40), 255, np.uint8))
    png = b / "test" / "good" / "002.png"
    png.write_bytes(png.read_bytes()[:100])
    with pytest.raises(UserError, match=r"cannot read image .*002.png"):
        _dm(b, cache)


def test_mask_edited_in_place_rebuilds_and_names_it(tmp_path, caplog):
    cat, cache = make_fake_mvtec(tmp_path / "data", name="widget"), tmp_path / "cache"
    dm = _dm(cat, cache)
    cfg = compose_cfg(tmp_path, ["mask=pseudo"])
    teacher = Teacher(module=None, info={}, dir=teacher_dir(cfg, dm))
    before = (teacher.dir, maps_dir(dm, teacher), teacher_pseudo_dir(cfg, dm, teacher))
    edited = np.zeros((40, 40), np.uint8)
    edited[0:5, 0:5] = 255  # another defect region; same file size is possible, same mtime is forced
    _rewrite_keeping_mtime(cat / "ground_truth" / "scratch" / "002_mask.png", edited)
    with caplog.at_level(logging.WARNING, logger="mvtec_seg.data.files"):
        dm2 = _dm(cat, cache)
    row = next(
        i
        for i, r in enumerate(dm2.manifest["samples"])
        if r["gt_mask"] == "ground_truth/scratch/002_mask.png"
    )
    assert np.asarray(dm2.gt_masks[row])[:4, :4].all() and not np.asarray(dm.gt_masks[row])[:4, :4].any()
    assert any("changed: ground_truth/scratch/002_mask.png" in r.getMessage() for r in caplog.records)
    teacher2 = Teacher(module=None, info={}, dir=teacher_dir(cfg, dm2))
    # the teacher and its maps never see GT masks; the pseudo masks' recorded quality does
    assert teacher2.dir == before[0] and maps_dir(dm2, teacher2) == before[1]
    assert teacher_pseudo_dir(cfg, dm2, teacher2) != before[2]


def test_image_replaced_rebuilds_what_reads_it(tmp_path, caplog):
    cat, cache = make_fake_mvtec(tmp_path / "data", name="widget"), tmp_path / "cache"
    dm = _dm(cat, cache)
    cfg = compose_cfg(tmp_path, ["mask=pseudo"])
    t1 = Teacher(module=None, info={}, dir=teacher_dir(cfg, dm))
    m1 = maps_dir(dm, t1)
    train_normal = {dm.manifest["samples"][i]["image"] for i in dm.indices("train", known_normal=True)}
    test_image = next(r["image"] for r in dm.manifest["samples"] if r["part"] == "test")
    # a test image replaced by another file: the maps and arrays change, the teacher (train images) does not
    new = cat / "new.png"
    _save(new, np.full((40, 40, 3), 7, np.uint8))
    os.replace(new, cat / test_image)
    with caplog.at_level(logging.WARNING, logger="mvtec_seg.data.files"):
        dm2 = _dm(cat, cache)
    assert any(f"changed: {test_image}" in r.getMessage() for r in caplog.records)
    i = next(i for i, r in enumerate(dm2.manifest["samples"]) if r["image"] == test_image)
    assert (np.asarray(dm2.images[i]) == 7).all()
    t2 = Teacher(module=None, info={}, dir=teacher_dir(cfg, dm2))
    assert t2.dir == t1.dir and maps_dir(dm2, t2) != m1
    # a normal training image replaced: a new teacher
    _rewrite_keeping_mtime(cat / sorted(train_normal)[0], np.zeros((40, 40, 3), np.uint8))
    assert teacher_dir(cfg, _dm(cat, cache)) != t1.dir
    assert len(_decoded_dirs(cache)) == 3


def test_file_added_stops_the_split_and_names_it(tmp_path):
    cat, cache = make_fake_mvtec(tmp_path / "data", name="widget"), tmp_path / "cache"
    _dm(cat, cache)
    _save(cat / "test" / "good" / "099.png", np.zeros((40, 40, 3), np.uint8))
    _save(cat / "train" / "good" / "098.png", np.zeros((40, 40, 3), np.uint8))
    (cat / "test" / "good" / "000.png").unlink()
    with pytest.raises(UserError, match="different files") as err:
        _dm(cat, cache)
    msg = str(err.value)
    assert "added: test/good/099.png, train/good/098.png" in msg and "removed: test/good/000.png" in msg
    assert "\n" not in msg


def test_manifest_remembers_its_ratios(tmp_path):
    cat, cache = make_fake_mvtec(tmp_path / "data", name="widget"), tmp_path / "cache"
    _dm(cat, cache)
    dm = MVTecDataModule(cat, cache, "widget", image_size=32, split_ratios=(0.6, 0.2, 0.2))
    with pytest.raises(UserError, match=r"data.split_ratios=\[0.7, 0.1, 0.2\]"):
        dm.prepare()


def test_another_seed_gets_its_own_arrays(tmp_path):
    """The arrays are in manifest order, and the order depends on the seed: one cache per order."""
    cat, cache = make_fake_mvtec(tmp_path / "data", name="widget"), tmp_path / "cache"
    dm0 = _dm(cat, cache)
    dm1 = MVTecDataModule(cat, cache, "widget", seed=1, image_size=32)
    dm1.prepare()
    order0 = [r["image"] for r in dm0.manifest["samples"]]
    order1 = [r["image"] for r in dm1.manifest["samples"]]
    assert order0 != order1
    for i, name in enumerate(order1):
        assert np.array_equal(np.asarray(dm1.images[i]), np.asarray(dm0.images[order0.index(name)]))
