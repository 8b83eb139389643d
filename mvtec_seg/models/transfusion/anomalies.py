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
Foregrounds of training images are computed once per image path and cached (on the images' device), and
so are textures from ``texture_dir``: each file decoded and resized once (uint8, on the images' device, up to
``texture_cache_mb``), not on the training loop's thread at every pick.

Speed: the generator never waits on the device. Decisions that steer Python control flow (which
rows get a texture, which augmentations, Perlin lattice sizes, which rows rotate) come from a seeded NumPy
generator on the host; every number that enters pixel arithmetic is drawn on the images' device from a seeded
device ``torch.Generator``; data-dependent choices (an empty mask, a rotation that loses the mask) are made
with ``torch.where`` instead of reading values back. Each augmentation runs once per batch on the rows that
drew it, not once per image. The batched image operations live in `image_ops`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import Tensor

from mvtec_seg.models.transfusion.image_ops import (
    _rows,
    augment,
    perlin_noise,
    procedural_textures,
    rotate,
    shuffle_patches,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


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
    ``texture_cache_mb``: how much of ``texture_dir``, decoded and resized (uint8), to keep on the images'
    device (0: decode every pick). DTD at 256 px is 1.1 GB; the values are the same either way.
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
        texture_cache_mb: float = 2048,
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
        self.texture_cache_bytes = int(float(texture_cache_mb) * 2**20)
        self._textures: dict[tuple[int, int, int, torch.device], Tensor] = {}  # (file, h, w, device)
        self._texture_bytes = 0
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
        device = torch.device(device)
        keys = [(i, h, w, device) for i in picks]
        missing = list(dict.fromkeys(k for k in keys if k not in self._textures))
        fresh = dict(zip(missing, self._decode_textures([k[0] for k in missing], h, w, device), strict=True))
        for k, tex in fresh.items():
            if self._texture_bytes + tex.numel() <= self.texture_cache_bytes:
                self._textures[k] = tex
                self._texture_bytes += tex.numel()
        rows = [self._textures[k] if k in self._textures else fresh[k] for k in keys]
        return torch.stack(rows).to(dtype) / 255

    def _decode_textures(self, files: list[int], h: int, w: int, device: torch.device) -> list[Tensor]:
        """Texture files ``files`` (indices) decoded and resized to ``h x w``: ``[3,H,W]`` uint8 on
        ``device``. On CUDA they go through page-locked memory: a copy from pageable memory would make the host
        wait for all the GPU's queued work."""
        if not files:
            return []
        arrays = []
        for i in files:
            with Image.open(self.texture_files[i]) as im:
                arrays.append(np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR)))
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        if device.type == "cuda":
            batch = batch.pin_memory()
        return list(batch.to(device, non_blocking=True).unbind(0))

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
