"""Everything a run writes: resolved config, summary.json, test predictions, overlays and curves.

Only global rank 0 writes; every file is written atomically so a crash never leaves a half file.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mvtec_seg.io_utils import atomic_save_npz, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def parameter_count(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def _clean(value: Any) -> Any:
    """JSON-safe floats: NaN stays NaN in memory but is written as null."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunOutputs:
    """Collects the run summary as the job goes and writes the run folder."""

    def __init__(self, run_dir: Path, cfg: DictConfig) -> None:
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.summary: dict[str, Any] = {
            "category": cfg.category.name,
            "model": cfg.model.name,
            "mask": "none" if cfg.model.name == "transfusion" else cfg.mask.name,
            "seed": int(cfg.seed),
            "status": "running",
            "task_name": cfg.task_name,
            "params": None,
            "metrics": {},
            "time": {"train_s": None, "test_s": None},
            "throughput": {"train_images_per_s": None, "test_images_per_s": None},
            "split": {},
            "pseudo": None,
            "checkpoint": None,
            "run_dir": str(self.run_dir),
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    def set_split(self, dm) -> None:
        self.summary["split"] = {
            "manifest": str(dm.manifest_path),
            **{f"n_{k}": v for k, v in dm.counts().items()},
        }

    def record_test(self, trainer, model, dm, seconds: float) -> None:
        """Test metrics from the trainer, predictions and pictures from the model's gathered test maps."""
        metrics = getattr(model, "computed_metrics", {}).get("test")
        if metrics is None:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        self.summary["metrics"] = dict(metrics)
        self.summary["time"]["test_s"] = seconds
        preds = getattr(model, "test_predictions", None)
        if preds is None or not trainer.is_global_zero:
            return
        n = len(preds["index"])
        self.summary["throughput"]["test_images_per_s"] = n / seconds if seconds > 0 else None
        rows = dm.manifest["samples"]
        idx = preds["index"]
        gt = np.asarray(dm.gt_masks[idx])
        labels = np.array([rows[i]["label"] for i in idx], dtype=np.uint8)
        paths = np.array([rows[i]["image"] for i in idx])
        atomic_save_npz(
            self.run_dir / "test_predictions.npz",
            index=idx,
            path=paths,
            anomaly_map=preds["anomaly_map"],
            gt_mask=gt,
            gt_label=labels,
        )
        from mvtec_seg import viz

        maps = preds["anomaly_map"].astype(np.float32)
        k = min(n, int(self.cfg.evaluation.max_overlays))
        names = [f"{rows[i]['defect_type']}_{Path(rows[i]['image']).stem}" for i in idx[:k]]
        self.overlay_paths = viz.save_overlays(
            self.run_dir / "overlays",
            np.asarray(dm.images[idx[:k]]),
            gt[:k],
            maps[:k],
            names,
            threshold=float(self.cfg.evaluation.iou_threshold),
            vmin=float(maps.min()),
            vmax=float(maps.max()),
        )
        viz.plot_curves(
            maps, gt, labels, self.run_dir / "curves", fpr_limit=float(self.cfg.evaluation.fpr_limit)
        )

    def finish(self, status: str, trainer=None, wandb_logger=None) -> dict[str, Any]:
        """Write summary.json (and loss curves), close W&B; returns the summary."""
        self.summary["status"] = status
        if trainer is not None and not trainer.is_global_zero:
            return self.summary
        metrics_csv = self.run_dir / "csv" / "metrics.csv"
        if metrics_csv.exists():
            from mvtec_seg.viz import plot_loss_curves

            try:
                plot_loss_curves(metrics_csv, self.run_dir / "curves" / "training.png")
            except Exception as err:  # a plot must never cost the run its summary
                log.warning("could not plot %s: %s", metrics_csv, err)
        atomic_write_json(self.run_dir / "summary.json", _clean(self.summary))
        if wandb_logger is not None:
            from mvtec_seg.wandb_utils import finish_wandb

            finish_wandb(wandb_logger, self.summary, getattr(self, "overlay_paths", []), self.cfg)
        log.info("run folder: %s", self.run_dir)
        return self.summary
