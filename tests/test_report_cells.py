"""The report keeps runs apart by every setting that differs between them: a cell is (model, mask, the
settings that vary between that model and mask's runs in a category); only runs that differ in nothing
but the seed are averaged, and a rerun of the very same settings and seed replaces the earlier one.
Run folders are fabricated (summary.json + config.yaml), so the tests take a second."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from mvtec_seg import report
from mvtec_seg.errors import UserError
from mvtec_seg.report.aggregate import aggregate
from mvtec_seg.report.collect import collect_runs
from mvtec_seg.report.tables import csv_columns, csv_rows

BASE: dict[str, Any] = {
    "seed": 0,
    "category": {"name": "alpha", "kind": "object", "generate": None},
    "model": {"name": "unet", "source": "fit", "max_epochs": 30, "params": {"optimizer": {"lr": 0.0001}}},
    "mask": {"name": "gt"},
    "data": {"root": "/data", "image_size": 256},
    "paths": {"run_dir": "/somewhere"},
    "trainer": {"enable_progress_bar": True},
}


def _settings(**changes: Any) -> dict[str, Any]:
    """BASE with dotted-key changes (`model.params.optimizer.lr=1e-3` as {'model.params.optimizer.lr': ...})."""
    cfg = copy.deepcopy(BASE)
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def _run(root: Path, name: str, cfg: dict[str, Any], aupro: float, data: str = "d0") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    summary = {
        "category": cfg["category"]["name"],
        "model": cfg["model"]["name"],
        "mask": cfg["mask"]["name"],
        "seed": cfg["seed"],
        "status": "ok",
        "metrics": {"test/pixel_AUPRO": aupro, "test/IoU": None},
        "identity": {"config": "c", "data": data},
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    time.sleep(0.01)  # distinct mtimes: "later" is well defined
    return folder


def _table(root: Path):
    coll = collect_runs(root)
    t = aggregate(coll.runs)
    rows = {r["category"]: r for r in csv_rows(t)}
    return coll, t, csv_columns(t), rows


def test_runs_differing_in_one_setting_are_two_cells(tmp_path: Path) -> None:
    _run(tmp_path, "a", _settings(), 0.5)
    _run(tmp_path, "b", _settings(model__params__optimizer__lr=0.001), 0.7)
    coll, t, columns, rows = _table(tmp_path)
    assert coll.skipped_status == {}  # nothing left out as "superseded"
    assert [c[2] for c in t.cells] == [
        (("model.params.optimizer.lr", "0.0001"),),
        (("model.params.optimizer.lr", "0.001"),),
    ]
    assert rows["alpha"]["unet/gt[model.params.optimizer.lr=0.001]/pixel_AUPRO.mean"] == 0.7
    assert rows["alpha"]["unet/gt[model.params.optimizer.lr=0.0001]/pixel_AUPRO.mean"] == 0.5
    assert "unet/gt/pixel_AUPRO.mean" not in columns


def test_only_seeds_are_aggregated_and_a_rerun_replaces(tmp_path: Path) -> None:
    _run(tmp_path, "s0", _settings(), 0.4)
    _run(
        tmp_path,
        "s1",
        _settings(seed=1, paths__run_dir="/elsewhere", trainer__enable_progress_bar=False),
        0.6,
    )
    _run(tmp_path, "s1_again", _settings(seed=1), 0.8)  # the same settings and seed: replaces s1
    coll, t, _, rows = _table(tmp_path)
    assert t.cells == [("unet", "gt", ())]  # output-only settings set nothing apart
    assert coll.skipped_status == {"superseded": 1}
    stat = t.get("alpha", t.cells[0], "pixel_AUPRO")
    assert stat.n == 2 and stat.mean == pytest.approx((0.4 + 0.8) / 2)
    assert rows["alpha"]["unet/gt/IoU.n"] == 0  # null stays undefined, never 0


def test_settings_that_only_differ_between_categories_set_nothing_apart(tmp_path: Path) -> None:
    _run(tmp_path, "a", _settings(), 0.5)
    _run(tmp_path, "b", _settings(category__name="beta", data__image_size=128), 0.6, data="d1")
    _, t, _, _ = _table(tmp_path)
    assert t.cells == [("unet", "gt", ())] and t.categories == ["alpha", "beta"]


def test_other_data_is_another_cell(tmp_path: Path) -> None:
    _run(tmp_path, "a", _settings(), 0.5, data="d0")
    _run(tmp_path, "b", _settings(), 0.6, data="d1")  # same settings, other files' bytes
    _, t, _, _ = _table(tmp_path)
    assert [c[2] for c in t.cells] == [(("data", "d0"),), (("data", "d1"),)]


def test_pseudo_mask_rules_are_cells_and_gaps_pair_by_agreeing_settings(tmp_path: Path) -> None:
    _run(tmp_path, "gt", _settings(), 0.8)
    for rounds, aupro in ((1, 0.6), (2, 0.7)):
        _run(tmp_path, f"ps{rounds}", _settings(mask={"name": "pseudo", "rounds": rounds}), aupro)
    coll, t, _, rows = _table(tmp_path)
    assert t.cells == [
        ("unet", "gt", ()),
        ("unet", "pseudo", (("mask.rounds", "1"),)),
        ("unet", "pseudo", (("mask.rounds", "2"),)),
    ]
    assert t.gap_models == ["unet[mask.rounds=1]", "unet[mask.rounds=2]"]
    assert rows["alpha"]["gap/unet[mask.rounds=1]/pixel_AUPRO"] == pytest.approx(0.6 - 0.8)
    assert rows["alpha"]["gap/unet[mask.rounds=2]/pixel_AUPRO"] == pytest.approx(0.7 - 0.8)
    md = report.build_report(tmp_path)["report_md"].read_text()
    assert "unet / pseudo [mask.rounds=2]" in md and "Cells are kept apart by every setting" in md
    assert "`mask.rounds`" in md


def test_report_output_that_cannot_be_a_folder_is_one_line(tmp_path: Path) -> None:
    _run(tmp_path / "runs", "a", _settings(), 0.5)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="a_file is a file, not a folder"):
        report.build_report(tmp_path / "runs", tmp_path / "a_file")
