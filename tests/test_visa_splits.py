"""`data.visa_split`: VisA's 2cls split files behind `data.protocol=official` on a tiny fake VisA tree. Their
train rows hold anomalous images with masks: the train part keeps them (a seeded 1/8 per label goes to val),
the test part is the file's test rows, known normals stay the normal train rows, segmenters may train, and
the manifest is keyed by the file."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_cfg, make_fake_visa

from mvtec_seg import __main__ as cli
from mvtec_seg.builders import build_datamodule
from mvtec_seg.data.datamodule import MVTecDataModule
from mvtec_seg.data.sources import mask_source
from mvtec_seg.data.split import load_or_create_manifest, part_counts
from mvtec_seg.errors import UserError
from mvtec_seg.identity import data_digest
from mvtec_seg.plan import plan_lines
from mvtec_seg.preflight import check_config
from mvtec_seg.teacher import teacher_data
from mvtec_seg.train import train

N_NORMAL, N_ANOMALY, N_TEST_NORMAL = 24, 12, 6
TRAIN_NORMAL, TRAIN_ANOMALY = 16, 8  # the 2cls file's train rows: normals 0-15, anomalies 0-7


def _visa(tmp_path: Path) -> Path:
    """The fake tree with its 1cls.csv, and 2cls_highshot.csv placing anomalies 0-7 in train."""
    cat = make_fake_visa(
        tmp_path / "visa", n_normal=N_NORMAL, n_anomaly=N_ANOMALY, n_test_normal=N_TEST_NORMAL
    )
    write_2cls(cat, "2cls_highshot", TRAIN_NORMAL, TRAIN_ANOMALY)
    return cat


def write_2cls(cat: Path, split: str, n_train_normal: int, n_train_anomaly: int) -> Path:
    """`split_csv/<split>.csv` with the first images of each label in train, the rest in test."""
    rows = []
    for i in range(N_NORMAL):
        rel = f"{cat.name}/Data/Images/Normal/{i:04d}.JPG"
        rows.append([cat.name, "train" if i < n_train_normal else "test", "normal", rel, ""])
    for i in range(N_ANOMALY):
        rel, mask = (
            f"{cat.name}/Data/Images/Anomaly/{i:03d}.JPG",
            f"{cat.name}/Data/Masks/Anomaly/{i:03d}.png",
        )
        rows.append([cat.name, "train" if i < n_train_anomaly else "test", "anomaly", rel, mask])
    path = cat.parent / "split_csv" / f"{split}.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([["object", "split", "label", "image", "mask"], *rows])
    return path


def _csv_rows(path: Path, split: str) -> set[str]:
    """The images (relative to the category folder) of one split of a split file."""
    with open(path, newline="") as fh:
        return {r["image"].split("/", 1)[1] for r in csv.DictReader(fh) if r["split"] == split}


def _manifest(cat: Path, cache: Path, visa_split: str, seed: int = 0) -> tuple[Path, dict]:
    return load_or_create_manifest(
        cat, cache, cat.name, seed, protocol="official", layout="visa", visa_split=visa_split
    )


def _cfg(tmp_path: Path, cat: Path, *overrides: str):
    return compose_cfg(
        tmp_path,
        [
            "category=visa/candle",
            f"data.root={cat.parent}",
            "data.protocol=official",
            "debug=fast",
            "data.image_size=32",
            *overrides,
        ],
    )


def test_2cls_parts_are_the_files_rows_with_their_masks(tmp_path):
    cat = _visa(tmp_path)
    csv_path = cat.parent / "split_csv" / "2cls_highshot.csv"
    path, manifest = _manifest(cat, tmp_path / "cache", "2cls_highshot")
    parts = {p: [r for r in manifest["samples"] if r["part"] == p] for p in ("train", "val", "test")}
    # the test part is the file's test rows; train and val together are its train rows
    assert {r["image"] for r in parts["test"]} == _csv_rows(csv_path, "test")
    assert {r["image"] for r in parts["train"] + parts["val"]} == _csv_rows(csv_path, "train")
    anomalous = [r for r in parts["train"] if r["label"] == 1]
    assert len(anomalous) == TRAIN_ANOMALY - 1  # one of eight went to val
    assert all(r["gt_mask"] == f"Data/Masks/Anomaly/{Path(r['image']).stem}.png" for r in anomalous)
    # a seeded 1/8 of the train rows per label is the val part: 2 of 16 normals, 1 of 8 anomalies
    assert sorted(r["label"] for r in parts["val"]) == [0, 0, 1]
    assert part_counts(manifest) == {"train": 21, "val": 3, "test": 12}
    assert manifest["split_file"] == "split_csv/2cls_highshot.csv" and manifest["seed"] == 0
    _, again = _manifest(cat, tmp_path / "other_cache", "2cls_highshot")
    assert again["samples"] == manifest["samples"]  # deterministic in the files and the seed
    _, seed1 = _manifest(cat, tmp_path / "cache", "2cls_highshot", seed=1)
    assert {r["image"] for r in seed1["samples"] if r["part"] == "val"} != {r["image"] for r in parts["val"]}
    # the masks of the train part's anomalous images are decoded for training
    dm = MVTecDataModule(
        cat, tmp_path / "cache", cat.name, image_size=40, protocol="official", layout="visa",
        visa_split="2cls_highshot",
    )  # fmt: skip
    train_idx = dm.indices("train")
    defective = [i for i in train_idx if dm.manifest["samples"][i]["label"] == 1]
    assert len(defective) == TRAIN_ANOMALY - 1
    assert all(np.asarray(dm.gt_masks[i]).sum() == 100 for i in defective)  # the fake's 10x10 square


def test_known_normals_are_the_normal_train_rows(tmp_path):
    cat = _visa(tmp_path)
    dm = MVTecDataModule(
        cat, tmp_path / "cache", cat.name, image_size=40, protocol="official", layout="visa",
        visa_split="2cls_highshot", train_subset="known_normal",
    )  # fmt: skip
    rows = dm.prepare()["samples"]
    known = dm.known_normals()
    assert int(known.sum()) == TRAIN_NORMAL  # train and val normals: no anomalous train row, no test row
    assert all(rows[i]["label"] == 0 and rows[i]["source"] == "train" for i in np.flatnonzero(known))
    assert any(r["label"] == 1 and r["source"] == "train" for r in rows)  # they are there, and not known
    pseudo = mask_source({"mask.name": "pseudo"}).known_normals({"mask.name": "pseudo"}, rows)
    assert np.array_equal(pseudo, known)  # mask=pseudo's strict rule reads the same
    # the teacher trains on the train part's known normals only
    taught = dm.indices("train", known_normal=True)
    assert len(dm.train_dataloader().dataset) == len(taught) == TRAIN_NORMAL - 2
    assert not [p for p in teacher_data(dm)["files"] if "Anomaly" in p]


def test_segmenter_trains_under_2cls_and_is_refused_under_1cls(tmp_path):
    cat = _visa(tmp_path)
    cfg = _cfg(tmp_path, cat, "model=unet", "mask=gt", "data.visa_split=2cls_highshot")
    assert check_config(cfg)["data.visa_split"] == "2cls_highshot"
    dm = build_datamodule(cfg)
    lines = plan_lines(cfg, dm)
    assert "(train 21, val 3, test 12)" in lines[0] and any("segmenter: unet" in ln for ln in lines)
    assert build_datamodule(_cfg(tmp_path, cat, "model=deeplab", "data.visa_split=2cls_fewshot"))
    one_cls = _cfg(tmp_path, cat, "model=unet", "mask=gt")
    check_config(one_cls)  # the settings are fine: the data protocol refuses
    with pytest.raises(
        UserError, match="the train part holds normal images only.*no defective training"
    ) as err:
        build_datamodule(one_cls)
    assert "\n" not in str(err.value) and "data.visa_split=2cls_highshot or 2cls_fewshot" in str(err.value)


def test_manifest_is_keyed_by_the_split_file(tmp_path):
    cat = _visa(tmp_path)
    write_2cls(cat, "2cls_fewshot", TRAIN_NORMAL, TRAIN_ANOMALY)  # the same placement under another name
    cache = tmp_path / "cache"
    one_path, one = _manifest(cat, cache, "1cls")
    high_path, high = _manifest(cat, cache, "2cls_highshot")
    few_path, few = _manifest(cat, cache, "2cls_fewshot")
    assert one_path.name == "visa_official.json" and "split_file" not in one  # as before this setting
    assert high_path.name == "visa_official_2cls_highshot_seed0.json"
    assert len({one_path, high_path, few_path}) == 3
    assert len({one["fingerprint"], high["fingerprint"], few["fingerprint"]}) == 3
    record = {"files": {}}
    assert data_digest(record, one["samples"]) != data_digest(record, high["samples"])  # the run's identity
    # the file's content is part of the key: moving a row stops the run rather than re-splitting
    path = cat.parent / "split_csv" / "2cls_highshot.csv"
    path.write_text(path.read_text().replace("candle,train,anomaly", "candle,test,anomaly", 1))
    with pytest.raises(UserError, match="different files .*other defect types or official parts"):
        _manifest(cat, cache, "2cls_highshot")


def test_missing_2cls_file_is_one_line(tmp_path, capsys):
    cat = _visa(tmp_path)
    cfg = _cfg(tmp_path, cat, "model=transfusion", "data.visa_split=2cls_fewshot")
    with pytest.raises(SystemExit) as stop, cli.one_line_errors():
        train(cfg)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert stop.value.code == 2 and len(lines) == 1, lines
    missing = cat.parent / "split_csv" / "2cls_fewshot.csv"
    assert f"VisA split file {missing} not found — " in lines[0] and "data.visa_split=1cls" in lines[0]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.visa_split=3cls"], r"data.visa_split='3cls' must be one of \['1cls', '2cls_highshot', "),
        (["data.visa_split=2cls_highshot"], "data.layout=visa and data.protocol=split — use"),
        (
            ["category=bottle", "data.protocol=official", "data.visa_split=2cls_highshot"],
            "picks the VisA split file of data.protocol=official, but this run has data.layout=mvtec",
        ),
    ],
)
def test_visa_split_is_checked_before_anything_is_read(tmp_path, overrides, expected):
    cat = _visa(tmp_path)
    base = ["category=visa/candle", f"data.root={cat.parent}"]
    with pytest.raises(UserError, match=expected) as err:
        check_config(compose_cfg(tmp_path, [*base, *overrides]))
    assert "\n" not in str(err.value)


def test_pseudo_under_a_labelled_split_is_reported_with_image_labels() -> None:
    """Under a 2cls file every train row is labelled, so PSEUDO's unlabelled images are the defective ones:
    its protocol is `image labels`, whatever `mask.image_labels` says; under 1cls it stays strict."""
    from mvtec_seg.data.sources import SOURCES

    pseudo, gt = SOURCES["pseudo"], SOURCES["gt"]
    labelled = {"mask.name": "pseudo", "data.protocol": "official", "data.visa_split": "2cls_fewshot"}
    assert pseudo.protocol(labelled) == "image labels"
    assert pseudo.variant(labelled) == "PSEUDO + image labels"
    assert gt.variant(labelled | {"mask.name": "gt"}) == "GT"
    assert pseudo.protocol(labelled | {"data.visa_split": "1cls"}) == "known normals"
    assert pseudo.protocol(labelled | {"data.protocol": "split"}) == "known normals"
