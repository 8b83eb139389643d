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
Foregrounds of training images are computed once per image path and cached (on the images' device).

Speed (issue #9): the generator never waits on the device. Decisions that steer Python control flow (which
rows get a texture, which augmentations, Perlin lattice sizes, which rows rotate) come from a seeded NumPy
generator on the host; every number that enters pixel arithmetic is drawn on the images' device from a seeded
device ``torch.Generator``; data-dependent choices (an empty mask, a rotation that loses the mask) are made
with ``torch.where`` instead of reading values back. Each augmentation runs once per batch on the rows that
drew it, not once per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def _to_uint8(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _sharpness(img: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``adjust_sharpness`` with a factor per image ``[m,1,1,1]`` (borders kept as they are)."""
    c = img.shape[1]
    kernel = _SHARPEN_KERNEL.to(img).expand(c, 1, 3, 3)
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
        mat = _YIQ2RGB.to(img) @ rot @ _RGB2YIQ.to(img)
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

    Randomness: a seeded NumPy generator on the host for the decisions that steer control flow, and one
    seeded ``torch.Generator`` per device for everything drawn into pixels (``seed``; when None, drawn from
    the global torch RNG so ``seed_everything`` still makes runs reproducible). The pixel work runs on the
    images' device. ``cache_foreground``: keep each training image's foreground (by path and size) instead of
    recomputing it every batch; only valid when a path always gives the same pixels (no random crops/flips).
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
        cache_foreground: bool = True,
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
        self.cache_foreground = bool(cache_foreground)
        self._foregrounds: dict[tuple[str, int, int, torch.device], Tensor] = {}
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device | str) -> torch.Generator:
        """The seeded ``torch.Generator`` that draws on ``device`` (made on first use)."""
        device = torch.device(device)
        if device.type != "cpu" and device.index is None:
            device = torch.device(device.type, torch.get_device_module(device.type).current_device())
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def state_dict(self) -> dict:
        """The RNG states (host decisions and every device's draws): what a resumed training needs to draw
        the anomalies it would have drawn. Plain ints, strings and byte tensors (loads with weights_only)."""
        return {
            "seed": self.seed,
            "rng": self.rng.bit_generator.state,
            "generators": {str(d): g.get_state() for d, g in self._generators.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.rng = np.random.default_rng(self.seed)
        self.rng.bit_generator.state = state["rng"]
        self._generators = {}
        for device, g_state in state["generators"].items():
            self.generator(device).set_state(g_state)

    # -- parts ------------------------------------------------------------------------------------------
    def cached_foreground(self, images: Tensor, paths: list[str]) -> Tensor:
        """`foreground`, computed once per (path, size, device) and then served from memory."""
        b, _, h, w = images.shape
        keys = [(str(p), h, w, images.device) for p in paths]
        missing = [i for i, k in enumerate(keys) if k not in self._foregrounds]
        if missing:
            fresh = self.foreground(images[missing], [paths[i] for i in missing])
            for j, i in enumerate(missing):
                self._foregrounds[keys[i]] = (fresh[j] > 0.5).clone()
        return torch.stack([self._foregrounds[k] for k in keys]).to(images.dtype)

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
        lo, hi = self.min_perlin_scale, self.max_perlin_scale
        res_y = 2 ** self.rng.integers(lo, hi, n)
        res_x = 2 ** self.rng.integers(lo, hi, n)
        g = self.generator(device)
        noise = perlin_noise(h, w, res_y, res_x, g, device, dtype)
        angles = torch.rand(n, generator=g, device=device, dtype=dtype) * 180 - 90
        return rotate(noise[:, None], angles, mode="bilinear")[:, 0]

    def masks(self, fg: Tensor) -> tuple[Tensor, Tensor]:
        """Perlin mask and its randomly thresholded previous-step variant, both ``[n,1,H,W]`` and within
        ``fg``; the mask is never empty: a row whose noise leaves it empty takes a second draw, and if that
        is empty too, the strongest 5 % of its foreground noise. Chosen with ``torch.where``, no read-back."""
        n, _, h, w = fg.shape
        inside = fg[:, 0] > 0.5
        both = self._noise(2 * n, h, w, fg.device, fg.dtype)
        first_empty = ~((both[:n].abs() > self.mask_threshold) & inside).flatten(1).any(1)
        noise = torch.where(first_empty[:, None, None], both[n:], both[:n])
        mag = noise.abs() * fg[:, 0]
        flat = mag.flatten(1)
        empty = ~(flat > self.mask_threshold).any(1)
        k = max(1, math.ceil(0.95 * flat.shape[1]))
        q = flat.float().kthvalue(k, dim=1).values.to(fg.dtype)
        fallback = torch.minimum(q, flat.amax(1)) * (1 - 1e-6)
        thr = torch.where(empty, fallback, torch.full_like(fallback, self.mask_threshold))
        mask = (mag > thr[:, None, None]).to(fg.dtype)

        g = self.generator(fg.device)
        choice = torch.randint(0, 4, (n,), generator=g, device=fg.device)
        u = torch.rand(n, generator=g, device=fg.device, dtype=fg.dtype)
        corrupt = torch.where(
            choice == 0,
            noise.flatten(1).amax(1),
            torch.where(
                choice == 1, 0.5 + 0.5 * u, torch.where(choice == 2, torch.full_like(u, 0.5), 0.5 - 0.5 * u)
            ),
        )
        prev = (noise.abs() > corrupt[:, None, None]).to(fg.dtype) * fg[:, 0]
        return mask[:, None], prev[:, None]

    def appearances(self, images: Tensor) -> Tensor:
        """Anomaly appearance per image, ``[n,3,H,W]`` in [0,1]: texture or shuffled own patches, augmented."""
        n, _, h, w = images.shape
        g = self.generator(images.device)
        use_texture = self.rng.random(n) < self.texture_probability
        out = images.clone()
        ti = np.flatnonzero(use_texture)
        if len(ti):
            out.index_copy_(
                0, _rows(ti, images.device), self.textures(len(ti), h, w, images.device, images.dtype)
            )
        out = augment(out, g, self.rng)
        si = np.flatnonzero(~use_texture)
        if len(si):
            idx = _rows(si, images.device)
            out.index_copy_(0, idx, shuffle_patches(out.index_select(0, idx), g, self.grid_size))
        return out

    def textures(self, n: int, h: int, w: int, device, dtype) -> Tensor:
        """``n`` textures: random images from ``texture_dir`` when configured, procedural ones otherwise."""
        if not self.texture_files:
            return procedural_textures(n, h, w, self.generator(device), device, dtype, self.rng)
        picks = self.rng.integers(0, len(self.texture_files), n).tolist()
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
        Runs in the images' dtype even inside an autocast region (mixed-precision training).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"AnomalyGenerator expects [B,3,H,W] images, got {tuple(images.shape)}")
        with torch.autocast(images.device.type, enabled=False):
            return self._generate(images, foreground, paths)

    def _generate(
        self, images: Tensor, foreground: Tensor | None, paths: list[str] | None
    ) -> dict[str, Tensor]:
        b, _, h, w = images.shape
        x0 = images.clone()
        if foreground is not None:
            fg = foreground.to(images)
        elif self.cache_foreground and self.object_category and paths is not None:
            fg = self.cached_foreground(images, paths)
        else:
            fg = self.foreground(images, paths)
        fg = (fg > 0.5).to(images.dtype)
        empty_fg = fg.flatten(1).amax(1) == 0  # nowhere to put an anomaly: use the whole image
        fg = torch.where(empty_fg.view(-1, 1, 1, 1), torch.ones_like(fg), fg)
        n_anom = min(b, max(1, math.floor(b * self.anomaly_fraction)))

        mask = images.new_zeros(b, 1, h, w)
        prev = images.new_zeros(b, 1, h, w)
        appearance = images.new_full((b, 3, h, w), 0.5)
        mask[:n_anom], prev[:n_anom] = self.masks(fg[:n_anom])
        appearance[:n_anom] = self.appearances(images[:n_anom])
        has_anomaly = torch.zeros(b, dtype=torch.bool, device=images.device)
        has_anomaly[:n_anom] = True

        rows = np.flatnonzero(self.rng.random(b) < self.rotation_probability)
        if len(rows):
            idx = _rows(rows, images.device)
            d = self.rotation_degrees
            a = (
                torch.rand(len(rows), generator=self.generator(images.device), device=images.device) * 2 * d
                - d
            )
            # keep an anomalous sample unrotated if rotation would push its whole mask out of the frame
            lost = has_anomaly[idx] & ~rotate(mask[idx], a).flatten(1).any(1)
            keep = ~lost.view(-1, 1, 1, 1)
            for t, fill in ((x0, 0.5), (appearance, 0.5), (mask, 0.0), (prev, 0.0), (fg, 0.0)):
                part = t.index_select(0, idx)
                t.index_copy_(0, idx, torch.where(keep, rotate(part, a, fill=fill), part))
        return {
            "x0": x0,
            "mask": mask,
            "appearance": appearance,
            "prev_mask": prev,
            "has_anomaly": has_anomaly,
            "foreground": fg,
        }

    __call__ = generate
