"""`python -m mvtec_seg.compare [overrides]`: the whole comparison for one category in one command.

The jobs of `compare.jobs` (default: TransFusion, U-Net on GT, U-Net on pseudo masks, and the two controls:
U-Net on synthetic defects only, U-Net on GT + the same synthetic defects) run one after the other with the same overrides, each into its own run folder under one comparison folder, sharing the
category's split, decoded images, teacher, maps and pseudo masks; then the report (`report.md`,
`report.html`, `report.csv`) is built over them and the headline table printed: the test metrics of each job
(IoU also at the run's decision threshold) and PSEUDO beside GT and both controls: PSEUDO - synthetic only
is what the teacher adds, GT + synthetic - PSEUDO what is left to GT. `make demo` is `python -m mvtec_seg.compare experiment=demo`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mvtec_seg.cli import run_command
from mvtec_seg.config import compose_config
from mvtec_seg.errors import UserError
from mvtec_seg.metrics import METRIC_NAMES
from mvtec_seg.metrics.reference import REFERENCE_FLOOR, unlearned
from mvtec_seg.preflight import check_config
from mvtec_seg.report.build import build_report
from mvtec_seg.summary import IOU_AT_THRESHOLD
from mvtec_seg.train import train

log = logging.getLogger(__name__)
LABELS = {"image_AUROC": "image AUROC", "pixel_AUROC": "pixel AUROC", "pixel_AP": "pixel AP",
          "pixel_AUPRO": "AUPRO", "IoU": "IoU@0.5", IOU_AT_THRESHOLD: "IoU@thr"}  # fmt: skip
HEADLINE_METRICS: tuple[str, ...] = (*METRIC_NAMES, IOU_AT_THRESHOLD)
CONTRASTS: tuple[tuple[str, str, str], ...] = (
    ("PSEUDO", "GT", "PSEUDO - GT"),
    ("PSEUDO", "synthetic only", "PSEUDO - synthetic only (what the teacher adds)"),
    ("GT + synthetic", "PSEUDO", "GT + synthetic - PSEUDO (what is left to GT)"),
)
"""The headline's difference rows: (minuend variant, subtrahend variant, label), by `mask_variant`."""


def variant(summary: dict) -> str | None:
    """A summary's mask variant (`data.sources`); older summaries without one: from `mask`."""
    return summary.get("mask_variant") or {"gt": "GT", "pseudo": "PSEUDO"}.get(str(summary.get("mask")))


def comparison_dir(cfg: DictConfig) -> Path:
    """`compare.output` or `<paths.output_dir>/compare/<date>_<time>_<category>`."""
    if cfg.compare.get("output"):
        return Path(cfg.compare.output)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return Path(cfg.paths.output_dir) / "compare" / f"{stamp}_{cfg.category.name}"


def headline(summaries: dict[str, dict]) -> str:
    """The test metrics of every job as a table (with each job's decision threshold), and per model the
    differences of `CONTRASTS` whose two variants it has: PSEUDO beside GT and both controls."""
    models = list(dict.fromkeys(s.get("model") for s in summaries.values()))
    width = max([len(n) for n in summaries] + [len(f"{m}: {c[2]}") for m in models for c in CONTRASTS])
    lines = [f"{'':<{width}} " + " ".join(f"{LABELS[m]:>11}" for m in HEADLINE_METRICS) + "   threshold"]

    def value(s: dict, m: str) -> float:
        v = (s.get("metrics") or {}).get(f"test/{m}")
        return math.nan if v is None else float(v)

    def row(name: str, values: list[float], signed: bool = False) -> str:
        fmt = "{:>+11.3f}" if signed else "{:>11.3f}"
        cells = [f"{'–':>11}" if not math.isfinite(v) else fmt.format(v) for v in values]
        return f"{name:<{width}} " + " ".join(cells)

    for name, s in summaries.items():
        threshold = (s.get("decision_threshold") or {}).get("value")
        shown = f"{float(threshold):>12.4g}" if threshold is not None else f"{'–':>12}"
        lines.append(row(name, [value(s, m) for m in HEADLINE_METRICS]) + shown)
    by = {(s.get("model"), variant(s)): s for s in summaries.values()}
    for model in models:
        for plus, minus, label in CONTRASTS:
            a, b = by.get((model, plus)), by.get((model, minus))
            if a and b:
                diff = [value(a, m) - value(b, m) for m in HEADLINE_METRICS]
                lines.append(row(f"{model}: {label}", diff, signed=True))
        gt = by.get((model, "GT"))
        why = unlearned({m: value(gt, m) for m in REFERENCE_FLOOR}) if gt else ""
        if why:
            lines.append(
                f"{model}: GT is not learned here ({why}): PSEUDO - GT says nothing about the pseudo masks"
            )
    return "\n".join(lines)


def compare(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run every job of `compare.jobs` with `overrides`, then the report; returns the summaries and paths."""
    base = compose_config(list(overrides), run_dir="unused")  # a typo stops here, before any work
    jobs = OmegaConf.to_container(base.compare.jobs, resolve=True)
    if not jobs:
        raise UserError(
            "compare.jobs is empty — name at least one job, e.g. compare.jobs={unet_gt: [model=unet]}"
        )
    folder = comparison_dir(base)
    # every job composed (and its settings checked) first: a typo in the last job stops before any training
    configs = {name: compose_config([*overrides, *job], run_dir=folder / name) for name, job in jobs.items()}
    for cfg in configs.values():
        check_config(cfg)
    summaries: dict[str, dict] = {}
    for name, cfg in configs.items():
        log.warning("compare: job %s (%s)", name, " ".join(jobs[name]))
        summaries[name] = train(cfg)
    report = build_report(folder)
    return {"summaries": summaries, "folder": folder, "report": report}


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("mvtec_seg.compare", __doc__, list(sys.argv[1:] if argv is None else argv), _run)


def _run(overrides: list[str]) -> int:
    result = compare(overrides)
    print(headline(result["summaries"]))
    print(f"report: {result['report']['report_html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
