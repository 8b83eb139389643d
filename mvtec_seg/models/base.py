"""Shared validation/test logic so every model is scored by the same code on the same data.

A subclass implements `training_step` and `anomaly_map(image) -> [B,H,W]` (higher = more anomalous,
probabilities for segmenters). Scores are never normalised per image: the image score is the map's max.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from mvtec_seg.errors import UserError
from mvtec_seg.metrics import METRIC_NAMES, SYNTHETIC_PREFIX, AnomalyMetrics


def parameter_count(module: nn.Module) -> int:
    """Number of parameters (works on meta-device modules)."""
    return int(sum(p.numel() for p in module.parameters()))


FUSED_BY_DEFAULT = ("torch.optim.Adam", "torch.optim.AdamW")


def with_fused_default(optimizer: dict, parameters: list[Tensor]) -> dict:
    """Adam and AdamW with ``fused=True`` unless the config picks an implementation (``fused`` or ``foreach``):
    one kernel over all parameters instead of a loop over them (CPU) or several kernels over lists of them
    (CUDA): the same update up to rounding, several times faster on a CPU (`docs/design.md`). Only for floating
    parameters on the CPU or CUDA, the devices that have the fused kernel."""
    if optimizer.get("_target_") not in FUSED_BY_DEFAULT or {"fused", "foreach"} & set(optimizer):
        return optimizer
    if not all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in parameters):
        return optimizer
    return {**optimizer, "fused": True}


def build_optimizers(parameters, optimizer: dict, scheduler: dict | None = None) -> Any:
    """Optimizer and LR scheduler from Hydra `_target_` dicts with `_partial_: true`, the form
    `configure_optimizers` returns. `scheduler` may carry Lightning's `interval` (default "epoch").

    The dicts are kept as plain hyperparameters (not instantiated objects) so checkpoints load with
    `weights_only=True`; a new optimizer is a config file, not a code change.
    """
    opt = instantiate(optimizer, _convert_="all")(params=parameters)
    if not scheduler:
        return opt
    scheduler = dict(scheduler)
    interval = scheduler.pop("interval", "epoch")
    sched = instantiate(scheduler, _convert_="all")(optimizer=opt)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": interval}}


class AnomalyModule(pl.LightningModule):
    """Base LightningModule: validation on `target_mask` (GT or pseudo), test always on `gt_mask`.

    `test_step` returns `{index, anomaly_map}` for callbacks (`callbacks.TestArtefacts` saves them);
    `computed_metrics[stage]` holds the full-precision values of the last validation/test epoch.
    """

    def __init__(
        self, optimizer: dict, scheduler: dict | None = None, evaluation: dict | None = None
    ) -> None:
        super().__init__()
        self.configure_evaluation(**(evaluation or {}))
        self.computed_metrics: dict[str, dict[str, float]] = {}

    def configure_evaluation(self, iou_threshold: float = 0.5, fpr_limit: float = 0.3) -> None:
        """(Re)build the metric objects, e.g. for a loaded checkpoint scored under today's settings."""
        self.val_metrics = AnomalyMetrics(iou_threshold=iou_threshold, fpr_limit=fpr_limit)
        self.synthetic_metrics = AnomalyMetrics(iou_threshold=iou_threshold, fpr_limit=fpr_limit)
        self.test_metrics = AnomalyMetrics(iou_threshold=iou_threshold, fpr_limit=fpr_limit)

    def use_channels_last(self, enabled: bool) -> None:
        """Weights in channels-last (NHWC) layout when `enabled`: convolutions then run NHWC from the first
        layer on (PyTorch follows the weight's layout), which oneDNN's bf16 kernels prefer. The values are
        the same up to rounding; checkpoints load into either layout."""
        if enabled:
            self.to(memory_format=torch.channels_last)

    # -- to implement ------------------------------------------------------------------------------
    def anomaly_map(self, image: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] -> [B,H,W] anomaly scores."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------------
    def check_finite_loss(self, terms: dict[str, Tensor], fix: str) -> None:
        """Stop with one clear line when `terms["loss"]` is NaN/inf, before it reaches the weights.

        Raised inside `training_step`, so no optimizer step and no checkpoint follow: the last checkpoint
        written (`last.ckpt`, once per epoch) stays the last good one, and the message names it.
        """
        if bool(torch.isfinite(terms["loss"])):
            return
        values = {k: float(v.detach()) for k, v in terms.items()}
        raise UserError(
            f"{type(self).__name__} loss became non-finite at epoch {self.current_epoch}, step "
            f"{self.global_step} (terms: {values}); last good checkpoint: {self._last_checkpoint()} — {fix}"
        )

    def _last_checkpoint(self) -> str:
        trainer = self._trainer
        callbacks = trainer.checkpoint_callbacks if trainer is not None else []
        paths = [
            Path(p)
            for cb in callbacks
            for p in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", ""))
            if p and Path(p).is_file()
        ]
        return str(max(paths, key=lambda p: p.stat().st_mtime_ns)) if paths else "none yet"

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        amap = self.anomaly_map(image)
        return {"anomaly_map": amap, "pred_score": amap.flatten(1).amax(1)}

    def configure_optimizers(self) -> Any:
        params, optimizer = list(self.parameters()), dict(self.hparams.optimizer)
        trainer = self._trainer
        # a fused optimizer unscales 16-mixed gradients itself, and Lightning then refuses gradient clipping
        if not (trainer is not None and trainer.gradient_clip_val and trainer.precision == "16-mixed"):
            optimizer = with_fused_default(optimizer, params)
        return build_optimizers(params, optimizer, self.hparams.get("scheduler"))

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Loader 0: the val part against the run's targets; loader 1 (when the datamodule has one): the
        GT-free synthetic validation set against its exact masks, logged as `val/synthetic_<metric>`."""
        amap = self.anomaly_map(batch["image"]).float()
        if dataloader_idx == 1:
            self.synthetic_metrics.update(amap, batch["target_mask"][:, 0] > 0.5, batch["gt_label"])
        else:
            self.val_metrics.update(amap, batch["target_mask"][:, 0] > 0.5)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)
        if self.synthetic_metrics.update_count:
            self._log_metrics("val", self.synthetic_metrics, prefix=SYNTHETIC_PREFIX)

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        amap = self.anomaly_map(batch["image"]).float()
        self.test_metrics.update(amap, batch["gt_mask"][:, 0] > 0.5, batch["gt_label"])
        return {"index": batch["index"], "anomaly_map": amap}

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        return {"index": batch["index"], "anomaly_map": self.anomaly_map(batch["image"]).float()}

    def _log_metrics(self, stage: str, metric: AnomalyMetrics, prefix: str = "") -> dict[str, float]:
        values = metric.compute()
        metric.reset()
        out = {f"{stage}/{prefix}{name}": float(values[name]) for name in METRIC_NAMES}
        # the metric states are already gathered across ranks, so every rank logs the same global value
        self.log_dict(out, prog_bar=stage == "val" and not prefix, sync_dist=True)
        self.computed_metrics[f"{stage}_{prefix.rstrip('_')}" if prefix else stage] = out
        return out


def read_checkpoint(path: Path, fix: str) -> dict:
    """A checkpoint file's contents on the CPU (tensors only, memory-mapped: cheap to inspect); an unreadable
    file is one line naming it and `fix`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot read checkpoint {path}: {first} — {fix}") from None


