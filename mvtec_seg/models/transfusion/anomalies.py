"""Synthetic anomalies for TransFusion training: Perlin masks filled with a foreign or shuffled appearance.

Per anomalous image (half of each batch, the first ``B // 2`` rows, at least one):

* mask ``M``: 2-D Perlin noise at random power-of-two scales (1..32 cells per side, independently per axis),
  rotated by a random angle in [-90, 90] degrees, thresholded at ``|n| > 0.5`` and cut to the foreground;
* appearance ``e``: with probability 0.5 a texture (an image from ``texture_dir`` such as DTD, or a built-in
  procedural texture when no folder is configured; nothing is downloaded), otherwise the image itself with
  its 8x8 grid of patches shuffled; either way passed through 3 of 10 random photometric/geometric
  augmentations;
* previous-step mask: the same noise thresholded at a random level (the max of the noise / U(0.5,1) / 0.5 /
  U(0,0.5), one each with probability 1/4), cut to the foreground, i.e. a too-small, exact or too-large
  version of ``M`` that teaches the network to correct its previous estimate. (The model zeroes it at the
  first step ``t = T-1``.)

Finally every image of the batch (normal or not) is rotated together with its masks by U(-20, 20) degrees
with probability 0.3 (nearest-neighbour, grey fill).

Foreground (object categories): pixels whose colour differs from the median colour of the image border by
more than ``foreground_threshold`` in some channel; isolated pixels are dropped (3x3 majority), holes not
connected to the border are filled, and the result is dilated by about 3 % of the image side. If that finds
less than 1 % of the image, the whole image is used. A folder of ready masks (``foreground_dir``) or a
tensor passed to `AnomalyGenerator.generate` overrides the rule. Texture categories use the whole image.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from scipy import ndimage
from torch import Tensor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


# -- noise -----------------------------------------------------------------------------------------------------
def _fade(t: Tensor) -> Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(
    height: int,
    width: int,
    res_y: Tensor,
    res_x: Tensor,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Batch of 2-D gradient (Perlin) noise ``[B,H,W]``, roughly in [-1, 1], ``res_y[b] x res_x[b]`` cells.

    Fully vectorised over the batch and the pixels: the gradient lattices of different sizes share one padded
    tensor and each pixel gathers its four corner gradients. Any H, W work (no divisibility needed).
    """
    res_y, res_x = res_y.long().cpu(), res_x.long().cpu()
    b, ny, nx = res_y.numel(), int(res_y.max()) + 1, int(res_x.max()) + 1
    angles = 2 * math.pi * torch.rand(b, ny, nx, generator=generator).to(device=device, dtype=dtype)
    grad_y, grad_x = angles.cos().flatten(), angles.sin().flatten()
    y = torch.arange(height, device=device, dtype=dtype)[None] * (res_y.to(device, dtype)[:, None] / height)
    x = torch.arange(width, device=device, dtype=dtype)[None] * (res_x.to(device, dtype)[:, None] / width)
    iy, ix = y.floor().long(), x.floor().long()
    fy, fx = (y - iy)[:, :, None], (x - ix)[:, None, :]  # [B,H,1], [B,1,W]
    cell = (torch.arange(b, device=device)[:, None, None] * ny + iy[:, :, None]) * nx + ix[:, None, :]

    def corner(dy: int, dx: int) -> Tensor:
        """Dot product of the (dy, dx) corner's gradient with the offset to it, for every pixel."""
        idx = cell + (dy * nx + dx)
        return grad_y[idx] * (fy - dy) + grad_x[idx] * (fx - dx)

    u, v = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(1, 0), u)
    bottom = torch.lerp(corner(0, 1), corner(1, 1), u)
    return math.sqrt(2) * torch.lerp(top, bottom, v)


