"""The benchmark runner: each suite's tiny grid runs in a temporary folder and writes its CSV and RESULTS.md;
quality rows are pinned and found again by their resolved config. Timing is measured by the suites, never
asserted here."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from benchmarks import quality
from benchmarks.__main__ import main
from benchmarks.quality_section import _rank_correlation
from benchmarks.runner import CONTEXT_COLUMNS, load_suite, read_csv, write_rows
from mvtec_seg.errors import UserError


def _args(tmp_path: Path) -> list[str]:
    return [
        "tiny=true",
        f"out={tmp_path / 'res'}",
        f"runs={tmp_path / 'runs'}",
        f"cache={tmp_path / 'cache'}",
    ]


@pytest.mark.slow
def test_quality_tiny_grid_writes_rows_and_reuses_them_by_resolved_config(tmp_path: Path) -> None:
    args = [
        *_args(tmp_path),
        "select.categories=[synthetic]",
        "select.seeds=[0]",
        "select.rows=[transfusion,unet_hga]",
    ]
    assert main(["quality", *args]) == 0
    rows = read_csv(tmp_path / "res" / "quality.csv")
    assert [(r["row"], r["status"]) for r in rows] == [("transfusion", "ok"), ("unet_hga", "ok")]
    for r in rows:
        assert all(r[c] for c in CONTEXT_COLUMNS)
        assert 0.0 <= float(r["pixel_AUPRO"]) <= 1.0
        assert Path(r["run_dir"]).name == r["config_digest"]
    pseudo = rows[1]
    # the entry's value, not the default's
    assert OmegaConf.create(pseudo["mask_settings"]).synthetic_fraction == 0.0
    assert math.isfinite(float(pseudo["mask_precision"])) or pseudo["mask_precision"] == ""
    results = (tmp_path / "RESULTS.md").read_text()
    assert "U-Net PSEUDO hysteresis + gate + area" in results and "Resolved mask settings" in results
    # the same grid again: every case found by its digest, nothing retrained
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/summary.json")}
    assert main(["quality", *args]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/summary.json")} == before


def test_a_changed_setting_makes_another_case(tmp_path: Path) -> None:
    cfg = load_suite("quality", ["tiny=true"])
    a = quality.resolved(cfg, "synthetic", "unet_hga", 0, tmp_path)
    cfg.base = [*cfg.base, "model.params.optimizer.lr=0.01"]
    b = quality.resolved(cfg, "synthetic", "unet_hga", 0, tmp_path)
    assert quality.digest(a) != quality.digest(b)
    assert quality.digest(a) == quality.digest(
        quality.resolved(load_suite("quality", ["tiny=true"]), "synthetic", "unet_hga", 0, tmp_path)
    )


def test_a_row_that_does_not_pin_every_mask_setting_is_refused(tmp_path: Path) -> None:
    cfg = load_suite("quality", ["tiny=true"])
    del cfg.masks.hysteresis_gate_area.gate
    with pytest.raises(
        UserError, match=r"does not pin its mask: missing \['gate.quantile', 'gate.strategy'\]"
    ):
        quality.resolved(cfg, "synthetic", "unet_hga", 0, tmp_path)
    cfg = load_suite("quality", ["tiny=true"])
    cfg.masks.hysteresis_gate_area.gates = {"quantile": 0.9}
    with pytest.raises(UserError, match=r"unknown \['gates.quantile'\]"):
        quality.resolved(cfg, "synthetic", "unet_hga", 0, tmp_path)


def test_every_shipped_quality_row_pins_its_mask(tmp_path: Path) -> None:
    """A mask setting added to a package must be written out in every quality entry that pins that source:
    each row of the shipped suite resolves (composition only, nothing runs)."""
    cfg = load_suite("quality")
    for row in cfg.rows:
        run_cfg = quality.resolved(cfg, "bottle", row, 0, tmp_path)
        assert run_cfg.model.name == cfg.rows[row].model, row


def test_metrics_and_speed_tiny_grids(tmp_path: Path) -> None:
    assert main(["metrics", *_args(tmp_path)]) == 0
    rows = read_csv(tmp_path / "res" / "metrics.csv")
    ours = {(r["maps"], r["metric"]): float(r["abs_diff_to_reference"]) for r in rows if r["reference"]}
    assert len(ours) == 6
    for (_, metric), diff in ours.items():  # torchmetrics sums in float32; the full-sort AUPRO in float64
        assert diff < (1e-12 if metric == "AUPRO" else 1e-6), (metric, diff)
    args = ["select.cases=[teacher_128,unet_128]", "select.variants=[float32,float32_channels_last]"]
    assert main(["speed", *_args(tmp_path), *args]) == 0
    rows = read_csv(tmp_path / "res" / "speed.csv")
    assert [(r["case"], r["variant"]) for r in rows] == [
        ("teacher_128", "float32"),
        ("teacher_128", "float32_channels_last"),
        ("unet_128", "float32"),
        ("unet_128", "float32_channels_last"),
    ]
    for row in rows:
        assert float(row["train_images_per_s"]) > 0 and float(row["infer_images_per_s"]) > 0
        assert row["precision"] == "32-true" and row["channels_last"] == str(row["variant"].endswith("_last"))
    assert int(rows[0]["params"]) > 1_000_000 and int(rows[2]["params"]) > 10_000_000
    assert [r["default"] for r in rows] == ["True", "False", "True", "False"]  # the tests pin float32


def test_rows_are_merged_by_key(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    write_rows(path, [{"k": 1, "v": 1.0}, {"k": 2, "v": 2.0}], ("k",))
    write_rows(path, [{"k": 2, "v": 3.0, "new": "a"}], ("k",))
    with open(path) as fh:
        assert [(r["k"], r["v"], r["new"]) for r in csv.DictReader(fh)] == [
            ("1", "1.0", ""),
            ("2", "3.0", "a"),
        ]


def test_spearman_against_a_brute_force_rank_correlation() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(0, 4, 7).astype(float).tolist()
        y = rng.random(7).tolist()
        rx = np.array([np.mean([i for i, v in enumerate(sorted(x)) if v == a]) for a in x])
        ry = np.array([sorted(y).index(b) for b in y], dtype=float)
        expected = np.corrcoef(rx, ry)[0, 1] if rx.std() > 0 else math.nan
        got = quality.spearman(x, y)
        assert (math.isnan(expected) and math.isnan(got)) or abs(got - expected) < 1e-12


def test_rank_section_says_what_choosing_by_the_criterion_cost() -> None:
    def row(seed: str, synthetic: float, aupro: float, chosen: bool) -> dict:
        return {
            "category": "a",
            "seed": seed,
            "synthetic_val_AUPRO": str(synthetic),
            "pixel_AUPRO": str(aupro),
            "selected": "",
            "candidate_of": "auto",
            "chosen": str(chosen),
        }

    rows = [row("0", 0.1, 0.9, False), row("0", 0.2, 0.5, False), row("0", 0.3, 0.6, True)]
    rows += [row("1", 0.1, 0.5, False), row("1", 0.2, 0.6, False), row("1", 0.3, 0.7, True)]
    text = "\n".join(_rank_correlation(rows))
    # seed 0: ranks (1, 2, 3) against (3, 1, 2), Spearman 1 - 6 * 6 / (3 * 8) = -0.5; chosen 0.6, best 0.9
    assert (
        "a, seed 0: Spearman -0.500 over 3 candidate rows; the chosen one's test AUPRO is 0.300 below" in text
    )
    assert (
        "a, seed 1: Spearman 1.000 over 3 candidate rows; the chosen one's test AUPRO is 0.000 below" in text
    )
    assert "- mean: Spearman 0.250; choosing by the criterion cost 0.150 AUPRO" in text
    assert _rank_correlation([r | {"candidate_of": ""} for r in rows]) == []


def test_bad_benchmark_arguments_are_one_line(capsys) -> None:
    assert main(["nope"]) == 2
    assert main(["quality", "select.rows=[no_such_row]", "tiny=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: unknown benchmark suite 'nope'")
    assert err[1].startswith("error: select.rows: unknown ['no_such_row']")


def test_demo_section_reads_its_rows() -> None:
    """The demo suite's table: one line per (seed, job), tiny rows left out, the whole demo's time shown."""
    from benchmarks import demo

    base = {"machine": "m", "device": "cpu", "commit": "c", "date": "d", "demo_wall_s": "258.4"}
    metrics = {m: "0.5" for m in ("image_AUROC", "pixel_AUROC", "pixel_AP", "pixel_AUPRO", "IoU")}
    rows = [
        {**base, **metrics, "seed": "1", "job": "unet_gt", "tiny": "False"},
        {**base, **metrics, "seed": "0", "job": "transfusion", "tiny": "False"},
        {**base, **metrics, "seed": "0", "job": "unet_gt", "tiny": "True"},
    ]
    lines = [
        line for line in demo.section(rows).splitlines() if line.startswith("| 0") or line.startswith("| 1")
    ]
    assert lines == [
        "| 0 | transfusion | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | 258 |",
        "| 1 | unet_gt | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | 258 |",
    ]
    assert demo.section([{**rows[2]}]).startswith("No demo results yet")


def test_quality_section_puts_each_pseudo_row_against_teacher_and_gt() -> None:
    base = {"status": "ok", "deciding": "True", "seed": "0", "synthetic_val_AUPRO": "", "mask_IoU": ""}
    base |= {"mask_precision": "", "mask_settings": "", "command": "c", "image_AUROC": "0.9", "IoU": "0"}
    base |= {"pixel_AUROC": "0.5", "protocol": "known normals"}

    def row(cat: str, name: str, model: str, mask: str, aupro: float, ap: float) -> dict:
        return (
            base
            | {"category": cat, "row": name, "label": name, "model": model, "mask": mask}
            | {
                "pixel_AUPRO": str(aupro),
                "pixel_AP": str(ap),
            }
        )

    rows = [
        row("a", "tf", "transfusion", "none", 0.5, 0.10),
        row("a", "gt", "unet", "gt", 0.8, 0.40),
        row("a", "ps", "unet", "m", 0.6, 0.05),
        row("b", "tf", "transfusion", "none", 0.3, 0.02),
        row("b", "gt", "unet", "gt", 0.65, 0.20),
        row("b", "ps", "unet", "m", 0.45, 0.03),
    ]
    text = quality.section(rows)
    assert "| ps | +0.100 | -0.050 | 0.75 | +0.150 | +0.010 | 0.69 |" in text.splitlines()
    assert "| tf | +" not in text and "| gt | +" not in text  # the references are not compared to themselves
    assert "earlier protocol" not in text  # every row records its protocol


def test_quality_section_keeps_image_sizes_apart_and_counts_only_differences_beyond_the_seed_spread() -> None:
    """Rows of 64 and 128 px never average together (a row without a size is 64 px); each cell shows the
    seeds' spread; PSEUDO - synthetic only is marked `*` only where it exceeds the larger spread."""
    base = {
        "status": "ok",
        "deciding": "True",
        "synthetic_val_AUPRO": "",
        "mask_IoU": "",
        "mask_precision": "",
    }
    base |= {
        "command": "c",
        "image_AUROC": "0.9",
        "IoU": "0",
        "pixel_AUROC": "0.5",
        "protocol": "known normals",
    }
    pseudo = '{"name": "pseudo", "threshold": {}}'

    def row(name: str, mask: str, seed: int, aupro: float, ap: float, size: str = "128") -> dict:
        model = "transfusion" if name == "tf" else "unet"
        settings = pseudo if mask == "m" else ""
        return base | {"category": "a", "row": name, "label": name, "model": model, "mask": mask} | {
            "seed": str(seed), "pixel_AUPRO": str(aupro), "pixel_AP": str(ap), "image_size": size,
            "mask_settings": settings,
        }  # fmt: skip

    rows = [row("tf", "none", s, 0.5, 0.1) for s in (0, 1)]
    rows += [row("gt", "gt", 0, 0.9, 0.5), row("gt", "gt", 1, 0.8, 0.5)]
    rows += [row("ps", "m", 0, 0.70, 0.30), row("ps", "m", 1, 0.66, 0.20)]
    rows += [row("syn", "synthetic_only", 0, 0.50, 0.26), row("syn", "synthetic_only", 1, 0.52, 0.22)]
    rows += [{**row("ps", "m", 0, 0.1, 0.1), "image_size": ""}]  # an older 64 px row
    lines = quality.section(rows).splitlines()
    assert lines.index("### 128 px") < lines.index("### 64 px")
    assert (
        "| ps | 0, 1 | 0.900 ±0.000 | 0.500 ±0.000 | 0.250 ±0.100 | 0.680 ±0.040 | 0.000 ±0.000 | – | – | – | – |"
        in lines
    )
    assert "| ps | 0 | 0.900 | 0.500 | 0.100 | 0.100 | 0.000 | – | – | – | – |" in lines  # 64 px, alone
    # AUPRO: 0.68 - 0.51 = +0.17 beyond the spread 0.04; AP: 0.25 - 0.24 = +0.01 within the spread 0.1
    assert "| ps | +0.170* (±0.040) | +0.010 (±0.100) |" in lines
    verdict = "- a, ps: the teacher's gain is not on both metrics beyond the seed spread (AUPRO +0.170, AP +0.010, 2 seeds)"
    assert verdict in lines
    worse = [r | {"pixel_AP": "0.2"} if r["row"] == "ps" else r for r in rows]
    worse = [r | {"pixel_AUPRO": "0.4"} if r["row"] == "ps" else r for r in worse]
    assert (
        "- a, ps: the teacher adds nothing: PSEUDO is at or below synthetic only (AUPRO -0.110, AP -0.040, 2 seeds)"
        in (quality.section(worse).splitlines())
    )
    better = [r | {"pixel_AP": "0.5"} if r["row"] == "ps" else r for r in rows]
    assert any(
        x.startswith("- a, ps: the teacher adds to both, beyond the seed spread (AUPRO +0.170")
        for x in (quality.section(better).splitlines())
    )


