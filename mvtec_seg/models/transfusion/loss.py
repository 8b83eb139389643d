"""TransFusion training objective: mask, anomaly-appearance, normal-appearance and next-step terms.

The four groups are summed with unit weights, as published:

* mask:    ``5 * focal(logits, M) + smooth_l1(sigmoid(logits), M)``
* anomaly: ``mse(noise, beta_t * M * e)``  (the appearance target is scaled by the step's opacity)
* normal:  ``(1 - SSIM(mean, x0)) + l1(mean, x0)``
* step:    ``mse(reverse_step(predictions), reverse_step(ground truth))``: the predicted and the actual
  ``x_{t-1}``, so the three heads are also trained to be consistent with each other.

All terms are computed in float32 so autocast training stays numerically safe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure
from torchvision.ops import sigmoid_focal_loss

from mvtec_seg.models.transfusion.torch_model import reverse_step


class TransFusionLoss(nn.Module):
    """Consumes `TransFusionModel.training_forward` outputs; returns named terms plus ``loss`` (their sum).

    ``data_range=2`` because the network works in [-1, 1]; SSIM uses the usual 11x11 Gaussian window
    (sigma 1.5).
    """

    def __init__(
        self,
        focal_weight: float = 5.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        ssim_kernel: int = 11,
        ssim_sigma: float = 1.5,
        data_range: float = 2.0,
    ) -> None:
        super().__init__()
        self.focal_weight = focal_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.ssim_kernel = ssim_kernel
        self.ssim_sigma = ssim_sigma
        self.data_range = data_range

    def forward(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        f = {k: v.float() for k, v in out.items() if isinstance(v, Tensor)}
        logits, mask = f["mask_logits"], f["mask"]
        prob = torch.sigmoid(logits)

        focal = sigmoid_focal_loss(
            logits, mask, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="mean"
        )
        mask_smooth_l1 = F.smooth_l1_loss(prob, mask)
        mask_loss = self.focal_weight * focal + mask_smooth_l1

        anomaly = F.mse_loss(f["noise"], f["target_noise"])

        ssim = structural_similarity_index_measure(
            f["mean"],
            f["x0"],
            gaussian_kernel=True,
            sigma=self.ssim_sigma,
            kernel_size=self.ssim_kernel,
            data_range=self.data_range,
        )
        normal_ssim = 1.0 - ssim
        normal_l1 = F.l1_loss(f["mean"], f["x0"])
        normal = normal_ssim + normal_l1

        # The predicted mask enters the step as a hard 0.5 threshold (no gradient), as in inference.
        pred_mask = (prob.detach() > 0.5).float()
        next_pred = reverse_step(f["x_t"], f["mean"], pred_mask, f["noise"], f["beta_t"], f["beta_prev"])
        next_true = reverse_step(f["x_t"], f["x0"], mask, f["target_noise"], f["beta_t"], f["beta_prev"])
        step = F.mse_loss(next_pred, next_true)

        total = mask_loss + anomaly + normal + step
        return {
            "loss": total,
            "mask": mask_loss,
            "mask_focal": focal,
            "mask_smooth_l1": mask_smooth_l1,
            "anomaly": anomaly,
            "normal": normal,
            "normal_ssim": normal_ssim,
            "normal_l1": normal_l1,
            "step": step,
        }
