"""Batched, sync-free image operations the anomaly generator composes (`anomalies.AnomalyGenerator`).

Perlin noise, per-image rotation, procedural textures, the 10 published augmentations and patch shuffling.
Every function works on a whole batch at once with its own random parameters per image, drawn on the
images' device from a seeded ``torch.Generator`` (``g``); the few choices that fix Python control flow or a
tensor shape (lattice sizes, which augmentation) come from a host NumPy generator (``rng``), so nothing here
reads a value back from the device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor


# -- noise -----------------------------------------------------------------------------------------------------
def _host_ints(values: Tensor | Sequence[int] | np.ndarray) -> np.ndarray:
    """Integers that fix shapes, as a host array (a device tensor here would cost a synchronisation)."""
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _fade(t: Tensor) -> Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(
    height: int,
    width: int,
    res_y: Tensor | Sequence[int] | np.ndarray,
    res_x: Tensor | Sequence[int] | np.ndarray,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Batch of 2-D gradient (Perlin) noise ``[B,H,W]``, roughly in [-1, 1], ``res_y[b] x res_x[b]`` cells.

    Fully vectorised over the batch and the pixels: the gradient lattices of different sizes share one padded
    tensor and each pixel gathers its four corner gradients. Any H, W work (no divisibility needed). The
    lattice sizes are host numbers (they fix a tensor shape); ``generator`` must live on ``device``.
    """
    res_y, res_x = _host_ints(res_y), _host_ints(res_x)
    b, ny, nx = len(res_y), int(res_y.max()) + 1, int(res_x.max()) + 1
    angles = 2 * math.pi * torch.rand(b, ny, nx, generator=generator, device=device, dtype=dtype)
    grad_y, grad_x = angles.cos().flatten(), angles.sin().flatten()
    ry = torch.as_tensor(res_y, dtype=dtype).to(device, non_blocking=True)
    rx = torch.as_tensor(res_x, dtype=dtype).to(device, non_blocking=True)
    y = torch.arange(height, device=device, dtype=dtype)[None] * (ry[:, None] / height)
    x = torch.arange(width, device=device, dtype=dtype)[None] * (rx[:, None] / width)
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


# -- appearances -------------------------------------------------------------------------------------------------
def _uniform(g: torch.Generator, low: float, high: float, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """U(low, high) of ``shape`` drawn on ``like``'s device from ``g`` (a generator on that device)."""
    return torch.rand(shape, generator=g, device=like.device, dtype=like.dtype) * (high - low) + low


def _rows(rows: np.ndarray, device: torch.device) -> Tensor:
    """Host row numbers as an index tensor on ``device`` (a host-to-device copy, never a read-back)."""
    return torch.as_tensor(np.asarray(rows, dtype=np.int64)).to(device, non_blocking=True)


def procedural_textures(
    n: int, height: int, width: int, g: torch.Generator, device, dtype, rng: np.random.Generator
) -> Tensor:
    """``[n,3,H,W]`` textures in [0,1]: fractal noise, warped stripes, checkers or blobs in 2 random colours,
    modulated by fine fractal detail. The offline stand-in for DTD. ``g`` draws on ``device``; ``rng`` (host)
    picks the lattice sizes."""
    octaves = 3
    base = rng.integers(1, 5, n)
    fractal = sum(
        (0.5**o)
        * perlin_noise(
            height, width, np.minimum(base * 2**o, 64), np.minimum(base * 2**o, 64), g, device, dtype
        )
        for o in range(octaves)
    )
    detail = perlin_noise(height, width, np.full(n, 32), np.full(n, 32), g, device, dtype)
    yy = torch.linspace(0, 1, height, device=device, dtype=dtype).view(1, height, 1)
    xx = torch.linspace(0, 1, width, device=device, dtype=dtype).view(1, 1, width)
    theta = _uniform(g, 0, math.pi, (n, 1, 1), fractal)
    freq = _uniform(g, 4, 40, (n, 1, 1), fractal)
    warp = _uniform(g, 0, 3, (n, 1, 1), fractal)
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
    kind = torch.randint(0, patterns.shape[1], (n,), generator=g, device=device)
    v = patterns[torch.arange(n, device=device), kind][:, None]  # [n,1,H,W]
    c1 = torch.rand(n, 3, 1, 1, generator=g, device=device, dtype=dtype)
    c2 = torch.rand(n, 3, 1, 1, generator=g, device=device, dtype=dtype)
    tex = c1 * (1 - v) + c2 * v
    return (tex * (1 + 0.25 * detail[:, None])).clamp(0, 1)


_RGB2YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
)
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)
_SHARPEN_KERNEL = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13
_CONSTANTS = {"rgb2yiq": _RGB2YIQ, "yiq2rgb": _YIQ2RGB, "sharpen": _SHARPEN_KERNEL}