def rotate(images: Tensor, degrees: Tensor, mode: str = "nearest", fill: float = 0.0) -> Tensor:
    """Rotate each ``[B,C,H,W]`` image about its centre by its own angle (one batched ``grid_sample``)."""
    b, _, h, w = images.shape
    rad = degrees.to(device=images.device, dtype=images.dtype) * (math.pi / 180)
    cos, sin = rad.cos(), rad.sin()
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 1] = cos, sin * (h / w)
    theta[:, 1, 0], theta[:, 1, 1] = -sin * (w / h), cos
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    out = F.grid_sample(images - fill, grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out + fill


# -- foreground ------------------------------------------------------------------------------------------------
def _fill_holes(fg: Tensor) -> Tensor:
    """Fill regions not connected to the image border (e.g. a dark bottle interior seen from above)."""
    filled = [ndimage.binary_fill_holes(m) for m in fg[:, 0].detach().cpu().numpy() > 0.5]
    return torch.from_numpy(np.stack(filled))[:, None].to(device=fg.device, dtype=fg.dtype)


def estimate_foreground(images: Tensor, threshold: float = 0.1, min_fraction: float = 0.01) -> Tensor:
    """Foreground ``[B,1,H,W]`` in {0,1} by the border-colour rule described in the module docstring."""
    b, c, h, w = images.shape
    bw = max(1, round(0.03 * min(h, w)))
    border = torch.cat(
        [
            images[..., :bw, :].flatten(2),
            images[..., -bw:, :].flatten(2),
            images[..., bw:-bw, :bw].flatten(2),
            images[..., bw:-bw, -bw:].flatten(2),
        ],
        dim=2,
    )
    ref = border.median(dim=2).values[..., None, None]
    fg = ((images - ref).abs().amax(1, keepdim=True) > threshold).to(images.dtype)
    fg = (F.avg_pool2d(fg, 3, stride=1, padding=1, count_include_pad=False) > 0.5).to(images.dtype)
    fg = _fill_holes(fg)
    k = 2 * max(1, round(0.015 * min(h, w))) + 1
    fg = F.max_pool2d(fg, k, stride=1, padding=k // 2)
    too_small = fg.flatten(1).mean(1) < min_fraction
    return torch.where(too_small.view(-1, 1, 1, 1), torch.ones_like(fg), fg)


def load_foreground_masks(folder: Path, paths: list[str], size: tuple[int, int]) -> Tensor:
    """Ready-made masks ``[B,1,H,W]`` from ``folder`` (``<folder>/<path>`` with a .png suffix, else
    ``<folder>/<file name>.png``), prepared as the official run prepares the authors' masks
    (``dataset/BGMaskDataset.py`` at 4e8e961): grey level resized bilinearly to the image size, thresholded
    at 0.5 (of 255), then dilated with a 5 x 5 square. Without ``foreground_dir`` the border-colour estimate
    (`estimate_foreground`) is the fallback."""
    masks = []
    for p in paths:
        rel = Path(p).with_suffix(".png")
        candidates = [folder / rel, folder / rel.name]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ValueError(
                f"foreground_dir {folder} has no mask for {p} (looked for {candidates[0]} and {candidates[1]}): "
                "add the mask or set foreground_dir to null to use the border-colour rule"
            )
        grey = torch.from_numpy(np.asarray(Image.open(found).convert("L"), dtype=np.float32) / 255.0)
        masks.append(F.interpolate(grey[None, None], size=size, mode="bilinear", align_corners=False)[0])
    fg = (torch.stack(masks) > 0.5).float()
    return F.max_pool2d(fg, 5, stride=1, padding=2)


# -- appearances -------------------------------------------------------------------------------------------------
def _uniform(g: torch.Generator, low: float, high: float, n: int | None = None) -> Tensor | float:
    r = torch.rand(n if n is not None else 1, generator=g) * (high - low) + low
    return r if n is not None else float(r)


def procedural_textures(n: int, height: int, width: int, g: torch.Generator, device, dtype) -> Tensor:
    """``[n,3,H,W]`` textures in [0,1]: fractal noise, warped stripes, checkers or blobs in 2 random colours,
    modulated by fine fractal detail. The offline stand-in for DTD."""
    octaves = 3
    base = torch.randint(1, 5, (n,), generator=g)
    fractal = sum(
        (0.5**o)
        * perlin_noise(
            height, width, (base * 2**o).clamp(max=64), (base * 2**o).clamp(max=64), g, device, dtype
        )
        for o in range(octaves)
    )
    detail = perlin_noise(height, width, torch.full((n,), 32), torch.full((n,), 32), g, device, dtype)
    yy = torch.linspace(0, 1, height, device=device, dtype=dtype).view(1, height, 1)
    xx = torch.linspace(0, 1, width, device=device, dtype=dtype).view(1, 1, width)
    theta = (_uniform(g, 0, math.pi, n)).to(device, dtype).view(n, 1, 1)
    freq = (_uniform(g, 4, 40, n)).to(device, dtype).view(n, 1, 1)
    warp = (_uniform(g, 0, 3, n)).to(device, dtype).view(n, 1, 1)
    phase = 2 * math.pi * freq * (xx * theta.cos() + yy * theta.sin()) + warp * fractal
    stripes = 0.5 + 0.5 * phase.sin()
    squares = (freq * xx).floor() + (freq * yy).floor()
    patterns = torch.stack(
        [
            (fractal * 0.7 + 0.5).clamp(0, 1),
            stripes,
            (stripes > 0.5).to(dtype),
            (squares % 2 + 0.3 * fractal).clamp(0, 1),
            (fractal.abs() > 0.3).to(dtype),
        ],
        dim=1,
    )  # [n,5,H,W]
    kind = torch.randint(0, patterns.shape[1], (n,), generator=g).to(device)
    v = patterns[torch.arange(n, device=device), kind][:, None]  # [n,1,H,W]
    c1 = torch.rand(n, 3, 1, 1, generator=g).to(device, dtype)
    c2 = torch.rand(n, 3, 1, 1, generator=g).to(device, dtype)
    tex = c1 * (1 - v) + c2 * v
    return (tex * (1 + 0.25 * detail[:, None])).clamp(0, 1)


_RGB2YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
)


def _to_uint8(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _augment_one(img: Tensor, op: int, g: torch.Generator) -> Tensor:
    """One of the 10 published augmentations on a float32 ``[3,H,W]`` image in [0,1]."""
    if op == 0:  # per-channel gamma contrast
        gamma = _uniform(g, math.log(0.5), math.log(2.0), 3).exp().to(img).view(3, 1, 1)
        return img.clamp_min(0) ** gamma
    if op == 1:  # brightness multiply and add
        return img * _uniform(g, 0.8, 1.2) + _uniform(g, -30 / 255, 30 / 255)
    if op == 2:  # sharpness
        return TF.adjust_sharpness(img, _uniform(g, 0.0, 2.0))
    if op == 3:  # hue rotation and saturation scaling: one 3x3 colour matrix in YIQ space
        angle, sat = _uniform(g, -0.4 * math.pi, 0.4 * math.pi), _uniform(g, 0.6, 1.4)
        c, s = sat * math.cos(angle), sat * math.sin(angle)
        rot = _RGB2YIQ.new_tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
        m = (torch.linalg.inv(_RGB2YIQ) @ rot @ _RGB2YIQ).to(img)
        return torch.einsum("ij,jhw->ihw", m, img)
    if op == 4:  # solarize half of the time
        return TF.solarize(img, _uniform(g, 32 / 255, 128 / 255)) if _uniform(g, 0, 1) < 0.5 else img
    if op == 5:  # posterize
        bits = int(torch.randint(1, 9, (1,), generator=g))
        return TF.posterize(_to_uint8(img), bits).float() / 255
    if op == 6:
        return 1 - img
    if op == 7:
        return TF.autocontrast(img)
    if op == 8:
        return TF.equalize(_to_uint8(img)).float() / 255
    return rotate(img[None], torch.tensor([_uniform(g, -45, 45)]), mode="bilinear")[0]


def augment(images: Tensor, g: torch.Generator, n_ops: int = 3) -> Tensor:
    """Apply ``n_ops`` distinct random augmentations (of 10) to each image; result clipped to [0,1]."""
    out = []
    for img in images:
        x = img.float().clamp(0, 1)
        for op in torch.randperm(10, generator=g)[:n_ops].tolist():
            x = _augment_one(x, op, g).clamp(0, 1)
        out.append(x)
    return torch.stack(out).to(images.dtype)


def shuffle_patches(images: Tensor, g: torch.Generator, grid: int = 8) -> Tensor:
    """Cut each image into a ``grid x grid`` lattice and shuffle the cells (own random order per image)."""
    b, c, h, w = images.shape
    ph, pw = math.ceil(h / grid), math.ceil(w / grid)
    x = images
    if (ph * grid, pw * grid) != (h, w):
        x = F.interpolate(images, size=(ph * grid, pw * grid), mode="bilinear", align_corners=False)
    cells = x.reshape(b, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, ph, pw)
    order = torch.argsort(torch.rand(b, grid * grid, generator=g), dim=1).to(images.device)
    cells = cells[torch.arange(b, device=images.device)[:, None], order]
    x = cells.reshape(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, ph * grid, pw * grid)
    if (ph * grid, pw * grid) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x


def list_texture_images(texture_dir: str | Path) -> list[Path]:
    """All images under ``texture_dir`` (recursively, sorted); ValueError with the fix when there are none."""
    folder = Path(texture_dir).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"texture_dir {folder} does not exist: point it at a folder of texture images "
            "(e.g. DTD's dtd/images) or set it to null to use the built-in procedural textures"
        )
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(
            f"texture_dir {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)}): add texture images "
            "(e.g. DTD's dtd/images) or set it to null to use the built-in procedural textures"
        )
    return files


# -- generator ---------------------------------------------------------------------------------------------------
class AnomalyGenerator:
    """Turns a batch of normal images into TransFusion training material (see the module docstring).

    Randomness comes from a private CPU ``torch.Generator`` (``seed``; when None, drawn from the global torch
    RNG so ``seed_everything`` still makes runs reproducible); the pixel work runs on the images' device.
    """

    def __init__(
        self,
        texture_dir: str | Path | None = None,
        object_category: bool = True,
        foreground_threshold: float = 0.1,
        foreground_dir: str | Path | None = None,
        seed: int | None = None,
        anomaly_fraction: float = 0.5,
        texture_probability: float = 0.5,
        mask_threshold: float = 0.5,
        min_perlin_scale: int = 0,
        max_perlin_scale: int = 6,
        grid_size: int = 8,
        rotation_probability: float = 0.3,
        rotation_degrees: float = 20.0,
    ) -> None:
        self.texture_files = list_texture_images(texture_dir) if texture_dir is not None else []
        self.foreground_dir = None
        if foreground_dir is not None:
            self.foreground_dir = Path(foreground_dir).expanduser()
            if not self.foreground_dir.is_dir():
                raise ValueError(
                    f"foreground_dir {self.foreground_dir} does not exist: point it at a folder of foreground "
                    "masks named like the training images, or set it to null to use the border-colour rule"
                )
        self.object_category = bool(object_category)
        self.foreground_threshold = float(foreground_threshold)
        self.anomaly_fraction = float(anomaly_fraction)
        self.texture_probability = float(texture_probability)
        self.mask_threshold = float(mask_threshold)
        self.min_perlin_scale, self.max_perlin_scale = int(min_perlin_scale), int(max_perlin_scale)
        self.grid_size = int(grid_size)
        self.rotation_probability = float(rotation_probability)
        self.rotation_degrees = float(rotation_degrees)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator().manual_seed(int(seed))

    # -- parts ------------------------------------------------------------------------------------------
    def foreground(self, images: Tensor, paths: list[str] | None = None) -> Tensor:
        """Where anomalies may go, ``[B,1,H,W]`` in {0,1}."""
        b, _, h, w = images.shape
        if not self.object_category:
            return images.new_ones(b, 1, h, w)
        if self.foreground_dir is not None:
            if paths is None:
                raise ValueError(
                    "AnomalyGenerator with foreground_dir needs the batch's image paths (paths=...)"
                )
            return load_foreground_masks(self.foreground_dir, paths, (h, w)).to(images)
        return estimate_foreground(images, self.foreground_threshold)

    def _noise(self, n: int, h: int, w: int, device, dtype) -> Tensor:
        g = self.generator
        lo, hi = self.min_perlin_scale, self.max_perlin_scale
        res_y = 2 ** torch.randint(lo, hi, (n,), generator=g)
        res_x = 2 ** torch.randint(lo, hi, (n,), generator=g)
        noise = perlin_noise(h, w, res_y, res_x, g, device, dtype)
        angles = _uniform(g, -90, 90, n)
        return rotate(noise[:, None], angles, mode="bilinear")[:, 0]

    def masks(self, fg: Tensor) -> tuple[Tensor, Tensor]:
        """Perlin mask and its randomly thresholded previous-step variant, both ``[n,1,H,W]`` and within
        ``fg``; the mask is never empty (re-drawn, finally the top 5 % of the foreground noise)."""
        n, _, h, w = fg.shape
        noise = self._noise(n, h, w, fg.device, fg.dtype)
        for _ in range(10):
            empty = ((noise.abs() > self.mask_threshold) & (fg[:, 0] > 0.5)).flatten(1).sum(1) == 0
            if not empty.any():
                break
            idx = empty.nonzero()[:, 0]
            noise[idx] = self._noise(len(idx), h, w, fg.device, fg.dtype)
        mag = noise.abs() * fg[:, 0]
        thr = torch.full((n,), self.mask_threshold, dtype=fg.dtype, device=fg.device)
        empty = (mag > thr[:, None, None]).flatten(1).sum(1) == 0
        if empty.any():  # last resort: the strongest 5 % of the foreground, never nothing
            q = torch.quantile(mag.flatten(1).float(), 0.95, dim=1).to(fg.dtype)
            thr = torch.where(empty, torch.minimum(q, mag.flatten(1).amax(1)) * (1 - 1e-6), thr)
        mask = (mag > thr[:, None, None]).to(fg.dtype)

        g = self.generator
        choice = torch.randint(0, 4, (n,), generator=g)
        u = torch.rand(n, generator=g)
        corrupt = torch.where(
            choice == 0,
            noise.flatten(1).amax(1).cpu(),
            torch.where(
                choice == 1, 0.5 + 0.5 * u, torch.where(choice == 2, torch.full_like(u, 0.5), 0.5 - 0.5 * u)
            ),
        ).to(fg.device, fg.dtype)
        prev = (noise.abs() > corrupt[:, None, None]).to(fg.dtype) * fg[:, 0]
        return mask[:, None], prev[:, None]

    def appearances(self, images: Tensor) -> Tensor:
        """Anomaly appearance per image, ``[n,3,H,W]`` in [0,1]: texture or shuffled own patches, augmented."""
        g = self.generator
        n, _, h, w = images.shape
        use_texture = torch.rand(n, generator=g) < self.texture_probability
        out = images.clone()
        ti = use_texture.nonzero()[:, 0].tolist()
        if ti:
            out[ti] = self.textures(len(ti), h, w, images.device, images.dtype)
        out = augment(out, g)
        si = (~use_texture).nonzero()[:, 0].tolist()
        if si:
            out[si] = shuffle_patches(out[si], g, self.grid_size)
        return out

    def textures(self, n: int, h: int, w: int, device, dtype) -> Tensor:
        """``n`` textures: random images from ``texture_dir`` when configured, procedural ones otherwise."""
        if not self.texture_files:
            return procedural_textures(n, h, w, self.generator, device, dtype)
        picks = torch.randint(0, len(self.texture_files), (n,), generator=self.generator).tolist()
        arrays = []
        for i in picks:
            with Image.open(self.texture_files[i]) as im:
                arrays.append(np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR)))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device=device, dtype=dtype) / 255

    # -- main -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, images: Tensor, foreground: Tensor | None = None, paths: list[str] | None = None
    ) -> dict[str, Tensor]:
        """Batch of normal images ``[B,3,H,W]`` in [0,1] -> training material.

        Returns ``x0`` (the clean image, possibly rotated) ``[B,3,H,W]``, ``mask`` ``[B,1,H,W]`` in {0,1},
        ``appearance`` ``[B,3,H,W]`` in [0,1] (only meaningful where ``mask`` is 1; 0.5 for normal rows),
        ``prev_mask`` ``[B,1,H,W]`` in {0,1}, ``has_anomaly`` bool ``[B]`` (the first ``max(1, B//2)`` rows)
        and ``foreground`` ``[B,1,H,W]`` (rotated like the rest). ``foreground`` as input overrides the rule.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"AnomalyGenerator expects [B,3,H,W] images, got {tuple(images.shape)}")
        b, _, h, w = images.shape
        x0 = images.clone()
        fg = foreground.to(images).clone() if foreground is not None else self.foreground(images, paths)
        fg = (fg > 0.5).to(images.dtype)
        empty_fg = fg.flatten(1).amax(1) == 0  # nowhere to put an anomaly: use the whole image
        fg[empty_fg] = 1
        n_anom = min(b, max(1, math.floor(b * self.anomaly_fraction)))

        mask = images.new_zeros(b, 1, h, w)
        prev = images.new_zeros(b, 1, h, w)
        appearance = images.new_full((b, 3, h, w), 0.5)
        mask[:n_anom], prev[:n_anom] = self.masks(fg[:n_anom])
        appearance[:n_anom] = self.appearances(images[:n_anom])
        has_anomaly = torch.zeros(b, dtype=torch.bool, device=images.device)
        has_anomaly[:n_anom] = True

        g = self.generator
        rot = torch.rand(b, generator=g) < self.rotation_probability
        angles = _uniform(g, -self.rotation_degrees, self.rotation_degrees, b)
        idx = rot.nonzero()[:, 0].to(images.device)
        if len(idx):
            a = angles[rot]
            r_mask = rotate(mask[idx], a)
            # keep an anomalous sample unrotated if rotation would push its whole mask out of the frame
            lost = has_anomaly[idx] & (r_mask.flatten(1).sum(1) == 0)
            keep = idx[~lost]
            a = a[~lost.cpu()]
            if len(keep):
                x0[keep] = rotate(x0[keep], a, fill=0.5)
                appearance[keep] = rotate(appearance[keep], a, fill=0.5)
                mask[keep] = rotate(mask[keep], a)
                prev[keep] = rotate(prev[keep], a)
                fg[keep] = rotate(fg[keep], a)
        return {
            "x0": x0,
            "mask": mask,
            "appearance": appearance,
            "prev_mask": prev,
            "has_anomaly": has_anomaly,
            "foreground": fg,
        }

    __call__ = generate