def test_quality_section_leaves_out_a_category_whose_reference_is_not_learned() -> None:
    """U-Net GT below the floor (AUPRO 0.5 < 0.6 in b; image AUROC 0.7 < 0.8 in c): the category is marked,
    its PSEUDO / GT ratio is `–` and the deciding mean is over the other categories only."""
    base = {"status": "ok", "deciding": "True", "seed": "0", "synthetic_val_AUPRO": "", "mask_IoU": ""}
    base |= {"mask_precision": "", "mask_settings": "", "command": "c", "IoU": "0", "pixel_AUROC": "0.5"}

    def row(cat: str, name: str, model: str, mask: str, aupro: float, auroc: float = 0.9) -> dict:
        return (
            base
            | {"category": cat, "row": name, "label": name, "model": model, "mask": mask}
            | {
                "pixel_AUPRO": str(aupro),
                "pixel_AP": "0.1",
                "image_AUROC": str(auroc),
            }
        )

    rows = [row(c, "tf", "transfusion", "none", 0.3) for c in "abc"]
    rows += [
        row("a", "gt", "unet", "gt", 0.8),
        row("b", "gt", "unet", "gt", 0.5),
        row("c", "gt", "unet", "gt", 0.9, 0.7),
    ]
    rows += [
        row("a", "ps", "unet", "m", 0.6),
        row("b", "ps", "unet", "m", 0.4),
        row("c", "ps", "unet", "m", 0.2),
    ]
    assert set(quality.unlearned_reference(rows, ["a", "b", "c"])) == {"b", "c"}
    lines = quality.section(rows).splitlines()
    assert "#### b (reference not learned: U-Net GT pixel_AUPRO 0.500 < 0.6)" in lines
    assert "#### c (reference not learned: U-Net GT image_AUROC 0.700 < 0.8)" in lines
    assert "| ps | +0.300 | +0.000 | 0.75 | +0.100 | +0.000 | – | -0.100 | +0.000 | – |" in lines
    mean = lines[lines.index(next(x for x in lines if x.startswith("#### Mean over"))) :]
    assert (
        mean[0].startswith("#### Mean over a ")
        and "| ps | 0.900 | 0.500 | 0.100 | 0.600 | 0.000 | – |" in mean
    )
    assert any("earlier protocol" in x for x in lines)  # these rows record no protocol


