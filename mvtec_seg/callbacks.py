"""Callbacks: training throughput measured inside the loop."""

from __future__ import annotations

import time

import pytorch_lightning as pl


class Throughput(pl.Callback):
    """Training images per second, everything included (data loading, forward, backward, optimiser, hooks).

    Each epoch is timed from the end of its first batch (warm-up excluded) to the end of its last, so
    validation between epochs does not count. An epoch of one batch counts that batch alone.
    """

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._single: tuple[int, float] | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_t0 = self._t0 = time.perf_counter()
        self._mark: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        n = len(batch["image"])
        if self._mark is None:  # first batch of the epoch: warm-up
            self._mark = now
            self._single = (n, now - self._t0)
            return
        self.images += n
        self.seconds += now - self._mark
        self._mark = now

    @property
    def images_per_s(self) -> float:
        if self.seconds > 0:
            return self.images / self.seconds
        if self._single is not None and self._single[1] > 0:
            return self._single[0] / self._single[1]
        return float("nan")
