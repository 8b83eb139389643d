"""TransFusion (ECCV 2024): transparency-based diffusion for anomaly detection and localisation.

`torch_model` (network, schedule, reverse process), `loss`, `anomalies` (the synthetic-anomaly generator),
`image_ops` (its batched image operations), `lightning_model` (``TransFusion``, imported lazily so the
pure parts never need Lightning).
"""

from mvtec_seg.models.transfusion.anomalies import AnomalyGenerator, estimate_foreground
from mvtec_seg.models.transfusion.image_ops import perlin_noise
from mvtec_seg.models.transfusion.loss import TransFusionLoss
from mvtec_seg.models.transfusion.torch_model import TransFusionModel, TransFusionUNet

__all__ = [
    "AnomalyGenerator",
    "TransFusionLoss",
    "TransFusionModel",
    "TransFusionUNet",
    "estimate_foreground",
    "perlin_noise",
]


def __getattr__(name: str):
    """Lazy access to the LightningModule (``TransFusion``) so importing this package never needs it."""
    if name == "TransFusion":
        from mvtec_seg.models.transfusion.lightning_model import TransFusion

        return TransFusion
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
