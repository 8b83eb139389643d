"""LightningModule for TransFusion, built from plain dicts so `load_from_checkpoint` works with safe loading.

Trained on normal images only: every batch gets synthetic anomalies from `AnomalyGenerator`, so no GT mask
is ever seen in training. Evaluation goes through the shared `AnomalyModule` code like every other model.

The training step never waits on the device: losses are logged as tensors, and a non-finite loss
is recorded on the device (the first bad step and its terms) and raised at the end of the epoch, before
that epoch's checkpoint is written.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mvtec_seg.errors import UserError
from mvtec_seg.models.base import AnomalyModule
from mvtec_seg.models.transfusion.anomalies import AnomalyGenerator
from mvtec_seg.models.transfusion.loss import TransFusionLoss
from mvtec_seg.models.transfusion.torch_model import TransFusionModel


class TransFusion(AnomalyModule):
    """TransFusion (Fučka et al., ECCV 2024) as a LightningModule.

    `anomalies` takes `AnomalyGenerator` arguments plus `kind` ("object": anomalies on the foreground only,
    "texture": anywhere), which the configs fill from the category. `compile`: `torch.compile` the network
    and the loss when training starts (pays only on a GPU). `channels_last`: NHWC weights
    (`AnomalyModule.use_channels_last`; `+teacher.params.channels_last=true`, off by default: on a CPU it
    speeds up the maps but not the training reliably, `docs/design.md`).
    """

    def __init__(
        self,
        net: dict,
        anomalies: dict,
        optimizer: dict,
        loss: dict | None = None,
        scheduler: dict | None = None,
        evaluation: dict | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, evaluation)
        self.save_hyperparameters()
        self.model = TransFusionModel(**net)
        self.criterion = TransFusionLoss(**(loss or {}))
        self._generator: AnomalyGenerator | None = None
        self._nonfinite: tuple[Tensor, Tensor] | None = None  # (first bad step or -1, its terms), on device
        self._term_names: list[str] = []
        self._generator_state: dict | None = None  # from a checkpoint, applied when the generator is built
        self.use_channels_last(channels_last)

    @property
    def anomaly_generator(self) -> AnomalyGenerator:
        """Built on first use (it checks texture folders, which a loaded checkpoint may not need)."""
        if self._generator is None:
            args = dict(self.hparams.anomalies)
            kind = args.pop("kind", "object")
            if self._generator_state is not None and args.get("seed") is None:
                args["seed"] = (
                    0  # replaced by the saved state below: draw nothing from the restored global RNG
                )
            try:
                self._generator = AnomalyGenerator(object_category=kind != "texture", **args)
            except ValueError as err:
                raise UserError(f"teacher.params.anomalies: {err}") from None
            if self._generator_state is not None:
                self._generator.load_state_dict(self._generator_state)
        return self._generator

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The anomaly generator's private RNG, so a resumed training draws the anomalies it would have."""
        if self._generator is not None:
            checkpoint["anomaly_generator_rng"] = self._generator.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._generator_state = checkpoint.get("anomaly_generator_rng")
        if self._generator is not None and self._generator_state is not None:
            self._generator.load_state_dict(self._generator_state)

    def on_fit_start(self) -> None:
        _ = self.anomaly_generator  # fail before the first step on a bad texture folder
        if self.hparams.get("compile"):
            self.model.net.compile()
            self.criterion.compile()

    def on_train_start(self) -> None:
        # a cached foreground is only right when a path always gives the same pixels
        loader = getattr(self.trainer, "train_dataloader", None)
        dataset = getattr(loader, "dataset", None)
        if getattr(dataset, "augment", False) or getattr(dataset, "crop", None):
            self.anomaly_generator.cache_foreground = False

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        image = batch["image"]
        material = self.anomaly_generator.generate(image, paths=batch["path"])
        t = self.model.sample_timesteps(len(image), image.device)
        out = self.model.training_forward(
            material["x0"], material["mask"], material["appearance"], material["prev_mask"], t
        )
        terms = self.criterion(out)
        self._record_nonfinite(terms)
        self.log_dict(
            {f"train/{k}": v.detach() for k, v in terms.items()},
            on_step=False,
            on_epoch=True,
            batch_size=len(image),
            sync_dist=True,
        )
        return terms["loss"]

    def _record_nonfinite(self, terms: dict[str, Tensor]) -> None:
        """Remember the first non-finite loss of the epoch on the device (no host round trip)."""
        loss = terms["loss"].detach()
        values = torch.stack([v.detach().float() for v in terms.values()])
        if self._nonfinite is None:
            self._nonfinite = (
                torch.full((), -1, dtype=torch.long, device=loss.device),
                torch.zeros_like(values),
            )
        step, kept = self._nonfinite
        first = ~torch.isfinite(loss) & (step < 0)
        self._nonfinite = (torch.where(first, self.global_step, step), torch.where(first, values, kept))
        self._term_names = list(terms)

    def on_train_epoch_end(self) -> None:
        """Raise on a non-finite loss in this epoch (one read-back per epoch), before its checkpoint."""
        if self._nonfinite is None:
            return
        step, values = self._nonfinite
        self._nonfinite = None
        if int(step) < 0:
            return
        ckpt = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or "none yet"
        terms = dict(zip(self._term_names, values.tolist(), strict=True))
        raise UserError(
            f"TransFusion loss became non-finite at epoch {self.current_epoch}, step {int(step)} "
            f"(terms: {terms}); last good checkpoint: {ckpt} — lower "
            f"teacher.params.optimizer.lr or use trainer.precision=32-true"
        )

    def anomaly_map(self, image: Tensor) -> Tensor:
        was_training = self.model.training
        self.model.eval()
        out = self.model.predict(image)["anomaly_map"]
        self.model.train(was_training)
        return out
