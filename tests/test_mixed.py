"""Mixed supervision (`mask=mixed`) and the GT-only baseline (`mask=gt mask.gt_images=k`): one seeded,
stratified, nested choice of labelled images for both; mixed trains on GT there and on the pseudo chain's
targets elsewhere; GT-only leaves the other defective images out; `summary.json` names the labelled images."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import PSEUDO_FAST, compose_cfg, with_teacher

from mvtec_seg.data.sources import (
    SOURCES,
    defective_train_rows,
    labelled_count,
    labelled_rows,
    labelling_order,
    mask_source,
)
from mvtec_seg.errors import UserError
from mvtec_seg.summary import RunSummary


def _rows() -> list[dict]:
    """Train part: 4 train/good, 2 test/good, defects scratch x5, hole x3, crack x1; val part: 1 of each kind."""
    rows = [
        {
            "part": "train",
            "label": 0,
            "source": "train",
            "defect_type": "good",
            "image": f"train/good/{i}.png",
        }
        for i in range(4)
    ]
    rows += [
        {"part": "train", "label": 0, "source": "test", "defect_type": "good", "image": f"test/good/{i}.png"}
        for i in range(2)
    ]
    for name, n in (("scratch", 5), ("hole", 3), ("crack", 1)):
        rows += [
            {
                "part": "train",
                "label": 1,
                "source": "test",
                "defect_type": name,
                "image": f"test/{name}/{i}.png",
            }
            for i in range(n)
        ]
    rows += [
        {"part": "val", "label": 1, "source": "test", "defect_type": "hole", "image": "test/hole/9.png"},
        {"part": "val", "label": 0, "source": "train", "defect_type": "good", "image": "train/good/9.png"},
    ]
    return rows  # fmt: skip


def _images(rows: list[dict], idx) -> list[str]:
    return [rows[int(i)]["image"] for i in idx]


def test_the_choice_is_stratified_seeded_and_nested() -> None:
    rows = _rows()
    order = labelling_order(rows, seed=0)
    assert sorted(order) == list(np.flatnonzero(defective_train_rows(rows)))  # every defective train image
    assert {rows[i]["defect_type"] for i in order[:3]} == {"scratch", "hole", "crack"}  # one of each first
    assert {rows[i]["defect_type"] for i in order[3:5]} == {"scratch", "hole"}  # then round-robin
    for k in range(len(order)):  # nested: a larger budget keeps every image of a smaller one
        assert list(labelled_rows(rows, k + 1, 0)[:k]) == list(labelled_rows(rows, k, 0))
    assert [_images(rows, labelling_order(rows, s)) for s in range(4)].count(_images(rows, order)) == 1
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)  # the choice depends on the images and the seed, not the row order
    assert _images(shuffled, labelling_order(shuffled, 0)) == _images(rows, order)


def test_the_budget_counts_fractions_and_refuses_more_than_there_are() -> None:
    assert labelled_count(None, 9) == 9 and labelled_count(0, 9) == 0 and labelled_count(3, 9) == 3
    assert labelled_count(0.5, 9) == 5 and labelled_count(0.25, 9) == 2  # rounded half up
    with pytest.raises(UserError, match=r"mask.gt_images=10 .* 9 defective images .* at most 9"):
        labelled_rows(_rows(), 10, 0)


def test_mixed_and_gt_only_label_the_same_images_and_differ_in_the_rest() -> None:
    rows = _rows()
    mixed = {"mask.name": "mixed", "mask.gt_images": 4, "seed": 3}
    gt = {"mask.name": "gt", "mask.gt_images": 4, "seed": 3}
    labelled = mask_source(mixed).labelled(mixed, rows)
    assert list(labelled) == list(mask_source(gt).labelled(gt, rows)) and len(labelled) == 4
    assert list(mask_source(mixed).gt_targets(mixed, rows)) == list(labelled)
    assert mask_source(mixed).left_out(mixed, rows) is None  # mixed trains on every train-part image
    left = mask_source(gt).left_out(gt, rows)
    assert set(np.flatnonzero(left)) == set(np.flatnonzero(defective_train_rows(rows))) - set(labelled)
    assert not left[[r["label"] == 0 for r in rows]].any()  # normal images (test/good included) stay
    everything = {"mask.name": "gt", "mask.gt_images": None, "seed": 3}  # the default: every mask, no budget
    assert (
        SOURCES["gt"].labelled(everything, rows) is None and SOURCES["gt"].left_out(everything, rows) is None
    )
    mixed_all = {"mask.name": "mixed", "mask.gt_images": None, "seed": 3}
    assert sorted(SOURCES["mixed"].labelled(mixed_all, rows)) == list(
        np.flatnonzero(defective_train_rows(rows))
    )
    assert SOURCES["pseudo"].labelled({"mask.name": "pseudo"}, rows) is None
    assert mask_source(mixed).variant(mixed) == "MIXED (gt_images=4)"
    assert mask_source(mixed).known_normals(mixed, rows).sum() == 5  # the strict protocol: train/good only


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mask=mixed", "mask.gt_images=-1"], r"mask.gt_images=-1 must be null .* mask.gt_images=5"),
        (["mask=mixed", "mask.gt_images=1.5"], r"mask.gt_images=1.5 must be null"),
        (["mask=gt", "mask.gt_images=0.0"], r"mask.gt_images=0.0 must be null"),
        (["mask=mixed", "mask.gt_images=all"], r"mask.gt_images='all' must be null"),
        (["mask=mixed"], r"mask.gt_images is not set"),
    ],
)
def test_a_bad_budget_is_one_line(tmp_path: Path, overrides: list[str], message: str) -> None:
    from mvtec_seg.preflight import check_config

    with pytest.raises(UserError, match=message):
        check_config(compose_cfg(tmp_path, overrides))


def test_good_budgets_pass_the_settings_check(tmp_path: Path) -> None:
    from mvtec_seg.preflight import check_config

    for overrides in (["mask=mixed", "mask.gt_images=0.25"], ["mask=mixed", "mask.gt_images=null"],
                      ["mask=gt", "mask.gt_images=3"], ["mask=mixed", "mask.gt_images=2", "mask.rounds=1"]):  # fmt: skip
        settings = check_config(compose_cfg(tmp_path, overrides))
        assert settings["mask.name"] == overrides[0].split("=")[1]


def _targets(tmp_path: Path, mask: list[str]):
    """The datamodule of a PSEUDO_FAST run with `mask` overrides, its targets set as the run sets them."""
    from mvtec_seg.builders import build_datamodule
    from mvtec_seg.train import _set_pseudo_targets

    cfg = compose_cfg(tmp_path, [*PSEUDO_FAST, *mask])
    dm = build_datamodule(cfg)
    dm.prepare()
    dm.set_known_normals(mask_source(cfg).known_normals(cfg, dm.manifest["samples"]))
    _set_pseudo_targets(cfg, dm)
    return cfg, dm


@pytest.mark.slow
def test_mixed_targets_are_gt_on_the_labelled_images_and_pseudo_elsewhere(
    teacher_cache: Path, tmp_path: Path
) -> None:
    tmp = with_teacher(teacher_cache, tmp_path)
    _, pseudo = _targets(tmp, [])
    cfg, mixed = _targets(tmp, ["mask=mixed", "mask.gt_images=3"])
    _, zero = _targets(tmp, ["mask=mixed", "mask.gt_images=0"])
    labelled = mask_source(cfg).labelled(cfg, mixed.manifest["samples"])
    assert len(labelled) == 3 and all(mixed.manifest["samples"][i]["label"] == 1 for i in labelled)
    gt = np.asarray(mixed.gt_masks)
    assert np.array_equal(mixed.target_masks[labelled], gt[labelled].astype(mixed.target_masks.dtype))
    assert not np.array_equal(pseudo.target_masks[labelled], gt[labelled])  # the pseudo masks were not GT
    rest = np.setdiff1d(np.arange(len(gt)), labelled)
    assert np.array_equal(mixed.target_masks[rest], pseudo.target_masks[rest])
    assert np.array_equal(zero.target_masks, pseudo.target_masks)  # k=0 is PSEUDO
    # nothing left out: PSEUDO's training images and the labelled ones (PSEUDO leaves out what its gate missed)
    trained = set(pseudo.dataset("train").indices.tolist()) | set(labelled.tolist())
    assert set(mixed.dataset("train").indices.tolist()) == trained


def test_gt_only_leaves_the_unlabelled_defective_images_out(tmp_path: Path) -> None:
    from mvtec_seg.builders import build_datamodule

    cfg = compose_cfg(tmp_path, ["debug=fast", "mask.gt_images=2"])
    dm = build_datamodule(cfg)
    rows = dm.prepare()["samples"]
    everything = len(dm.dataset("train"))
    dm.set_left_out(mask_source(cfg).left_out(cfg, rows))
    kept = set(dm.dataset("train").indices.tolist())
    train = set(dm.indices("train").tolist())
    defective = set(np.flatnonzero(defective_train_rows(rows)).tolist())
    assert len(defective) > 2 and len(kept) == everything - len(defective) + 2
    assert kept & defective == set(mask_source(cfg).labelled(cfg, rows).tolist())
    assert train - defective <= kept  # every normal train-part image stays
    assert len(dm.dataset("val")) == len(dm.indices("val"))  # only training leaves images out


def _dry_run(tmp_path: Path, overrides: list[str]) -> dict:
    from mvtec_seg.train import train

    cfg = compose_cfg(tmp_path, ["debug=fast", "dry_run=true", "data.image_size=32", *overrides])
    train(cfg)
    return json.loads((Path(cfg.paths.run_dir) / "summary.json").read_text())


@pytest.mark.slow
def test_summary_names_the_same_labelled_images_for_one_seed_and_budget(tmp_path: Path) -> None:
    mixed = _dry_run(tmp_path / "a", ["mask=mixed", "mask.gt_images=4"])
    gt = _dry_run(tmp_path / "b", ["mask=gt", "mask.gt_images=4"])
    other_seed = _dry_run(tmp_path / "c", ["mask=gt", "mask.gt_images=4", "seed=1"])
    more = _dry_run(tmp_path / "d", ["mask=gt", "mask.gt_images=6"])
    assert mixed["n_labelled"] == 4 and len(mixed["labelled_images"]) == 4
    assert mixed["labelled_images"] == gt["labelled_images"]
    assert RunSummary.from_dict(mixed).labelled_images == mixed["labelled_images"]  # read back whole
    assert all(p.startswith("test/") and "good" not in p for p in gt["labelled_images"])
    assert other_seed["labelled_images"] != gt["labelled_images"]
    assert more["labelled_images"][:4] == gt["labelled_images"]
    assert mixed["mask_variant"] == "MIXED (gt_images=4)" and gt["mask_variant"] == "GT (gt_images=4)"
    assert _dry_run(tmp_path / "e", ["mask=gt"])["labelled_images"] is None  # no budget: nothing to name


def test_a_budget_beyond_the_split_stops_the_run_with_one_line(tmp_path: Path) -> None:
    from mvtec_seg.train import train

    cfg = compose_cfg(tmp_path, ["debug=fast", "dry_run=true", "data.image_size=32", "mask.gt_images=10000"])
    with pytest.raises(UserError, match=r"mask.gt_images=10000 asks for more GT masks"):
        train(cfg)
    summary = json.loads((Path(cfg.paths.run_dir) / "summary.json").read_text())
    assert summary["status"] == "failed" and "at most" in summary["error"]
