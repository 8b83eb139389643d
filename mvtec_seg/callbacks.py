"""Run side effects as Lightning callbacks: throughput measured inside the loops, test artefacts written
once the test loop has gathered every rank's maps, the resume checkpoint and the RNG states it carries."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist

from mvtec_seg.errors import UserError
from mvtec_seg.io_utils import atomic_save_npz
from mvtec_seg.summary import PREDICTIONS_FILE


class Throughput(pl.Callback):
    """Training images per second, everything included (data loading, forward, backward, optimiser, hooks),
    and the test loop's wall time.

    Each training epoch is timed from the end of its first batch (warm-up excluded) to the end of its last,
    so validation between epochs does not count. An epoch of one batch counts that batch alone. The test
    time runs from the start of the test loop to its end, before any artefact is written (callbacks placed
    after this one run their `on_test_end` later).
    """

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self.images_seen = 0  # every training image of every epoch, warm-up batches included
        self._single: tuple[int, float] | None = None
        self.test_s: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_t0 = self._t0 = time.perf_counter()
        self._mark: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        n = len(batch["image"])
        self.images_seen += n
        if self._mark is None:  # first batch of the epoch: warm-up
            self._mark = now
            self._single = (n, now - self._t0)
            return
        self.images += n
        self.seconds += now - self._mark
        self._mark = now

    def on_test_start(self, trainer, pl_module) -> None:
        self._test_t0 = time.perf_counter()

    def on_test_end(self, trainer, pl_module) -> None:
        self.test_s = time.perf_counter() - self._test_t0

    @property
    def images_per_s(self) -> float:
        if self.seconds > 0:
            return self.images / self.seconds
        if self._single is not None and self._single[1] > 0:
            return self._single[0] / self._single[1]
        return float("nan")


class ResumeCheckpoint(pl.callbacks.ModelCheckpoint):
    """`<dirpath>/last.ckpt` for resuming: written at the end of an epoch once ``every_s`` seconds have passed
    since the previous write (or since training started), and always after the last epoch; 0: every epoch.

    Why not every epoch: the published TransFusion's checkpoint (weights and AdamW state) is 655 MB and its
    epochs on a GPU take seconds, so writing each one could nearly double the training time (`docs/design.md`).
    Which epoch a run resumes from does not
    change its result. Rank 0's clock decides for every rank (a save is collective under DDP). Written after
    validation, so it holds the best-checkpoint tracking too; Lightning writes a temporary and renames it, so
    a kill mid-write leaves the previous one.
    """

    def __init__(
        self, dirpath: Path | str, every_s: float = 0.0, filename: str = "last", clock=time.monotonic
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=None,
            save_top_k=1,
            every_n_epochs=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
        if every_s < 0:
            raise UserError(f"checkpoint.last_every_s={every_s} must be >= 0 seconds (0: every epoch)")
        self.every_s = float(every_s)
        self._clock = clock
        self._written = clock()
        self.writes = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._written = self._clock()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        due = self._clock() - self._written >= self.every_s or _last_epoch(trainer)
        if not trainer.strategy.broadcast(due, src=0):
            return
        before = self._last_global_step_saved
        super().on_train_epoch_end(trainer, pl_module)
        if self._last_global_step_saved != before:
            self._written = self._clock()
            self.writes += 1


def _last_epoch(trainer: pl.Trainer) -> bool:
    """Whether the epoch ending now is the fit's last (epoch limit, step limit or a requested stop)."""
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    return bool(
        trainer.should_stop
        or (max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs)
        or (max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps)
    )