AUTOCAST: dict[str, torch.dtype] = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
"""Trainer precisions that compute under autocast; every other one (`32-true`, null) in float32."""


@torch.no_grad()
def _device_maps(module: AnomalyModule, images: Tensor, precision: str | None) -> Tensor:
    device = next(module.parameters()).device
    dtype = AUTOCAST.get(str(precision))
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return module.anomaly_map(images.to(device, non_blocking=True)).float()


def anomaly_maps(module: AnomalyModule, images: Tensor, precision: str | None = None) -> Tensor:
    """[B,C,S,S] in [0,1] -> float32 [B,S,S] on the CPU, in eval mode on the module's device (autocast for a
    mixed `precision`): the one inference path, which `loader_maps` batches."""
    module.eval()
    return _device_maps(module, images, precision).cpu()


def loader_maps(
    module: AnomalyModule, loader: Any, keep: tuple[str, ...] = (), precision: str | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Maps of every batch of `loader` (float32 [N,H,W] on the CPU, loader order) and the batch fields named
    in `keep`, concatenated. Maps stay on the device until the end: one copy to the host, not one a batch."""
    module.eval()
    maps, kept = [], {k: [] for k in keep}
    for batch in loader:
        maps.append(_device_maps(module, batch["image"], precision))
        for k in keep:
            kept[k].append(batch[k])
    if not maps:
        return torch.zeros(0, 1, 1), {k: torch.zeros(0) for k in keep}
    return torch.cat(maps).cpu(), {k: torch.cat(v) for k, v in kept.items()}