@functools.cache
def _constant(name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A module constant on ``device``, copied there once: copying it from pageable host memory on every
    call made the host wait for the GPU several times a step."""
    return _CONSTANTS[name].to(device=device, dtype=dtype)


def _to_uint8(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _sharpness(img: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``adjust_sharpness`` with a factor per image ``[m,1,1,1]`` (borders kept as they are)."""
    c = img.shape[1]
    kernel = _constant("sharpen", img.device, img.dtype).expand(c, 1, 3, 3)
    blurred = F.conv2d(img, kernel, groups=c)
    out = img.clone()
    inner = out[..., 1:-1, 1:-1]
    inner.add_((1 - factor) * (blurred - inner))
    return out


def _autocontrast(img: Tensor) -> Tensor:
    """torchvision's ``autocontrast`` without its boolean indexing (a device synchronisation)."""
    lo = img.amin(dim=(-2, -1), keepdim=True)
    hi = img.amax(dim=(-2, -1), keepdim=True)
    flat = hi == lo
    scale = torch.where(flat, torch.ones_like(hi), hi - lo)
    return (img - torch.where(flat, torch.zeros_like(lo), lo)) / scale


def _augment_rows(img: Tensor, op: int, g: torch.Generator) -> Tensor:
    """One of the 10 published augmentations on float32 ``[m,3,H,W]`` images in [0,1], own parameters per
    image (drawn on the device)."""
    m = img.shape[0]
    if op == 0:  # per-channel gamma contrast
        return img.clamp_min(0) ** _uniform(g, math.log(0.5), math.log(2.0), (m, 3, 1, 1), img).exp()
    if op == 1:  # brightness multiply and add
        return img * _uniform(g, 0.8, 1.2, (m, 1, 1, 1), img) + _uniform(
            g, -30 / 255, 30 / 255, (m, 1, 1, 1), img
        )
    if op == 2:  # sharpness
        return _sharpness(img, _uniform(g, 0.0, 2.0, (m, 1, 1, 1), img))
    if op == 3:  # hue rotation and saturation scaling: one 3x3 colour matrix in YIQ space per image
        angle = _uniform(g, -0.4 * math.pi, 0.4 * math.pi, (m,), img)
        sat = _uniform(g, 0.6, 1.4, (m,), img)
        c, s = sat * angle.cos(), sat * angle.sin()
        one, zero = torch.ones_like(c), torch.zeros_like(c)
        rot = torch.stack([one, zero, zero, zero, c, -s, zero, s, c], dim=1).view(m, 3, 3)
        mat = _constant("yiq2rgb", img.device, img.dtype) @ rot @ _constant("rgb2yiq", img.device, img.dtype)
        return torch.einsum("bij,bjhw->bihw", mat, img)
    if op == 4:  # solarize half of the time
        threshold = _uniform(g, 32 / 255, 128 / 255, (m, 1, 1, 1), img)
        apply = _uniform(g, 0, 1, (m, 1, 1, 1), img) < 0.5
        return torch.where(apply & (img >= threshold), 1 - img, img)
    if op == 5:  # posterize: keep the top 1..8 bits
        bits = torch.randint(1, 9, (m, 1, 1, 1), generator=g, device=img.device)
        keep = (256 - torch.bitwise_left_shift(torch.ones_like(bits), 8 - bits)).to(torch.uint8)
        return torch.bitwise_and(_to_uint8(img), keep).float() / 255
    if op == 6:
        return 1 - img
    if op == 7:
        return _autocontrast(img)
    if op == 8:
        return TF.equalize(_to_uint8(img)).float() / 255
    return rotate(img, _uniform(g, -45, 45, (m,), img), mode="bilinear")


def augment(images: Tensor, g: torch.Generator, rng: np.random.Generator, n_ops: int = 3) -> Tensor:
    """Apply ``n_ops`` distinct random augmentations (of 10) to each image, in its own random order; result
    clipped to [0,1]. ``rng`` (host) picks the operations; each operation runs once on the rows that drew it
    in that round."""
    x = images.float().clamp(0, 1)
    n = x.shape[0]
    if n == 0:
        return images
    ops = np.stack([rng.permutation(10)[:n_ops] for _ in range(n)])  # [n, n_ops]
    for r in range(n_ops):
        for op in np.unique(ops[:, r]):
            rows = np.flatnonzero(ops[:, r] == op)
            if len(rows) == n:
                x = _augment_rows(x, int(op), g).clamp(0, 1)
            else:
                idx = _rows(rows, x.device)
                x.index_copy_(0, idx, _augment_rows(x.index_select(0, idx), int(op), g).clamp(0, 1))
    return x.to(images.dtype)


def shuffle_patches(images: Tensor, g: torch.Generator, grid: int = 8) -> Tensor:
    """Cut each image into a ``grid x grid`` lattice and shuffle the cells (own random order per image)."""
    b, c, h, w = images.shape
    ph, pw = math.ceil(h / grid), math.ceil(w / grid)
    x = images
    if (ph * grid, pw * grid) != (h, w):
        x = F.interpolate(images, size=(ph * grid, pw * grid), mode="bilinear", align_corners=False)
    cells = x.reshape(b, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, ph, pw)
    order = torch.argsort(torch.rand(b, grid * grid, generator=g, device=images.device), dim=1)
    cells = cells[torch.arange(b, device=images.device)[:, None], order]
    x = cells.reshape(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, ph * grid, pw * grid)
    if (ph * grid, pw * grid) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x