def test_speed_section_puts_each_variant_against_float32_of_its_case() -> None:
    from benchmarks import speed

    ctx = {"machine": "m", "device": "cpu (2 threads)", "commit": "c", "date": "d", "tiny": "False"}
    common = {"what": "w", "image_size": "128", "batch_size": "8", "params": "1000", "bf16": "native", **ctx}

    def row(case: str, variant: str, train: float, infer: float, **extra: str) -> dict[str, str]:
        out = {"case": case, "variant": variant, "train_images_per_s": str(train), **common, **extra}
        return out | {"infer_images_per_s": str(infer), "default": str(variant == "bf16")}

    rows = [
        row("teacher_128", "float32", 4.0, 1.0),
        row("teacher_128", "bf16", 6.0, 1.5),
        row("unet_128", "bf16", 9.0, 3.0),  # no float32 row of its own: no ratio
        row(
            "official_128",
            "float32",
            5.0,
            2.0,
            infer_images_per_s_batch1="1.0",
            official_train_images_per_s="2.5",
            official_infer_images_per_s="0.5",
        ),
    ]
    text = speed.section(rows)
    teacher_bf16 = next(
        line for line in text.splitlines() if "| teacher_128 |" in line and "| bf16 |" in line
    )
    assert "| 1.50x |" in teacher_bf16 and "| yes |" in teacher_bf16
    unet = next(line for line in text.splitlines() if "| unet_128 |" in line)
    assert unet.count("| – |") == 2
    peer = text.split("The authors' network beside ours")[1]
    assert "| 5.00 | 2.50 | 2.00x | 2.00 | 1.00 | 0.50 | 2.00x |" in peer


