"""TransFusion (ECCV 2024): transparency-based diffusion for anomaly detection and localisation."""

from mvtec_seg.models.transfusion.anomalies import (
    TEXTURE_CATEGORIES,
    AnomalyGenerator,
    estimate_foreground,
    is_texture_category,
    perlin_noise,
)
from mvtec_seg.models.transfusion.loss import TransFusionLoss
from mvtec_seg.models.transfusion.torch_model import (
    PAPER_CONFIG,
    TransFusionModel,
    TransFusionUNet,
    count_parameters,
)

__all__ = [
    "PAPER_CONFIG",
    "TEXTURE_CATEGORIES",
    "AnomalyGenerator",
    "TransFusionLoss",
    "TransFusionModel",
    "TransFusionUNet",
    "count_parameters",
    "estimate_foreground",
    "is_texture_category",
    "perlin_noise",
]


def __getattr__(name: str):
    """Lazy access to the LightningModule (``TransFusion``) so importing this package never needs it."""
    if name == "TransFusion":
        from mvtec_seg.models.transfusion.lightning_model import TransFusion

        return TransFusion
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
