"""Report: numbers in report.csv equal the summaries, gaps stay gaps, seeds average, plots and CLI work.

The run folders are fabricated (summary.json, a small test_predictions.npz, a split manifest and a tiny
MVTec-layout category) so the test needs no training and runs in seconds.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_fake_mvtec
from PIL import Image

from mvtec_seg import report
from mvtec_seg.errors import UserError
from mvtec_seg.report import plots
from mvtec_seg.report.collect import collect_runs

MAP = 16  # saved map size (the fake category's images are 40x40: the report resizes them)
METRIC_KEYS = ("image_AUROC", "pixel_AUROC", "pixel_AP", "pixel_AUPRO", "IoU")


def _manifest(root: Path, cat_dir: Path) -> Path:
    """A split manifest whose test part is every image of test/ (index = row)."""
    images = sorted(p.relative_to(cat_dir).as_posix() for p in (cat_dir / "test").rglob("*.png"))
    samples = [
        {
            "image": rel,
            "defect_type": rel.split("/")[1],
            "label": int(rel.split("/")[1] != "good"),
            "part": "test",
        }
        for rel in images
    ]
    path = root / "splits" / f"{cat_dir.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"category": cat_dir.name, "category_dir": str(cat_dir), "samples": samples}))
    return path


def _predictions(run_dir: Path, manifest: Path, model: str, seed: int, drop: int | None = None) -> None:
    rows = json.loads(manifest.read_text())["samples"]
    idx = np.array([i for i in range(len(rows)) if i != drop], dtype=np.int64)
    rng = np.random.default_rng(seed + 100 * len(model))
    gt = np.zeros((len(idx), MAP, MAP), np.uint8)
    labels = np.array([rows[i]["label"] for i in idx], dtype=np.uint8)
    gt[labels == 1, 4:8, 4:8] = 1
    scale = 5.0 if model == "transfusion" else 1.0  # TransFusion maps are not probabilities
    maps = (scale * (0.6 * rng.random((len(idx), MAP, MAP)) + 0.4 * gt)).astype(np.float16)
    np.savez_compressed(
        run_dir / "test_predictions.npz",
        index=idx,
        path=np.array([rows[i]["image"] for i in idx]),
        anomaly_map=maps,
        gt_mask=gt,
        gt_label=labels,
    )


def _pseudo(category: str) -> dict[str, Any]:
    q = (
        {"IoU": 0.41, "precision": 0.52, "recall": 0.63, "normal_nonempty": 0.25}
        if category == "alpha"
        else {
            "IoU": 0.21,
            "precision": 0.32,
            "recall": 0.43,
        }
    )
    return {
        "threshold": 0.37 if category == "alpha" else 0.47,
        "strategy": "normal_quantile",
        "quality": {"train": q, "val": q, "test": q},
        "dir": f"/teachers/{category}/pseudo/abc",  # U-Net and DeepLab share the set: counted once
    }


def _run(
    root: Path,
    manifest: Path,
    category: str,
    model: str,
    mask: str,
    seed: int,
    metrics: dict[str, float | None],
    status: str = "ok",
    drop: int | None = None,
) -> dict[str, Any]:
    run_dir = root / "runs" / f"{category}_{model}_{mask}_s{seed}_{status}"
    run_dir.mkdir(parents=True)
    summary = {
        "category": category,
        "model": model,
        "mask": mask,
        "seed": seed,
        "status": status,
        "params": 1234567,
        "metrics": {f"test/{k}": v for k, v in metrics.items()},
        "time": {"train_s": 10.0 + seed + len(model), "test_s": 1.5},
        "throughput": {"train_images_per_s": 3.0 + seed, "test_images_per_s": 20.0 + len(model)},
        "split": {"manifest": str(manifest), "n_train": 10, "n_val": 2, "n_test": 10},
        "pseudo": _pseudo(category) if mask == "pseudo" else None,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if status == "ok":
        _predictions(run_dir, manifest, model, seed, drop)
    return summary


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """2 categories x 5 cells: two seeds of alpha unet/gt, a NaN metric, a missing and a failed run."""
    root = tmp_path_factory.mktemp("sweep")
    data = root / "data"
    rng = np.random.default_rng(0)
    summaries: dict[tuple[str, str, str, int], dict[str, Any]] = {}

    def metrics(mask: str) -> dict[str, float | None]:
        m = {k: float(np.round(rng.uniform(0.2, 0.95), 6)) for k in METRIC_KEYS}
        if mask == "gt":  # a learned reference (metrics.reference): its gaps count in the mean
            m |= {k: float(np.round(rng.uniform(0.8, 0.95), 6)) for k in ("image_AUROC", "pixel_AUPRO")}
        return m

    for category in ("alpha", "beta"):
        cat_dir = make_fake_mvtec(data, category, n_train=2, n_good=2, defects={"scratch": 3, "hole": 2})
        manifest = _manifest(root, cat_dir)
        cells = [
            ("transfusion", "none", 0),
            ("unet", "gt", 0),
            ("unet", "pseudo", 0),
            ("deeplab", "pseudo", 0),
        ]
        if category == "alpha":
            cells += [("unet", "gt", 1), ("deeplab", "gt", 0)]
        for model, mask, seed in cells:
            m = metrics(mask)
            if (category, model, mask) == ("alpha", "deeplab", "gt"):
                m["pixel_AP"] = None  # undefined metric -> null in summary.json
            # one image missing from one run: the grid must only use images that every run has
            drop = 0 if (category, model, mask) == ("alpha", "deeplab", "pseudo") else None
            summaries[(category, model, mask, seed)] = _run(
                root, manifest, category, model, mask, seed, m, drop=drop
            )
        if category == "beta":
            # deeplab/gt is missing for beta: its only run failed (its numbers must be ignored)
            _run(root, manifest, category, "deeplab", "gt", 0, metrics("gt"), status="failed")
    shutil.rmtree(data / "beta")  # beta's images are gone: grey placeholders, said in the markdown
    result = report.build_report(root / "runs")
    with open(result["report_csv"], newline="") as fh:
        rows = {r["category"]: r for r in csv.DictReader(fh)}
    return {"root": root, "summaries": summaries, "result": result, "rows": rows}


def _f(cell: str) -> float:
    return float(cell)


def test_cells_equal_the_summaries(sweep: dict[str, Any]) -> None:
    rows, summaries = sweep["rows"], sweep["summaries"]
    assert list(rows) == ["alpha", "beta", "mean"]
    for (cat, model, mask, seed), s in summaries.items():
        if (cat, model, mask) == ("alpha", "unet", "gt"):
            continue  # two seeds: checked below
        for k in METRIC_KEYS:
            value = s["metrics"][f"test/{k}"]
            prefix = f"{model}/{mask}/{k}"
            if value is None:
                assert rows[cat][f"{prefix}.mean"] == "" and rows[cat][f"{prefix}.n"] == "0"
            else:
                assert _f(rows[cat][f"{prefix}.mean"]) == pytest.approx(value, abs=1e-12)
                assert rows[cat][f"{prefix}.n"] == "1" and rows[cat][f"{prefix}.std"] == ""
        assert _f(rows[cat][f"{model}/{mask}/train_s.mean"]) == pytest.approx(s["time"]["train_s"])
        assert _f(rows[cat][f"{model}/{mask}/test_images_per_s.mean"]) == pytest.approx(
            s["throughput"]["test_images_per_s"]
        )
        assert seed == 0


def test_seeds_are_averaged_with_their_spread(sweep: dict[str, Any]) -> None:
    rows, summaries = sweep["rows"], sweep["summaries"]
    a, b = summaries[("alpha", "unet", "gt", 0)], summaries[("alpha", "unet", "gt", 1)]
    for k in METRIC_KEYS:
        values = [a["metrics"][f"test/{k}"], b["metrics"][f"test/{k}"]]
        assert _f(rows["alpha"][f"unet/gt/{k}.mean"]) == pytest.approx(statistics.mean(values), abs=1e-12)
        assert _f(rows["alpha"][f"unet/gt/{k}.std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)
        assert rows["alpha"][f"unet/gt/{k}.n"] == "2"
    assert _f(rows["alpha"]["unet/gt/train_s.mean"]) == pytest.approx(
        (a["time"]["train_s"] + b["time"]["train_s"]) / 2
    )
    md = sweep["result"]["report_md"].read_text()
    v = [a["metrics"]["test/pixel_AUPRO"], b["metrics"]["test/pixel_AUPRO"]]
    assert f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f} (n=2)" in md


def test_missing_cells_and_failed_runs_are_gaps_not_zeros(sweep: dict[str, Any]) -> None:
    rows, result = sweep["rows"], sweep["result"]
    assert result["skipped"] == {"failed": 1} and result["n_runs"] == 10
    beta = rows["beta"]
    for k in (*METRIC_KEYS, "train_s", "train_images_per_s", "test_images_per_s"):
        for stat in ("mean", "std", "n"):
            assert beta[f"deeplab/gt/{k}.{stat}"] == "", (k, stat)
    # no category has a defined deeplab/gt pixel AP (NaN in alpha, missing in beta): the mean is a gap too
    assert rows["mean"]["deeplab/gt/pixel_AP.mean"] == ""
    md = result["report_md"].read_text()
    assert "| beta | " in md and "–†" in md and "undefined" in md
    beta_line = next(line for line in md.splitlines() if line.startswith("| beta |"))
    assert "0.000" not in beta_line and "| – |" in beta_line


def test_mean_row_averages_over_categories_that_have_the_cell(sweep: dict[str, Any]) -> None:
    rows, s = sweep["rows"], sweep["summaries"]
    for k in METRIC_KEYS:
        seeds = [s[("alpha", "unet", "gt", i)]["metrics"][f"test/{k}"] for i in (0, 1)]
        expected = (statistics.mean(seeds) + s[("beta", "unet", "gt", 0)]["metrics"][f"test/{k}"]) / 2
        assert _f(rows["mean"][f"unet/gt/{k}.mean"]) == pytest.approx(expected, abs=1e-12)
        assert rows["mean"][f"unet/gt/{k}.n"] == "2"
    only_alpha = s[("alpha", "deeplab", "gt", 0)]["metrics"]["test/pixel_AUPRO"]
    assert _f(rows["mean"]["deeplab/gt/pixel_AUPRO.mean"]) == pytest.approx(only_alpha)
    assert rows["mean"]["deeplab/gt/pixel_AUPRO.n"] == "1"


def test_gap_is_pseudo_minus_gt(sweep: dict[str, Any]) -> None:
    rows, s = sweep["rows"], sweep["summaries"]
    gaps = []
    for cat in ("alpha", "beta"):
        for k in ("pixel_AUPRO", "pixel_AP"):
            gt = statistics.mean(
                s[(cat, "unet", "gt", i)]["metrics"][f"test/{k}"]
                for i in (0, 1)
                if (cat, "unet", "gt", i) in s
            )
            pseudo = s[(cat, "unet", "pseudo", 0)]["metrics"][f"test/{k}"]
            assert _f(rows[cat][f"gap/unet/{k}"]) == pytest.approx(pseudo - gt, abs=1e-12)
            if k == "pixel_AUPRO":
                gaps.append(pseudo - gt)
    assert _f(rows["mean"]["gap/unet/pixel_AUPRO"]) == pytest.approx(statistics.mean(gaps), abs=1e-12)
    d_gt = s[("alpha", "deeplab", "gt", 0)]["metrics"]["test/pixel_AUPRO"]
    d_ps = s[("alpha", "deeplab", "pseudo", 0)]["metrics"]["test/pixel_AUPRO"]
    assert _f(rows["alpha"]["gap/deeplab/pixel_AUPRO"]) == pytest.approx(d_ps - d_gt, abs=1e-12)
    assert rows["alpha"]["gap/deeplab/pixel_AP"] == ""  # gt's AP is undefined
    assert rows["beta"]["gap/deeplab/pixel_AUPRO"] == ""  # gt run missing


def test_a_gap_to_an_unlearned_gt_is_marked_and_left_out_of_the_mean(tmp_path: Path) -> None:
    """Where U-Net GT misses the reference floor (image AUROC 0.6 < 0.8), PSEUDO - GT is shown with a mark,
    the reason is said, and the mean gap is that of the other category alone; each run's decision threshold
    is tabulated with its rule."""
    aupro = {("gamma", "gt"): 0.8, ("gamma", "pseudo"): 0.5, ("delta", "gt"): 0.8, ("delta", "pseudo"): 0.7}
    for cat, gt_auroc in (("gamma", 0.6), ("delta", 0.9)):
        cat_dir = make_fake_mvtec(tmp_path / "data", cat, n_train=2, n_good=2, defects={"scratch": 3})
        manifest = _manifest(tmp_path, cat_dir)
        for mask in ("gt", "pseudo"):
            m = {"image_AUROC": gt_auroc if mask == "gt" else 0.9, "pixel_AUROC": 0.9, "pixel_AP": 0.5}
            run = _run(
                tmp_path, manifest, cat, "unet", mask, 0, m | {"pixel_AUPRO": aupro[(cat, mask)], "IoU": 0.3}
            )
            summary_path = Path(run["run_dir"]) / "summary.json"
            record = {
                "value": 0.25 if mask == "gt" else 0.75,
                "rule": "max pixel F1 on the val part",
                "targets": mask,
            }
            summary_path.write_text(json.dumps(run | {"decision_threshold": record}))
    result = report.build_report(tmp_path / "runs")
    with open(result["report_csv"], newline="") as fh:
        rows = {r["category"]: r for r in csv.DictReader(fh)}
    assert _f(rows["gamma"]["gap/unet/pixel_AUPRO"]) == pytest.approx(-0.3)
    assert _f(rows["mean"]["gap/unet/pixel_AUPRO"]) == pytest.approx(-0.1)  # delta's alone
    md = result["report_md"].read_text()
    gamma = next(line for line in md.splitlines() if line.startswith("| gamma |") and "-0.300" in line)
    assert "-0.300†" in gamma
    assert "gamma / unet: image_AUROC 0.600 < 0.8" in md and "delta / unet" not in md
    table = md[md.index("Decision threshold of each run") :]
    assert "| delta | 0.2500 | 0.7500 |" in table
    assert "max pixel F1 on the val part, against pseudo" in table


def test_pseudo_quality_and_column_order(sweep: dict[str, Any]) -> None:
    rows, result = sweep["rows"], sweep["result"]
    assert _f(rows["alpha"]["pseudo/train_IoU.mean"]) == pytest.approx(0.41)
    assert rows["alpha"]["pseudo/train_IoU.n"] == "1"  # one shared set, not one per segmenter
    assert _f(rows["beta"]["pseudo/train_recall.mean"]) == pytest.approx(0.43)
    assert _f(rows["alpha"]["pseudo/threshold.mean"]) == pytest.approx(0.37)
    assert _f(rows["mean"]["pseudo/train_precision.mean"]) == pytest.approx((0.52 + 0.32) / 2)
    assert _f(rows["alpha"]["pseudo/train_normal_nonempty.mean"]) == pytest.approx(0.25)
    assert rows["beta"]["pseudo/train_normal_nonempty.n"] == "0"  # an older record without it: a gap
    assert result["cells"] == [  # (model, mask, variant): no setting sets these runs apart
        ("transfusion", "none", ()),
        ("unet", "gt", ()),
        ("unet", "pseudo", ()),
        ("deeplab", "gt", ()),
        ("deeplab", "pseudo", ()),
    ]
    assert result["columns"][1] == "transfusion/none/pixel_AUPRO.mean"


def test_markdown_tables_links_and_plots(sweep: dict[str, Any]) -> None:
    result = sweep["result"]
    out = result["report_md"].parent
    md = result["report_md"].read_text()
    for heading in (
        "### pixel AUPRO",
        "### pixel AP",
        "### IoU",
        "## GT vs pseudo masks",
        "## Pseudo-mask quality",
        "## Cost",
        "## Test images across models",
    ):
        assert heading in md, heading
    header = next(line for line in md.splitlines() if line.startswith("| category | transfusion"))
    assert header.index("transfusion") < header.index("unet / gt") < header.index("deeplab / pseudo")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert "report_plots/bars_pixel_AUPRO.png" in links and "report_plots/bars_pixel_AP.png" in links
    assert "report_plots/grid_alpha.png" in links and "report_plots/grid_beta.png" in links
    for link in links:
        assert not Path(link).is_absolute()
        path = out / link
        assert path.is_file() and path.stat().st_size > 1000, link
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 200
    assert sorted(result["plots"]) == sorted(out / link for link in links)
    assert "beta" in md and "grey placeholders" in md  # beta's category folder was removed
    alpha_section = md.split("### alpha")[1].split("###")[0]
    assert "placeholder" not in alpha_section
    assert (out / "report.csv").is_file()


def test_grid_images_are_shared_and_anomalous_first() -> None:
    labels = {"test/good/000.png": 0, "test/good/001.png": 0, "test/hole/000.png": 1, "test/hole/001.png": 1}
    chosen = plots._choose_images(sorted(labels), labels, k=3)
    assert chosen[:2] == ["test/hole/000.png", "test/hole/001.png"] and len(chosen) == 3
    many = {f"test/d{i}/000.png": 1 for i in range(20)}
    assert len(plots._choose_images(sorted(many), many)) == plots.MAX_GRID_IMAGES


def test_cli_writes_to_out_and_rejects_bad_folders(
    sweep: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "elsewhere"
    assert report.main([str(sweep["root"] / "runs"), f"out={out}"]) == 0
    assert (out / "report.md").is_file() and (out / "report_plots" / "bars_pixel_AP.png").is_file()
    # mean row in a second run is identical: the report is deterministic
    assert (out / "report.csv").read_text() == sweep["result"]["report_csv"].read_text()

    missing = tmp_path / "no_such_folder"
    capsys.readouterr()
    assert report.main([str(missing)]) == 2  # the shared wrapper in a real process: test_export.py
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(missing) in errors[0]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty)]) == 2
    with pytest.raises(UserError, match="no summary.json"):
        report.build_report(empty)


def test_only_unfinished_runs_is_a_user_error(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"category": "a", "model": "unet", "status": "failed"}))
    with pytest.raises(UserError, match=r"no finished run.*failed: 1"):
        report.build_report(tmp_path)


def test_failed_runs_are_marked_with_their_reason(sweep: dict[str, Any], tmp_path: Path) -> None:
    result = sweep["result"]
    assert [f["status"] for f in result["failed"]] == ["failed"]
    md = result["report_md"].read_text()
    assert "## Failed runs (1, left out of the tables)" in md
    assert "| **FAILED** | beta | deeplab | gt | 0 | no reason recorded |" in md
    # a failed run that a later run of the same cell replaced is not marked
    root = tmp_path / "redo"
    for status, error in (("failed", "mask ... is 48x32 | wrong"), ("ok", None)):
        run = root / status
        run.mkdir(parents=True)
        data = {"category": "a", "model": "unet", "mask": "gt", "seed": 0, "status": status, "error": error}
        (run / "summary.json").write_text(json.dumps(data))
        time.sleep(0.02)
    coll = collect_runs(root)
    assert coll.failed == [] and coll.skipped_status == {"failed": 1}
    (root / "failed" / "summary.json").touch()  # now the failure is the newer one
    failed = collect_runs(root).failed
    assert [f.summary.error for f in failed] == ["mask ... is 48x32 | wrong"]


def test_html_page_is_the_markdown_with_images_embedded(sweep: dict[str, Any]) -> None:
    """report.html: every heading, table row and figure of report.md, images as data URIs (self-contained)."""
    import base64
    import html as html_lib

    result = sweep["result"]
    out = result["report_md"].parent
    md, page = result["report_md"].read_text(), result["report_html"].read_text()
    assert result["report_html"] == out / "report.html" and page.startswith("<!DOCTYPE html>")
    for line in md.splitlines():
        if line.startswith("#"):
            assert html_lib.escape(line.lstrip("#").strip(), quote=False) in page, line
    md_rows = [
        line for line in md.splitlines() if line.startswith("|") and not re.fullmatch(r"\|[-:| ]+\|", line)
    ]  # table rows, not the separator lines
    assert page.count("<tr>") == len(md_rows)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == len(links) and "http" not in "".join(srcs)
    for link, src in zip(links, srcs, strict=True):
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == (out / link).read_bytes()
    assert "<td class=num>0." in page  # numbers right-aligned as in the Markdown table
