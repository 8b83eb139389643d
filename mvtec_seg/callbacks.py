"""Callbacks: training throughput measured inside the loop (images/s over the training steps)."""

from __future__ import annotations

import time

import pytorch_lightning as pl


class Throughput(pl.Callback):
    """Images per second over all training batches (forward, backward, optimiser step; data loading excluded
    only in the sense that the clock starts at `on_train_batch_start`). The first batch is skipped as warm-up
    when there is more than one."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._t0 = 0.0
        self._batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1
        if self._batches == 1:
            self._first = (len(batch["image"]), time.perf_counter() - self._t0)
            return
        self.images += len(batch["image"])
        self.seconds += time.perf_counter() - self._t0

    @property
    def images_per_s(self) -> float:
        if self.seconds > 0:
            return self.images / self.seconds
        if self._batches == 1 and self._first[1] > 0:
            return self._first[0] / self._first[1]
        return float("nan")
