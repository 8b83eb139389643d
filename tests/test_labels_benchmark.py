"""The labels suite: its tiny grid runs MIXED and GT only on the same labelled images and writes its CSV, plot
and RESULTS.md section; the headline finds the smallest k reaching a share of full GT, only where GT is learned."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import labels
from benchmarks.__main__ import main
from benchmarks.runner import load_suite, read_csv


@pytest.mark.slow
def test_labels_tiny_grid_labels_the_same_images_for_both_sources(tmp_path: Path) -> None:
    args = [
        "tiny=true",
        f"out={tmp_path / 'res'}",
        f"runs={tmp_path / 'runs'}",
        f"cache={tmp_path / 'cache'}",
    ]
    args += ["select.seeds=[0]", "select.k=[2,all]"]
    assert main(["labels", *args]) == 0
    rows = read_csv(tmp_path / "res" / "labels.csv")
    assert [(r["source"], r["k"], r["status"]) for r in rows] == [
        ("mixed", "2", "ok"),
        ("gt", "2", "ok"),
        ("mixed", "all", "ok"),
        ("gt", "all", "ok"),
    ]
    by = {(r["source"], r["k"]): r for r in rows}
    assert by["mixed", "2"]["labelled_digest"] == by["gt", "2"]["labelled_digest"]  # one choice for both
    assert by["gt", "2"]["n_labelled"] == "2" and int(by["gt", "all"]["n_labelled"]) > 2
    assert by["gt", "all"]["n_labelled"] == by["mixed", "all"]["n_labelled"]  # every defective train image
    assert by["mixed", "2"]["labelled_digest"] != by["mixed", "all"]["labelled_digest"]
    assert all(0.0 <= float(r["pixel_AUPRO"]) <= 1.0 for r in rows)
    results = (tmp_path / "RESULTS.md").read_text()
    assert "## Labels" in results and "No labels results yet" in results  # smoke rows are not results
    measured = [r | {"tiny": "False"} for r in rows]
    assert "| 2 | 1 |" in labels.section(measured)
    assert labels.figure(measured, tmp_path / "labels.png").stat().st_size > 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/summary.json")}
    assert main(["labels", *args]) == 0  # found again by digest: nothing retrained
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/summary.json")} == before


def test_a_budget_above_the_splits_defective_images_is_skipped(tmp_path: Path, monkeypatch) -> None:
    cases: list[tuple[str, str]] = []
    monkeypatch.setattr(labels, "defective_train_images", lambda run_cfg: 3)
    monkeypatch.setattr(
        labels, "run_case", lambda cfg, cat, source, k, *rest: cases.append((source, k)) or {}
    )
    cfg = load_suite("labels", ["select.categories=[synthetic]", "select.seeds=[0]"])
    labels.run(cfg, tmp_path / "runs", tmp_path / "cache", lambda row: None)
    assert cases == [
        ("mixed", "0"),  # GT only at k = 0 would see no defect: its min_k is 1
        *[(s, k) for k in ("1", "2") for s in ("mixed", "gt")],
        ("mixed", "all"),
        ("gt", "all"),
    ]


def _row(cat: str, source: str, k: str, aupro: float, seed: str = "0", auroc: float = 0.9) -> dict:
    return {
        "status": "ok",
        "category": cat,
        "source": source,
        "label": {"mixed": "MIXED", "gt": "GT only"}[source],
        "mask": source,
        "model": "unet",
        "k": k,
        "seed": seed,
        "n_labelled": "20" if k == "all" else k,
        "deciding": "True",
        "command": "c",
        "pixel_AUPRO": str(aupro),
        "pixel_AP": "0.1",
        "image_AUROC": str(auroc),
    }


def test_the_headline_is_the_smallest_k_reaching_a_share_of_learned_full_gt() -> None:
    rows = [_row("a", "mixed", k, v) for k, v in (("0", 0.6), ("1", 0.7), ("2", 0.73), ("5", 0.77))]
    rows += [_row("a", "gt", k, v) for k, v in (("1", 0.3), ("2", 0.5), ("5", 0.74), ("all", 0.8))]
    rows += [_row("a", "mixed", "0", 0.62, seed="1")]
    rows += [_row("b", "mixed", "0", 0.74), _row("b", "gt", "all", 0.8)]  # 95 % (0.76) never reached
    rows += [_row("c", "mixed", "0", 0.4), _row("c", "gt", "all", 0.5)]  # full GT not learned (< 0.6)
    rows += [_row("d", s, k, v) for s in ("mixed", "gt") for k, v in (("2", 0.5), ("5", 0.75), ("all", 0.8))]
    lines = labels.section(rows).splitlines()
    a = lines[lines.index("### a") :]
    assert "| 0 (PSEUDO) | 2 | 0.610 ± 0.014 | – | 0.100 ± 0.000 | – |" in a
    assert "| all (20) | 1 | – | 0.800 | – | 0.100 |" in a
    assert "- 90% of full GT: MIXED k = 2; GT only k = 5" in a
    assert "- 95% of full GT: MIXED k = 5; GT only k = all" in a
    assert (
        "- MIXED at 90% of full GT with at most half the labels GT only needs: yes: 2 labelled images against 5"
        in a
    )
    b = lines[lines.index("### b") :]
    assert "- 95% of full GT: MIXED not reached within the grid; GT only k = all" in b
    assert "half the labels GT only needs: yes: 0 labelled images against 20" in "\n".join(b)
    c = lines[lines.index("### c") : lines.index("### d")]
    assert any(x.startswith("Full GT is not learned here (U-Net GT pixel_AUPRO 0.500 < 0.6)") for x in c)
    assert not any(x.startswith("- 90%") for x in c)
    d = lines[lines.index("### d") :]
    assert (
        "- MIXED at 90% of full GT with at most half the labels GT only needs: no: 5 labelled images against 5"
        in d
    )
    assert labels.section([]).startswith("No labels results yet")


def test_results_md_links_the_plot_drawn_beside_the_csv(tmp_path: Path) -> None:
    from benchmarks import report
    from benchmarks.runner import write_rows

    rows = [_row("a", "mixed", "0", 0.6), _row("a", "mixed", "2", 0.75), _row("a", "gt", "all", 0.8)]
    write_rows(tmp_path / "res" / "labels.csv", rows, labels.KEY)
    text = report.build(tmp_path / "res").read_text()
    assert "](res/labels.png)" in text and (tmp_path / "res" / "labels.png").stat().st_size > 0
    assert "- 90% of full GT: MIXED k = 2; GT only k = all" in text


def test_the_plot_gives_each_source_one_colour_and_marks_an_unlearned_reference(
    tmp_path: Path, monkeypatch
) -> None:
    import mvtec_seg.viz as viz

    drawn = []
    monkeypatch.setattr(viz, "save_figure", lambda fig, path: drawn.append(fig) or path)
    rows = [_row("a", "mixed", "2", 0.7), _row("a", "gt", "2", 0.6), _row("a", "gt", "all", 0.8)]
    rows += [_row("b", "gt", "all", 0.3)]  # GT only drawn first in its panel, still in GT only's colour
    labels.figure(rows, tmp_path / "labels.png")
    panels = drawn[0].axes
    colour = [{c.get_label(): c.lines[0].get_color() for c in ax.containers} for ax in panels]
    assert colour[0]["GT only"] == colour[1]["GT only"] != colour[0]["MIXED"]
    assert panels[0].get_title() == "a" and panels[1].get_title() == "b (full GT not learned)"