def test_official_checkout_is_named_or_refused(tmp_path: Path, monkeypatch) -> None:
    from benchmarks import official_peer

    monkeypatch.delenv(official_peer.ENV, raising=False)
    assert official_peer.checkout() is None  # the case is skipped
    monkeypatch.setenv(official_peer.ENV, str(tmp_path))
    with pytest.raises(UserError, match=r"OFFICIAL_TRANSFUSION=.* holds no model/TransFusion.py"):
        official_peer.checkout()


@pytest.mark.skipif(not os.environ.get("OFFICIAL_TRANSFUSION"), reason="OFFICIAL_TRANSFUSION not set")
def test_official_network_is_ours_in_the_peer_configuration(tmp_path: Path) -> None:
    """The peer case times two builds of one network: the authors' state loads into ours under the key
    renaming, every tensor of the same shape (`models.transfusion.official`)."""
    import torch

    from benchmarks import official_peer
    from mvtec_seg.config import compose_config
    from mvtec_seg.models.transfusion.official import rename_official_keys
    from mvtec_seg.teacher import build_teacher

    case = load_suite("speed").cases.official_128
    cfg = compose_config([*case.overrides, f"paths.cache_dir={tmp_path}"], run_dir=tmp_path / "run")
    with official_peer._official_modules(official_peer.checkout()) as mods:
        theirs = official_peer.official_net(mods, dict(cfg.teacher.params.net), 20, torch.device("cpu"))
        ours = build_teacher(cfg).model.net
        ours.load_state_dict(rename_official_keys(theirs.state_dict()), strict=True)


