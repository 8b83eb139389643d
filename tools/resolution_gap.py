"""The test metrics of finished runs at the model's input size and at each image's own size, from the same
maps: `python tools/resolution_gap.py <run folder> [...]` (runs trained with `evaluation.resolution=native`
hold the native figures in `summary.json`; the model-size ones are computed again here from
`test_predictions.npz`, whose masks are at `data.image_size`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from mvtec_seg.metrics import METRIC_NAMES, compute_all
from mvtec_seg.summary import PREDICTIONS_FILE


def gap(run: Path) -> list[str]:
    """Markdown rows: metric, model size, native size, native - model."""
    summary = json.loads((run / "summary.json").read_text())
    if summary.get("resolution") != "native":
        raise SystemExit(f"{run} was not scored at native resolution (evaluation.resolution=native)")
    cfg = OmegaConf.load(run / "config.yaml")
    with np.load(run / PREDICTIONS_FILE) as pred:
        model = compute_all(
            torch.from_numpy(pred["anomaly_map"].astype(np.float32)),
            torch.from_numpy(pred["gt_mask"]),
            torch.from_numpy(pred["gt_label"]),
            iou_threshold=float(cfg.evaluation.iou_threshold),
            fpr_limit=float(cfg.evaluation.fpr_limit),
        )
    rows = []
    for name in METRIC_NAMES:
        m, n = float(model[name]), summary["metrics"][f"test/{name}"]
        rows.append(f"| {summary['category']} | {name} | {m:.4f} | {n:.4f} | {n - m:+.4f} |")
    return rows


def main(argv: list[str]) -> int:
    print("| category | metric | at data.image_size | native | native - model |\n|---|---|---|---|---|")
    for run in argv:
        print("\n".join(gap(Path(run))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
