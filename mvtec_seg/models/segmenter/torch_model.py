"""Pure nn.Module around an smp architecture: logits while training, anomaly maps while evaluating."""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from torch import Tensor, nn

ARCHITECTURES = {"unet": "Unet", "deeplab": "DeepLabV3Plus", "deeplabv3plus": "DeepLabV3Plus", "fpn": "FPN"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)


def encoders() -> tuple[str, ...]:
    """The encoder names `model.params.net.encoder_name` may take (segmentation_models_pytorch's)."""
    return tuple(smp.encoders.get_encoder_names())


IMAGENET_STD = (0.229, 0.224, 0.225)


class SegmentationNet(nn.Module):
    """Images in [0,1] -> one-channel defect logits (training) or probabilities (evaluation).

    Normalisation lives here, as buffers, so callers always pass plain [0,1] images; the sigmoid is applied
    exactly once, in eval mode, and never inside the loss or the metrics.
    """

    def __init__(
        self,
        arch: str = "unet",
        encoder_name: str = "resnet18",
        encoder_weights: str | None = None,
        encoder_depth: int = 5,
        decoder_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if arch.lower() not in ARCHITECTURES:
            raise ValueError(f"model.params.net.arch={arch!r} is not one of {sorted(ARCHITECTURES)}")
        self.model = getattr(smp, ARCHITECTURES[arch.lower()])(
            encoder_name=encoder_name,
            encoder_weights=encoder_weights,
            encoder_depth=encoder_depth,
            in_channels=3,
            classes=1,
            **(decoder_kwargs or {}),
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def logits(self, image: Tensor) -> Tensor:
        return self.model((image - self.mean) / self.std)

    def forward(self, image: Tensor) -> Tensor | dict[str, Tensor]:
        logits = self.logits(image)
        if self.training:
            return logits
        amap = torch.sigmoid(logits.float())[:, 0]
        return {"anomaly_map": amap, "pred_score": amap.flatten(1).amax(1)}