def test_speed_rounds_keep_each_rate_at_its_best() -> None:
    from benchmarks.speed import _best

    first = {"train_images_per_s": 5.0, "infer_images_per_s": 1.0, "params": 7}
    second = {"train_images_per_s": 4.0, "infer_images_per_s": 1.5, "params": 7}
    assert _best(None, first) == first
    assert _best(first, second) == {"train_images_per_s": 5.0, "infer_images_per_s": 1.5, "params": 7}


def test_a_quality_row_records_the_iou_at_the_runs_decision_threshold() -> None:
    summary = {
        "metrics": {"test/IoU": 0.0, "test/IoU_at_threshold": 0.4},
        "decision_threshold": {"value": 7.5},
    }
    row = quality.summary_row(summary)
    assert row["IoU_at_threshold"] == 0.4 and row["decision_threshold"] == 7.5 and row["IoU"] == 0.0


def test_a_quality_row_records_how_much_the_teacher_flagged() -> None:
    evidence = {"unlabelled": 400, "flagged": 8, "expected_if_normal": 10.0, "p_value": 0.8}
    row = quality.summary_row({"pseudo": {"evidence": evidence}})
    assert row["teacher_flagged"] == 0.02 and row["teacher_evidence_p"] == 0.8
    assert math.isnan(quality.summary_row({})["teacher_flagged"])  # GT runs and older rows: no evidence