class RngState(pl.Callback):
    """Puts the global torch (CPU and CUDA), numpy and Python RNG states into every checkpoint and restores
    them on resume, so a resumed run draws the same augmentations, timesteps and dropout as one that was
    never stopped (Lightning saves optimizer, scheduler and loop state, not these).

    Plain lists and tensors only, so checkpoints still load with `weights_only=True`.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, key, pos, has_gauss, gauss = np.random.get_state()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, key.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        kind, key, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state_dict["python"]
        random.setstate((version, tuple(internal), gauss_next))
        if state_dict.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class TestArtefacts(pl.Callback):
    """Collects `test_step`'s `{index, anomaly_map}` outputs, gathers them from every rank, and writes
    `test_predictions.npz`, overlay panels and curves into the run folder (global rank 0 only).

    The saved maps are the exact tensors the metrics saw, so every number in `summary.json` can be
    recomputed from the file. `metrics` (the module's full-precision test values) label the curves.
    """

    def __init__(
        self, run_dir: Path | str, iou_threshold: float, fpr_limit: float, max_overlays: int
    ) -> None:
        self.run_dir = Path(run_dir)
        self.iou_threshold, self.fpr_limit = float(iou_threshold), float(fpr_limit)
        self.max_overlays = int(max_overlays)
        self._store: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.n_images = 0
        self.overlay_paths: list[Path] = []

    def on_test_start(self, trainer, pl_module) -> None:
        self._store = []

    def on_test_batch_end(self, trainer, pl_module, outputs: Any, batch, batch_idx, dataloader_idx=0) -> None:
        self._store.append((outputs["index"].detach().cpu(), outputs["anomaly_map"].detach().cpu()))

    def on_test_end(self, trainer, pl_module) -> None:
        store, self._store = self._store, []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, store)
            store = [item for part in gathered for item in part]
        if not store or not trainer.is_global_zero:
            return
        index = torch.cat([s[0] for s in store]).numpy()
        maps = torch.cat([s[1] for s in store]).numpy()
        order = np.argsort(index, kind="stable")
        self.n_images = len(index)
        self.write(trainer.datamodule, index[order], maps[order], pl_module.computed_metrics.get("test"))

    def write(self, dm, index: np.ndarray, maps: np.ndarray, metrics: dict[str, float] | None) -> None:
        from mvtec_seg import viz

        rows = dm.manifest["samples"]
        gt = np.asarray(dm.gt_masks[index])
        labels = np.array([rows[i]["label"] for i in index], dtype=np.uint8)
        paths = np.array([rows[i]["image"] for i in index])
        atomic_save_npz(
            self.run_dir / PREDICTIONS_FILE,
            index=index,
            path=paths,
            anomaly_map=maps,
            gt_mask=gt,
            gt_label=labels,
        )
        maps = maps.astype(np.float32)
        k = min(len(index), self.max_overlays)
        names = [f"{rows[i]['defect_type']}_{Path(rows[i]['image']).stem}" for i in index[:k]]
        self.overlay_paths = viz.save_overlays(
            self.run_dir / "overlays",
            np.asarray(dm.images[index[:k]]),
            gt[:k],
            maps[:k],
            names,
            threshold=self.iou_threshold,
            vmin=float(maps.min()),
            vmax=float(maps.max()),
        )
        viz.plot_curves(maps, gt, labels, self.run_dir / "curves", fpr_limit=self.fpr_limit, metrics=metrics)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class EpochProgress(pl.Callback):
    """One log line per training epoch with the time an epoch takes and an estimate of the time left, for
    logs and terminals without Lightning's progress bar (a terminal with the bar shows the same there).

    The estimate is the mean epoch time so far (validation included) times the epochs left."""

    def __init__(self, name: str | None = None, log=None) -> None:
        import logging

        self.name = name  # None: the stage running when training starts (`interrupt.current_stage`)
        self._logger = log or logging.getLogger("mvtec_seg.progress")
        self._t0: float | None = None
        self._start_epoch = 0

    def on_train_start(self, trainer, pl_module) -> None:
        from mvtec_seg.interrupt import current_stage

        self._t0 = time.perf_counter()
        self._start_epoch = trainer.current_epoch
        self.name = self.name or current_stage() or "training"

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._t0 is None or not trainer.is_global_zero:
            return
        done = trainer.current_epoch + 1
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else done
        per_epoch = (time.perf_counter() - self._t0) / max(done - self._start_epoch, 1)
        self._logger.info(
            "%s: epoch %d/%d, %.1f s an epoch, about %s left",
            self.name,
            done,
            total,
            per_epoch,
            _duration(per_epoch * (total - done)),
        )
