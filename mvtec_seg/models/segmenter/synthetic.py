"""Synthetic defects with exact masks, made from normal images by the teacher's anomaly generator.

Two uses, neither of which looks at GT: a student trained on pseudo masks also sees synthetic defects pasted
on its known normal training images (`mask.synthetic_fraction`), so it learns what "unlike the normal images"
looks like with exact masks, beside the teacher's noisy ones; and the GT-free validation set
(`pseudo.synthetic_val`) scores candidates on defects pasted on the val part's normal images.

A defect is a Perlin-noise region of the foreground (object categories) or of the whole image (textures),
filled with a foreign texture or the image's own shuffled patches (`AnomalyGenerator`), blended in with an
opacity drawn per defect from `opacity` so faint defects are part of what is learned.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mvtec_seg.models.transfusion.anomalies import AnomalyGenerator


class SyntheticDefects:
    """`images [B,3,H,W]` in [0,1] -> (defective images, masks `[B,1,H,W]` in {0,1}), every row defective.

    `texture_probability`: the share of defects filled with a texture rather than shuffled own patches;
    the validation set uses a different share than training, so a student is not scored only on the kind of
    defect it was taught."""

    def __init__(
        self,
        kind: str = "object",
        seed: int = 0,
        opacity: tuple[float, float] = (0.3, 1.0),
        texture_probability: float = 0.5,
    ) -> None:
        self.generator = AnomalyGenerator(
            object_category=kind != "texture",
            seed=seed,
            anomaly_fraction=1.0,
            texture_probability=texture_probability,
            rotation_probability=0.0,
            cache_foreground=False,
        )
        self.opacity = (float(opacity[0]), float(opacity[1]))

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.generator.generate(images)
        g = self.generator.generator(images.device)
        lo, hi = self.opacity
        beta = lo + (hi - lo) * torch.rand(len(images), 1, 1, 1, generator=g, device=images.device)
        mask = out["mask"]
        blend = beta * mask
        return (images * (1 - blend) + blend * out["appearance"]).clamp(0, 1), mask

    def paste(self, batch: dict, fraction: float) -> dict:
        """The batch with a synthetic defect on each known normal row (`known_normal`: `train/good`, the
        images the teacher trains on; never read from `gt_label`) with probability `fraction`; the target there becomes the defect's exact mask (weight 1).
        Every row is generated and the chosen ones are taken with `torch.where` (no read-back)."""
        image = batch["image"]
        defective, mask = self(image)
        g = self.generator.generator(image.device)
        draw = torch.rand(len(image), generator=g, device=image.device) < fraction
        use = (draw & batch["known_normal"].to(draw.device).bool()).view(-1, 1, 1, 1)
        out = dict(batch)
        out["image"] = torch.where(use, defective, image)
        out["target_mask"] = torch.where(use, mask, batch["target_mask"])
        if batch.get("target_weight") is not None:
            out["target_weight"] = torch.where(use, torch.ones_like(mask), batch["target_weight"])
        if batch.get("soft_target") is not None:
            out["soft_target"] = torch.where(use, mask, batch["soft_target"])
        return out
