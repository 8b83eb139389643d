"""Decode and resize a category once; every later run memory-maps the cached arrays.

Decoding 900x900 PNGs dominates a small run's data time, so the cache is keyed by the category's file
fingerprint and the image size and shared by all jobs (built once under a lock, written atomically).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mvtec_seg.data.mvtec import image_hw, load_mask, load_rgb
from mvtec_seg.io_utils import build_once


def decode_sample(category_dir: Path, row: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One manifest row -> (uint8 RGB [size,size,3], uint8 mask [size,size] in {0,1})."""
    image_path = category_dir / row["image"]
    image = load_rgb(image_path, size)
    if row["gt_mask"] is None:
        return image, np.zeros((size, size), dtype=np.uint8)
    mask = load_mask(category_dir / row["gt_mask"], size, image_size_hw=image_hw(image_path))
    return image, mask


def decoded_arrays(
    manifest: dict, category_dir: Path, cache_dir: Path, size: int, workers: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Images [N,size,size,3] and GT masks [N,size,size] (uint8) in manifest order, from the disk cache."""
    category_dir = Path(category_dir)
    rows = manifest["samples"]
    target = Path(cache_dir) / "decoded" / manifest["category"] / f"{manifest['fingerprint']}_{size}px"

    def build(tmp: Path) -> None:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            decoded = list(pool.map(lambda r: decode_sample(category_dir, r, size), rows))
        tmp.mkdir(parents=True)
        np.save(tmp / "images.npy", np.stack([d[0] for d in decoded]))
        np.save(tmp / "masks.npy", np.stack([d[1] for d in decoded]))

    build_once(target, build)
    images = np.load(target / "images.npy", mmap_mode="r")
    masks = np.load(target / "masks.npy", mmap_mode="r")
    if len(images) != len(rows):
        raise RuntimeError(f"decoded cache {target} does not match its manifest; delete the folder and rerun")
    return images, masks
