"""`python -m mvtec_seg.compare`: the GT / PSEUDO / teacher jobs of one category in one folder, one report, and
a headline whose PSEUDO - GT row is the difference of the two jobs' recorded metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import TINY_TEACHER, with_teacher

from mvtec_seg.compare import HEADLINE_METRICS, compare, headline, main


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
        "unet_synthetic",
        "unet_gt_synthetic",
    }
    for name, summary in result["summaries"].items():
        on_disk = json.loads((folder / name / "summary.json").read_text())
        assert on_disk["status"] == "ok" and on_disk["metrics"] == summary["metrics"], name
    assert (folder / "report.html").is_file() and (folder / "report.csv").is_file()
    text = headline(result["summaries"])
    runs = result["summaries"]
    for label, plus, minus in (
        ("unet: PSEUDO - GT", "unet_pseudo", "unet_gt"),
        ("unet: PSEUDO - synthetic only", "unet_pseudo", "unet_synthetic"),
        ("unet: GT + synthetic - PSEUDO", "unet_gt_synthetic", "unet_pseudo"),
    ):
        diff = next(line for line in text.splitlines() if line.startswith(label))
        a, b = runs[plus]["metrics"], runs[minus]["metrics"]
        for cell, metric in zip(diff.split()[-len(HEADLINE_METRICS) :], HEADLINE_METRICS, strict=True):
            va, vb = a.get(f"test/{metric}"), b.get(f"test/{metric}")
            want = (math.nan if va is None else float(va)) - (math.nan if vb is None else float(vb))
            shown = "–" if math.isnan(want) else f"{want:+.3f}"  # a half-way case rounds alike
            assert cell == shown, metric
    assert runs["unet_synthetic"]["mask_variant"] == "synthetic only"
    assert runs["unet_gt_synthetic"]["mask_variant"] == "GT + synthetic"
    assert runs["unet_pseudo"]["protocol"] == "known normals"
    for name in ("transfusion", "unet_gt"):  # IoU at the decision threshold for every model, the teacher too
        assert "test/IoU_at_threshold" in runs[name]["metrics"], name


def test_a_typo_in_any_job_stops_before_any_training(tmp_path: Path, capsys) -> None:
    bad_job = "compare.jobs={unet_gt:['model=unet'],broken:['model=unet','mask.threshold.strategy=nope']}"
    assert main([*_overrides(tmp_path), bad_job]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "mask.threshold.strategy" in err and "\n" not in err
    assert not (tmp_path / "cmp" / "unet_gt").exists()  # the first job never started


def test_the_headline_says_when_gt_is_no_reference() -> None:
    """A PSEUDO - GT row beside a GT job that was not learned (image AUROC 0.6 < 0.8) is flagged in one line;
    a learned GT is not."""

    def job(mask: str, image_auroc: float) -> dict:
        metrics = {"test/image_AUROC": image_auroc, "test/pixel_AUPRO": 0.7}
        return {"model": "unet", "mask": mask, "mask_variant": mask.upper(), "metrics": metrics}

    flagged = headline({"unet_gt": job("gt", 0.6), "unet_pseudo": job("pseudo", 0.7)})
    assert "unet: GT is not learned here (image_AUROC 0.600 < 0.8)" in flagged
    assert "not learned" not in headline({"unet_gt": job("gt", 0.9), "unet_pseudo": job("pseudo", 0.7)})
