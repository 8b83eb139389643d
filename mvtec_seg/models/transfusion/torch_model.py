"""TransFusion (Fučka, Zavrtanik, Skočaj, ECCV 2024): transparency-based diffusion for anomaly detection.

Forward process (transparency diffusion over ``T`` steps, linear ``beta`` from 0 to 1)::

    x_t = (1 - M) * x0 + (1 - beta_t) * M * x0 + beta_t * M * e

where ``M`` is the anomaly mask and ``e`` the anomaly appearance. The network sees ``x_t``, the previous
step's mask and a positional channel, and predicts three things: the *scaled* anomaly appearance
(``beta_t * M * e``, called "noise"), the normal appearance (``x0``, called "mean") and mask logits.

Inference starts from the test image with an all-zero mask and walks ``t = T-2 .. 1`` as the official
evaluation does (``reverse="official"``: T-2 network calls, t = T-1 never evaluated, the sum of the masks
divided by T-1; `REVERSE_MODES`); each step removes the predicted anomaly appearance inside the
(0.5-thresholded) predicted mask and blends in the predicted normal appearance (``reverse_step``). The
anomaly map mixes the mean mask with the reconstruction error of the final image, each box-filtered.

The network works in ``[-1, 1]`` like the published method; every public method of `TransFusionModel`
takes images in ``[0, 1]`` (the project's convention) and converts internally.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REVERSE_MODES: dict[str, str] = {
    "official": "t = T-2 .. 1 (T-2 network calls), sum of the masks / (T-1): the official evaluation "
    "(utils/EvaluationUtils.py:16, 26, 42 at 4e8e961), so numbers are comparable with the paper",
    "all_steps": "t = T-1 .. 1 (T-1 calls), mean of the T-1 masks: also evaluates the step training starts "
    "from (empty mask input at t = T-1), which the official loop skips",
}
"""``reverse`` settings of `TransFusionModel` (``teacher.params.net.reverse``)."""


def _groups(preferred: int, channels: int) -> int:
    """Largest divisor of ``channels`` not above ``preferred``, so tiny test models still build."""
    return math.gcd(preferred, channels)


def positional_channel(height: int, width: int, like: Tensor) -> Tensor:
    """The single positional-encoding input channel ``[1,1,H,W]``.

    The published model asks a 2-D sinusoidal encoder (interleaved sin/cos of the row, then of the column
    coordinate) for one channel; truncated to one channel that encoding is ``sin(row index)`` at frequency 1,
    constant along each row. We reproduce that exactly so the input statistics match the method.
    """
    rows = torch.arange(height, device=like.device, dtype=like.dtype)
    return rows.sin().view(1, 1, height, 1).expand(1, 1, height, width)


def box_filter(x: Tensor, kernel_size: int) -> Tensor:
    """``[B,H,W]`` mean filter with zero padding ("same" size), as the published evaluation smooths its maps."""
    if kernel_size <= 1:
        return x
    weight = x.new_full((1, 1, kernel_size, kernel_size), 1.0 / kernel_size**2)
    return F.conv2d(x.unsqueeze(1), weight, padding=kernel_size // 2)[:, 0]


def reverse_step(
    x_t: Tensor, mean: Tensor, mask: Tensor, noise: Tensor, beta_t: Tensor, beta_prev: Tensor
) -> Tensor:
    """One reverse transparency step ``x_t -> x_{t-1}``.

    ``noise`` estimates ``beta_t * M * e``, so ``noise / beta_t`` is the anomaly appearance; moving from
    ``beta_t`` to ``beta_{t-1}`` removes ``(beta_t - beta_{t-1})`` of it and adds the same share of the normal
    appearance ``mean``, inside the binary ``mask`` only. ``beta_t`` must be > 0 (t >= 1).
    """
    diff = beta_t - beta_prev
    return x_t - (diff / beta_t) * mask * noise + diff * mask * mean


# -- network -------------------------------------------------------------------------------------------------
class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` that keeps autocast's low-precision activations in low precision.

    CUDA autocast runs ``group_norm`` in float32: every call upcasts its bf16 input, writes a float32 output,
    the SiLU after it reads and writes float32, and the next convolution casts it back to bf16. In the
    published network those casts moved more bytes than every convolution's inputs and outputs together.
    The kernel accumulates its statistics in float32 either way; only
    the output is rounded to bf16, as the next convolution would round it. Weight and bias are cast like a
    convolution's. Without autocast (float32, float64) this is exactly `nn.GroupNorm`.
    """

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type  # "meta" (FLOP counting) has no autocast to ask about
        if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device)
        weight, bias = (None if p is None else p.to(dtype) for p in (self.weight, self.bias))
        with torch.autocast(device, enabled=False):
            return F.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of the integer step followed by a two-layer MLP (``dim/4 -> dim -> dim``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.fc1 = nn.Linear(dim // 4, dim)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, t: Tensor) -> Tensor:
        # sinusoids in the weights' dtype (float32 under autocast: bf16 would blur sin(19 * f))
        dtype = self.fc1.weight.dtype
        half = self.dim // 8
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=dtype) * (-math.log(10_000) / (half - 1)))
        angles = t.to(dtype)[:, None] * freqs[None, :]
        emb = torch.cat((angles.sin(), angles.cos()), dim=1)
        return self.fc2(self.act(self.fc1(emb)))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added after the first conv."""

    def __init__(
        self, in_ch: int, out_ch: int, time_ch: int, dropout: float = 0.0, norm_groups: int = 32
    ) -> None:
        super().__init__()
        self.norm1 = GroupNorm(_groups(norm_groups, in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_ch, out_ch)
        self.norm2 = GroupNorm(_groups(norm_groups, out_ch), out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.time_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(self.act(self.norm2(h))))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Single-head self-attention over all positions with a residual connection (no pre-norm, as published)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = self.qkv(tokens).unsqueeze(1).chunk(3, dim=-1)  # each [B, 1, HW, C]
        attended = F.scaled_dot_product_attention(q, k, v)[:, 0]
        out = self.out(attended) + tokens
        return out.transpose(1, 2).reshape(b, c, h, w)


class Level(nn.Module):
    """A residual block optionally followed by self-attention: the unit of both U-Net paths."""

    def __init__(
        self, in_ch: int, out_ch: int, time_ch: int, attention: bool, dropout: float, norm_groups: int
    ) -> None:
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, time_ch, dropout, norm_groups)
        self.attn = SelfAttention(out_ch) if attention else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return self.attn(self.res(x, temb))


class TransFusionUNet(nn.Module):
    """Diffusion U-Net with three heads: anomaly appearance (3 ch), normal appearance (3 ch), mask logits.

    Channel multipliers compound level to level as in the published network (``[1, 2, 2, 2]`` with 64 base
    channels gives 64, 128, 256, 512 channels). Each level has ``num_res_blocks`` blocks going down and
    ``num_res_blocks + 1`` coming up (the extra one consumes the skip taken before the level's first block).
    """

    def __init__(
        self,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] | None = None,
        dropout: float = 0.0,
        image_channels: int = 3,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        n_levels = len(channel_mult)
        if attention_levels is None:  # the two lowest resolutions
            attention_levels = range(max(0, n_levels - 2), n_levels)
        attn = {int(i) % n_levels for i in attention_levels}
        time_ch = 4 * base_channels
        self.time_embed = TimeEmbedding(time_ch)
        self.stem = nn.Conv2d(image_channels + 2, base_channels, 3, padding=1)  # + previous mask + position

        self.down = nn.ModuleList()
        ch, skip_channels = base_channels, [base_channels]
        for i, mult in enumerate(channel_mult):
            out = ch * int(mult)
            for _ in range(num_res_blocks):
                self.down.append(Level(ch, out, time_ch, i in attn, dropout, norm_groups))
                ch = out
                skip_channels.append(ch)
            if i < n_levels - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_channels.append(ch)

        self.mid1 = ResBlock(ch, ch, time_ch, dropout, norm_groups)
        self.mid_attn = SelfAttention(ch)
        self.mid2 = ResBlock(ch, ch, time_ch, dropout, norm_groups)

        self.up = nn.ModuleList()
        for i in reversed(range(n_levels)):
            for _ in range(num_res_blocks + 1):
                skip = skip_channels.pop()
                out = skip
                self.up.append(Level(ch + skip, out, time_ch, i in attn, dropout, norm_groups))
                ch = out
            if i > 0:
                self.up.append(nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1))

        self.out_norm = GroupNorm(_groups(8, ch), ch)
        self.noise_head = nn.Conv2d(ch, image_channels, 3, padding=1)
        self.mean_head = nn.Conv2d(ch, image_channels, 3, padding=1)
        self.mask_head = nn.Sequential(nn.BatchNorm2d(ch), nn.SiLU(), nn.Conv2d(ch, 1, 3, padding=1))
        self.downsample_factor = 2 ** (n_levels - 1)

    def forward(self, x_t: Tensor, prev_mask: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x_t`` ``[B,3,H,W]`` in [-1,1], ``prev_mask`` ``[B,1,H,W]``, ``t`` long ``[B]`` -> noise, mean, logits."""
        b, _, h, w = x_t.shape
        if h % self.downsample_factor or w % self.downsample_factor:
            raise ValueError(
                f"TransFusion input {h}x{w} is not divisible by {self.downsample_factor}: "
                "resize images to a multiple of 2**(len(channel_mult)-1)"
            )
        pos = positional_channel(h, w, x_t).expand(b, 1, h, w)
        x = self.stem(torch.cat((x_t, prev_mask.to(x_t.dtype), pos), dim=1))
        temb = self.time_embed(t)

        skips = [x]
        for m in self.down:
            x = m(x, temb) if isinstance(m, Level) else m(x)
            skips.append(x)
        x = self.mid2(self.mid_attn(self.mid1(x, temb)), temb)
        for m in self.up:
            x = m(torch.cat((x, skips.pop()), dim=1), temb) if isinstance(m, Level) else m(x)
        noise = self.noise_head(F.silu(self.out_norm(x)))
        return noise, self.mean_head(x), self.mask_head(x)


# -- model ---------------------------------------------------------------------------------------------------
class TransFusionModel(nn.Module):
    """Pure nn.Module: the U-Net, the transparency schedule and the reverse-process inference.

    ``forward(image)`` (images in [0,1]) returns ``{"anomaly_map": [B,H,W], "pred_score": [B]}``; training
    goes through `training_forward`. Nothing is hard-coded to a device or dtype: buffers move with ``.to()``,
    intermediate tensors follow their inputs, so ``model.double()`` and autocast both work.
    """

    def __init__(
        self,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] | None = None,
        dropout: float = 0.0,
        num_steps: int = 20,
        image_size: int = 256,
        map_weight: float = 0.95,
        smoothing_kernel: int = 7,
        norm_groups: int = 32,
        reverse: str = "official",
    ) -> None:
        super().__init__()
        if reverse not in REVERSE_MODES:
            raise ValueError(f"model.reverse={reverse!r} is not one of {sorted(REVERSE_MODES)}")
        if num_steps < 3:
            raise ValueError(f"model.num_steps={num_steps} is too small: TransFusion needs at least 3 steps")
        if smoothing_kernel < 1 or smoothing_kernel % 2 == 0:
            raise ValueError(f"model.smoothing_kernel={smoothing_kernel} must be a positive odd integer")
        self.net = TransFusionUNet(
            base_channels=base_channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            attention_levels=attention_levels,
            dropout=dropout,
            norm_groups=norm_groups,
        )
        if image_size % self.net.downsample_factor:
            raise ValueError(
                f"image_size={image_size} is not divisible by {self.net.downsample_factor} "
                f"(2**(len(channel_mult)-1)): pick a multiple of it"
            )
        self.num_steps = int(num_steps)
        self.image_size = int(image_size)
        self.map_weight = float(map_weight)
        self.smoothing_kernel = int(smoothing_kernel)
        self.reverse = reverse
        self.register_buffer("betas", torch.linspace(0.0, 1.0, self.num_steps), persistent=False)

    # -- helpers ----------------------------------------------------------------------------------------
    @staticmethod
    def to_model_space(image: Tensor) -> Tensor:
        """[0,1] -> [-1,1], the range the published network was trained in."""
        return image * 2 - 1

    @staticmethod
    def to_image_space(x: Tensor) -> Tensor:
        """[-1,1] -> [0,1], clipped (as the published evaluation does before the reconstruction error)."""
        return ((x + 1) / 2).clamp(0, 1)

    def beta(self, t: Tensor, like: Tensor) -> Tensor:
        """``beta_t`` for a long ``[B]`` step tensor, as ``[B,1,1,1]`` in ``like``'s dtype/device.

        The schedule is made in ``like``'s dtype, as the official code makes it in the default dtype: a
        float32 schedule cast to float64 is off by ~1e-8 per step, which reaches 2e-6 in the reconstruction.
        """
        betas = torch.linspace(0.0, 1.0, self.num_steps, dtype=like.dtype, device=like.device)
        return betas[t.to(like.device)].view(-1, 1, 1, 1)

    def sample_timesteps(self, batch_size: int, device: torch.device | str, generator=None) -> Tensor:
        """Training steps drawn uniformly from ``1 .. T-1`` (step 0 is the clean image), on ``device``."""
        return torch.randint(1, self.num_steps, (batch_size,), generator=generator, device=device)

    def q_sample(self, x0: Tensor, mask: Tensor, appearance: Tensor, t: Tensor) -> Tensor:
        """Forward transparency process: blend ``appearance`` into ``x0`` inside ``mask`` with opacity beta_t.

        Affine-equivariant (the weights sum to one per pixel), so it may be called in [0,1] or [-1,1] space
        as long as ``x0`` and ``appearance`` share it.
        """
        beta = self.beta(t, x0)
        mask = mask.to(x0.dtype)
        return (1 - mask) * x0 + (1 - beta) * mask * x0 + beta * mask * appearance

    # -- training ---------------------------------------------------------------------------------------
    def training_outputs(self, x_t: Tensor, prev_mask: Tensor, t: Tensor) -> dict[str, Tensor]:
        """Raw network predictions for ``x_t`` in [-1,1]: ``noise`` (estimates beta_t*M*e), ``mean`` (x0),
        ``mask_logits``."""
        noise, mean, logits = self.net(x_t, prev_mask, t)
        return {"noise": noise, "mean": mean, "mask_logits": logits}

    def training_forward(
        self, x0: Tensor, mask: Tensor, appearance: Tensor, prev_mask: Tensor, t: Tensor
    ) -> dict[str, Tensor]:
        """Everything `TransFusionLoss` needs for one training batch (inputs in [0,1], outputs in [-1,1]).

        ``prev_mask`` is zeroed where ``t == T-1``: the reverse process always starts with an empty mask.
        The anomaly appearance is masked in model space, so outside ``mask`` the target "noise" is exactly 0.
        """
        x0m = self.to_model_space(x0)
        mask = mask.to(x0m.dtype)
        appearance_m = self.to_model_space(appearance) * mask
        first = (t == self.num_steps - 1).to(x0m.device).view(-1, 1, 1, 1)
        prev_mask = torch.where(first, torch.zeros_like(prev_mask), prev_mask).to(x0m.dtype)
        x_t = self.q_sample(x0m, mask, appearance_m, t)
        beta_t = self.beta(t, x0m)
        out = self.training_outputs(x_t, prev_mask, t)
        out.update(
            x_t=x_t,
            x0=x0m,
            mask=mask,
            target_noise=beta_t * appearance_m,
            beta_t=beta_t,
            beta_prev=self.beta(t - 1, x0m),
        )
        return out

    # -- inference --------------------------------------------------------------------------------------
    def forward(self, image: Tensor) -> dict[str, Tensor]:
        """Inference on ``image`` [B,3,H,W] in [0,1] (see `predict`)."""
        return self.predict(image)

    def reverse_steps(self) -> range:
        """The steps the reverse process evaluates, first to last (`REVERSE_MODES`)."""
        first = self.num_steps - 2 if self.reverse == "official" else self.num_steps - 1
        return range(first, 0, -1)

    @torch.no_grad()
    def reverse_process(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """Whole-batch reverse process over `reverse_steps` (official: ``t = T-2`` down to 1).

        Returns the mean mask ``[B,H,W]`` (sum of the per-step mask probabilities divided by ``T-1`` in both
        modes) and the final image ``[B,3,H,W]`` in [-1,1]. Each step thresholds the predicted probability at
        0.5; that binary mask drives the image update and is the next step's mask input.
        """
        x = self.to_model_space(image)
        b, _, h, w = x.shape
        mask = x.new_zeros(b, 1, h, w)
        prob_sum = x.new_zeros(b, 1, h, w)
        for step in self.reverse_steps():
            t = torch.full((b,), step, dtype=torch.long, device=x.device)
            noise, mean, logits = self.net(x, mask, t)
            prob = torch.sigmoid(logits).to(x.dtype)
            prob_sum = prob_sum + prob
            mask = (prob > 0.5).to(x.dtype)
            x = reverse_step(
                x, mean.to(x.dtype), mask, noise.to(x.dtype), self.beta(t, x), self.beta(t - 1, x)
            )
        return prob_sum[:, 0] / (self.num_steps - 1), x

    def combine(self, image: Tensor, mean_mask: Tensor, final: Tensor) -> Tensor:
        """Anomaly map ``w * box(mask) + (1 - w) * box(recon error)`` (see `map_terms`)."""
        return self.map_terms(image, mean_mask, final)["anomaly_map"]

    def map_terms(self, image: Tensor, mean_mask: Tensor, final: Tensor) -> dict[str, Tensor]:
        """The anomaly map and its terms, named as the official evaluation's (``mask_disc``, ``mask_recon``
        and their ``_smoothed`` forms). The reconstruction error is the channel mean of the squared
        difference between the input and the final reverse-process image, both in [0,1]."""
        recon = (image.clamp(0, 1) - self.to_image_space(final)).pow(2).mean(1)
        k = self.smoothing_kernel
        disc_s, recon_s = box_filter(mean_mask, k), box_filter(recon, k)
        return {
            "anomaly_map": self.map_weight * disc_s + (1 - self.map_weight) * recon_s,
            "mask_disc": mean_mask,
            "mask_recon": recon,
            "mask_disc_smoothed": disc_s,
            "mask_recon_smoothed": recon_s,
        }

    @torch.no_grad()
    def predict(self, image: Tensor, intermediates: bool = False) -> dict[str, Tensor]:
        """Batched inference: ``{"anomaly_map": [B,H,W], "pred_score": [B]}`` (score = max of the map).

        ``intermediates=True`` adds the `map_terms` and ``reconstruction_raw`` (the final reverse-process
        image in [-1,1]), the arrays the official evaluation computes on the way.
        """
        mean_mask, final = self.reverse_process(image)
        terms = self.map_terms(image.to(final.dtype), mean_mask, final)
        out = {"anomaly_map": terms["anomaly_map"], "pred_score": terms["anomaly_map"].flatten(1).amax(1)}
        if intermediates:
            out.update(terms, reconstruction_raw=final)
        return out
