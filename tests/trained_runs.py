"""Small trained-model fixtures built directly (no training): a run folder holding a tiny U-Net checkpoint,
and bare U-Net / TransFusion checkpoints. Used by the predict and export tests."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from conftest import compose_cfg

from mvtec_seg.builders import build_model
from mvtec_seg.inference import THRESHOLD_RULE
from mvtec_seg.models.base import AnomalyModule
from mvtec_seg.outputs import RunOutputs

TINY_UNET = [
    "data.image_size=32",
    "+model.params.net.encoder_depth=3",
    "+model.params.net.decoder_kwargs={decoder_channels: [32, 16, 8]}",
]
TINY_TRANSFUSION = [
    "model=transfusion",
    "data.image_size=32",
    "teacher.params.net.base_channels=8",
    "teacher.params.net.channel_mult=[1,2]",
    "teacher.params.net.attention_levels=[]",
    "teacher.params.net.num_steps=4",
    "teacher.params.net.norm_groups=4",
    "teacher.params.net.smoothing_kernel=3",
]


def save_checkpoint(module: AnomalyModule, path: Path) -> Path:
    """A Lightning-format checkpoint (state dict + hyperparameters), as `load_from_checkpoint` reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": pl.__version__,
        },
        path,
    )
    return path


def tiny_module(tmp_path: Path, overrides: list[str], seed: int = 0) -> AnomalyModule:
    torch.manual_seed(seed)
    module = build_model(compose_cfg(tmp_path, overrides))
    return module.eval()


def unet_run(tmp_path: Path, threshold: float | None) -> tuple[Path, AnomalyModule]:
    """A run folder (config.yaml, summary.json with `decision_threshold`, checkpoints/best.ckpt)."""
    cfg = compose_cfg(tmp_path, TINY_UNET)
    torch.manual_seed(0)
    module = build_model(cfg).eval()
    out = RunOutputs(Path(cfg.paths.run_dir), cfg)
    out.summary.checkpoint = str(save_checkpoint(module, out.run_dir / "checkpoints" / "best.ckpt"))
    out.summary.decision_threshold = {"value": threshold, "rule": THRESHOLD_RULE, "f1": None}
    out.finish("ok")
    return out.run_dir, module