def test_a_candidate_row_says_what_its_chain_read() -> None:
    def rows(protocol: str, candidates: list[dict]) -> list[str]:
        selection = {
            "chosen": 0,
            "candidates": [{"index": i, "label": str(i)} | c for i, c in enumerate(candidates)],
        }
        summary = {"protocol": protocol, "pseudo": {"selection": selection}}
        return [r["protocol"] for r in quality.candidate_rows({"row": "auto"}, summary)]

    recorded = [{"protocol": "image labels"}, {"protocol": "known normals"}]
    assert rows("known normals", recorded) == ["image labels", "known normals"]
    older = [{"settings": {"image_labels": False}}, {"settings": {"image_labels": True}}]
    assert rows("known normals", older) == ["known normals", "image labels"]
    assert rows("image labels", older) == ["", "image labels"]  # the split may have labelled the case
    assert rows("", older[:1]) == [""]  # a run from before the protocol was recorded


def test_a_case_left_unfinished_by_an_interrupted_grid_is_continued(tmp_path: Path, monkeypatch) -> None:
    """The case's folder holds a failed (e.g. killed) run of the same digest: the grid resumes it instead of
    failing the row; a finished one is reused; an empty one trains afresh."""
    import json

    import mvtec_seg.train

    calls: list[bool] = []
    monkeypatch.setattr(
        mvtec_seg.train, "train", lambda cfg: calls.append(bool(cfg.get("resume"))) or {"ok": 1}
    )
    run_cfg = quality.resolved(load_suite("quality", ["tiny=true"]), "synthetic", "unet_gt", 0, tmp_path)
    run_dir = tmp_path / "case"
    assert quality.finished_or_trained(run_cfg.copy(), run_dir, "fresh") == ({"ok": 1}, "")
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"status": "failed", "error": "SIGTERMException"}))
    assert quality.finished_or_trained(run_cfg.copy(), run_dir, "killed") == ({"ok": 1}, "")
    (run_dir / "summary.json").write_text(json.dumps({"status": "ok", "x": 2}))
    assert quality.finished_or_trained(run_cfg.copy(), run_dir, "done")[0] == {"status": "ok", "x": 2}
    assert calls == [False, True]
