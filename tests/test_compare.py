"""`python -m mvtec_seg.compare`: the GT / PSEUDO / teacher jobs of one category in one folder, one report, and
a headline whose PSEUDO - GT row is the difference of the two jobs' recorded metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import TINY_TEACHER, with_teacher

from mvtec_seg.compare import compare, headline, main
from mvtec_seg.metrics import METRIC_NAMES


def _overrides(tmp: Path) -> list[str]:
    return [
        "category=synthetic",
        "debug=fast",
        "data.image_size=32",
        *TINY_TEACHER,
        f"paths.output_dir={tmp / 'out'}",
        f"paths.cache_dir={tmp / 'cache'}",
        f"compare.output={tmp / 'cmp'}",
    ]


@pytest.mark.slow
def test_compare_runs_every_job_into_one_folder_and_reports(tmp_path: Path, teacher_cache: Path) -> None:
    with_teacher(teacher_cache, tmp_path)
    result = compare(_overrides(tmp_path))
    folder = tmp_path / "cmp"
    assert result["folder"] == folder and set(result["summaries"]) == {
        "transfusion",
        "unet_gt",
        "unet_pseudo",
    }
    for name, summary in result["summaries"].items():
        on_disk = json.loads((folder / name / "summary.json").read_text())
        assert on_disk["status"] == "ok" and on_disk["metrics"] == summary["metrics"], name
    assert (folder / "report.html").is_file() and (folder / "report.csv").is_file()
    text = headline(result["summaries"])
    diff = next(line for line in text.splitlines() if line.startswith("unet: PSEUDO - GT"))
    gt, pseudo = result["summaries"]["unet_gt"]["metrics"], result["summaries"]["unet_pseudo"]["metrics"]
    for cell, metric in zip(diff.split()[-len(METRIC_NAMES) :], METRIC_NAMES, strict=True):
        want = pseudo[f"test/{metric}"] - gt[f"test/{metric}"]
        assert cell == "–" if math.isnan(want) else float(cell) == pytest.approx(want, abs=5e-4), metric


def test_a_typo_in_any_job_stops_before_any_training(tmp_path: Path, capsys) -> None:
    bad_job = "compare.jobs={unet_gt:['model=unet'],broken:['model=unet','mask.threshold.strategy=nope']}"
    assert main([*_overrides(tmp_path), bad_job]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "mask.threshold.strategy" in err and "\n" not in err
    assert not (tmp_path / "cmp" / "unet_gt").exists()  # the first job never started
