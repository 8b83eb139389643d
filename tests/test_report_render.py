"""report.html shows every figure whole: titles, axes and legends inside each figure, long cell labels
wrapped, at the widths a page is read at.

Two checks: every text of a bar chart lies inside its figure (matplotlib's own extents, no browser needed),
and `report.html` rendered by headless Chromium at 1400 and 900 px (skipped without Chromium). Set
`REPORT_SCREENSHOTS=<folder>` (or `make report-screenshots`) to keep the screenshots and look at them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import make_fake_mvtec
from PIL import Image

from mvtec_seg import report
from mvtec_seg.report import plots
from mvtec_seg.report.aggregate import aggregate
from mvtec_seg.report.collect import collect_runs

MAP = 16
WIDTHS = (1400, 900)
CATEGORIES = ("alpha", "metal_nut", "transistor", "toothbrush")
OPTIMIZERS = (  # two settings that vary: long cell labels, as a sweep over optimizers gives them
    {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.0001},
    {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01},
)


def _fabricate(root: Path) -> Path:
    """Finished run folders (summary.json, config.yaml, test_predictions.npz, a manifest) of four categories
    and four cells, two of which differ only in their optimizer: no training, a second to make."""
    rng = np.random.default_rng(0)
    for category in CATEGORIES:
        cat_dir = make_fake_mvtec(root / "data", category, n_train=2, n_good=2, defects={"scratch": 3})
        images = sorted(p.relative_to(cat_dir).as_posix() for p in (cat_dir / "test").rglob("*.png"))
        rows = [
            {"image": r, "defect_type": r.split("/")[1], "label": int("good" not in r), "part": "test"}
            for r in images
        ]
        manifest = root / "splits" / f"{category}.json"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"category": category, "category_dir": str(cat_dir), "samples": rows}))
        jobs = [("transfusion", "none", None), ("unet", "pseudo", None)]
        jobs += [("unet", "gt", opt) for opt in OPTIMIZERS]
        for model, mask, optimizer in jobs:
            name = f"{category}_{model}_{mask}_{(optimizer or {}).get('_target_', '')}"
            run_dir = root / "runs" / name
            run_dir.mkdir(parents=True)
            cfg: dict[str, Any] = {
                "seed": 0,
                "category": {"name": category, "kind": "object", "generate": None},
                "model": {"name": model, "params": {"optimizer": optimizer or OPTIMIZERS[0]}},
                "mask": {"name": mask},
            }
            metrics = {f"test/{k}": float(rng.uniform(0.3, 0.95)) for k in plots.BAR_METRICS}
            summary = {
                "category": category,
                "model": model,
                "mask": mask,
                "seed": 0,
                "status": "ok",
                "metrics": metrics,
                "split": {"manifest": str(manifest), "n_train": 2, "n_val": 1, "n_test": len(rows)},
                "run_dir": str(run_dir),
            }
            (run_dir / "summary.json").write_text(json.dumps(summary))
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
            labels = np.array([r["label"] for r in rows], np.uint8)
            gt = np.zeros((len(rows), MAP, MAP), np.uint8)
            gt[labels == 1, 4:8, 4:8] = 1
            np.savez_compressed(
                run_dir / "test_predictions.npz",
                index=np.arange(len(rows)),
                path=np.array(images),
                anomaly_map=(0.6 * rng.random(gt.shape) + 0.4 * gt).astype(np.float16),
                gt_mask=gt,
                gt_label=labels,
            )
    return root / "runs"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fabricate(tmp_path_factory.mktemp("render"))


def test_every_text_of_a_bar_chart_is_inside_its_figure(runs: Path) -> None:
    """Title, tick labels, axis label and legend (with the long, wrapped cell labels) all lie within the
    figure, so nothing is cut when it is saved at its size."""
    t = aggregate(collect_runs(runs).runs)
    assert max(len(plots.cell_label(c)) for c in t.cells) > 60  # the labels that were cut before
    for metric in plots.BAR_METRICS:
        fig = plots.bar_figure(t, metric)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        drawn = fig.get_tightbbox(renderer)  # inches: every artist drawn, texts included
        w, h = fig.get_size_inches()
        assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01, (metric, drawn)
        assert drawn.x1 <= w + 0.01 and drawn.y1 <= h + 0.01, (metric, drawn, (w, h))
        title = fig.axes[0].title
        assert "per category" in title.get_text()
        legend = fig.legends[0]
        for text in [title, *legend.get_texts()]:
            ext = text.get_window_extent(renderer)
            assert fig.bbox.x0 <= ext.x0 and ext.x1 <= fig.bbox.x1, f"{metric}: {text.get_text()!r} is cut"
        assert len(legend.get_texts()) == len(t.cells)


def test_long_labels_wrap_at_word_and_comma_boundaries() -> None:
    label = "unet / gt [model.params.optimizer._target_=torch.optim.SGD,model.params.optimizer.lr=0.01]"
    lines = plots.wrap_label(label, 40).splitlines()
    assert len(lines) > 1 and all(len(line) <= 40 for line in lines)
    assert "".join(lines).replace(" ", "") == label.replace(" ", "")  # nothing lost, only broken


def _chromium() -> str | None:
    return next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium on this machine")
def test_report_html_renders_at_common_widths(runs: Path, tmp_path: Path) -> None:
    """Headless Chromium renders report.html at 1400 and 900 px; each screenshot is the width asked for
    and not blank. REPORT_SCREENSHOTS keeps them for a look."""
    result = report.build_report(runs, tmp_path / "report")
    keep = os.environ.get("REPORT_SCREENSHOTS")
    out = Path(keep) if keep else tmp_path / "shots"
    out.mkdir(parents=True, exist_ok=True)
    for width in WIDTHS:
        shot = out / f"report_{width}.png"
        subprocess.run(
            [
                _chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--window-size={width},6000",
                f"--screenshot={shot}",
                result["report_html"].resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        with Image.open(shot) as img:
            assert img.size[0] == width
            grey = np.asarray(img.convert("L"))
        assert grey.std() > 10  # text and figures drawn, not an empty page
