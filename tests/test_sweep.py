"""A Hydra multirun of two segmenters on one synthetic category sharing its teacher, then the comparison report on
it; a glob sweep over the 15 MVTec categories with one failing job."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import TINY_TEACHER, run_cli

from mvtec_seg.report import build_report

CATEGORIES = ("synthetic",)
MODELS = ("unet", "deeplab")
pytestmark = pytest.mark.slow  # every test here runs a Hydra multirun through the CLI


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    args = [
        "-m",
        f"category={','.join(CATEGORIES)}",
        f"model={','.join(MODELS)}",
        "mask=pseudo",
        "mask.rounds=1",
        "debug=fast",
        "data.image_size=32",
        *TINY_TEACHER,
        f"paths.output_dir={tmp / 'out'}",
        f"hydra.sweep.dir={tmp / 'sweep'}",
    ]
    proc = run_cli(args, tmp, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def test_each_job_has_its_own_folder_and_summary(sweep):
    summaries = [json.loads(p.read_text()) for p in (sweep / "sweep").glob("*/summary.json")]
    cells = sorted((s["category"], s["model"], s["mask"]) for s in summaries)
    assert cells == sorted((c, m, "pseudo") for c in CATEGORIES for m in MODELS)
    assert all(s["status"] == "ok" for s in summaries)
    groups = {json.loads((Path(s["run_dir"]) / "summary.json").read_text())["run_dir"] for s in summaries}
    assert len(groups) == len(CATEGORIES) * len(MODELS)


def test_shared_stages_computed_once_per_category(sweep):
    cache = sweep / "out" / "_cache"
    for cat in CATEGORIES:
        teachers = [p for p in (cache / "transfusion" / cat).iterdir() if p.is_dir()]
        assert len(teachers) == 1, teachers  # trained once, reused by both segmenters
        sets = [
            p for p in teachers[0].glob("maps/*/pseudo/*") if p.is_dir()
        ]  # beside the maps they threshold
        assert len(sets) == 1, sets
        assert len(list((cache / "splits" / cat).glob("*.json"))) == 1
    summaries = [json.loads(p.read_text()) for p in (sweep / "sweep").glob("*/summary.json")]
    for cat in CATEGORIES:
        runs = [s for s in summaries if s["category"] == cat]
        teacher_sets = {s["pseudo"]["rounds"][0]["dir"] for s in runs}
        manifests = {s["split"]["manifest"] for s in runs}
        assert len(teacher_sets) == 1 and len(manifests) == 1
        # a self-training round's masks come from the segmenter itself: one set per model, under the teacher's
        final_sets = {s["pseudo"]["dir"] for s in runs}
        assert len(final_sets) == len(MODELS)
        assert all(Path(d).is_relative_to(next(iter(teacher_sets))) for d in final_sets)


def test_report_on_the_sweep(sweep):
    result = build_report(sweep / "sweep")
    with open(result["report_csv"]) as fh:
        rows = {r["category"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {*CATEGORIES, "mean"}
    for path in (sweep / "sweep").glob("*/summary.json"):
        s = json.loads(path.read_text())
        for metric, value in s["metrics"].items():
            cell = rows[s["category"]][f"{s['model']}/pseudo/{metric.split('/')[1]}.mean"]
            if value is None:
                assert cell == ""
            else:
                assert float(cell) == pytest.approx(value, rel=1e-9, abs=1e-12)
    md = Path(result["report_md"]).read_text()
    assert "U-Net" in md or "unet" in md
    assert len(result["plots"]) >= 3 and all(Path(p).stat().st_size > 0 for p in result["plots"])


def test_glob_sweep_over_all_15_categories_lists_the_failed_job_and_exits_nonzero(tmp_path):
    """`category=glob(...)` expands to the 15 MVTec categories; each job checks its data and stops (dry run).
    One category folder is missing: the sweep runs every job, then prints a table of the failed jobs
    (overrides, one-line reason, log path) and exits 1; the failed job's summary says why."""
    from conftest import make_fake_mvtec

    from mvtec_seg.data.layouts import CATEGORIES as DATASET_CATEGORIES

    MVTEC_CATEGORIES = DATASET_CATEGORIES["mvtec"]

    missing = "zipper"
    for name in MVTEC_CATEGORIES:
        if name != missing:
            make_fake_mvtec(
                tmp_path / "mvtec", name=name, n_train=4, n_good=3, defects={"crack": 3}, size=(24, 24)
            )
    args = [
        "-m",
        "category=glob(*,exclude=[custom,synthetic*])",
        "dry_run=true",
        "data.image_size=32",
        f"data.root={tmp_path / 'mvtec'}",
        f"paths.output_dir={tmp_path / 'out'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    proc = run_cli(args, tmp_path, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    summaries = {
        s["category"]: s
        for s in (json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/summary.json"))
    }
    assert sorted(summaries) == sorted(MVTEC_CATEGORIES)
    done = [s for c, s in summaries.items() if c != missing]
    assert all(s["status"] == "dry_run" and s["split"]["n_test"] > 0 and s["error"] is None for s in done)
    table = proc.stderr[proc.stderr.index(f"1 of {len(MVTEC_CATEGORIES)} sweep jobs failed:") :].splitlines()
    row = next(line for line in table if f"category={missing}" in line)
    overrides, reason, log = (cell.strip() for cell in row.split(" | "))
    assert "dry_run=true" in overrides.lower() and reason.startswith("category folder not found")
    assert Path(log).is_file()
    assert summaries[missing]["status"] == "failed"
    assert summaries[missing]["error"].startswith(reason.rstrip("…"))
