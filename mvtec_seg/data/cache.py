"""Decode and resize a category once; every later run memory-maps the cached arrays.

Decoding 900x900 PNGs dominates a small run's data time, so the cache is shared by all jobs (built once under
a lock, written atomically). It is keyed by the content of every image and mask (`data.files`), the manifest's
row order and the image size (and the layout's mask rule, when it is not MVTec's): a replaced image, an edited
mask or another root with other bytes rebuilds it, and the rebuild names the file that changed.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mvtec_seg.data.files import announce_rebuild, data_record, file_state, files_key, write_record
from mvtec_seg.data.layouts import DEFAULT_LAYOUT, DEFAULT_MASK_RULE, decode_mask, mask_rule
from mvtec_seg.data.mvtec import (
    FEW_PIXELS,
    SIXTEEN_BIT_MODES,
    MaskNotes,
    image_hw,
    load_rgb,
)
from mvtec_seg.io_utils import atomic_write_json, build_once, content_key

log = logging.getLogger(__name__)


def manifest_files(manifest: dict) -> list[str]:
    """Every image and mask of a manifest (paths relative to the category folder)."""
    rows = manifest["samples"]
    return [r["image"] for r in rows] + [r["gt_mask"] for r in rows if r["gt_mask"] is not None]


def decode_sample(
    category_dir: Path,
    row: dict,
    size: int,
    notes: MaskNotes | None = None,
    rule: str = DEFAULT_MASK_RULE,
) -> tuple[np.ndarray, np.ndarray]:
    """One manifest row -> (uint8 RGB [size,size,3], uint8 mask [size,size] in {0,1}); masks by `rule`."""
    image_path = category_dir / row["image"]
    image = load_rgb(image_path, size)
    if row["gt_mask"] is None:
        return image, np.zeros((size, size), dtype=np.uint8)
    mask = decode_mask(category_dir / row["gt_mask"], size, image_hw(image_path), notes, rule)
    return image, mask


def manifest_mask_rule(manifest: dict) -> str:
    """How the manifest's masks are decoded: its layout's rule (`data.layouts.MASK_RULES`)."""
    return mask_rule(manifest.get("layout", DEFAULT_LAYOUT))


def _mode(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as img:  # the header only
        return img.mode


def decoding_key(manifest: dict, cache_dir: Path, size: int, state: dict[str, str]) -> int | None:
    """The decoding version when some image is 16-bit or float (its pixels depend on the rules), else None:
    8-bit images decode as they always have, so what was built from them keeps its key."""
    path = decoded_dir(manifest, cache_dir, size, state) / DECODING_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return DECODING
    return int(info.get("version", DECODING)) if info.get("wide_images") else None


def warn_masks(notes: MaskNotes) -> None:
    """One warning for the non-binary masks, one naming every mask whose binarisation dropped more than a
    few non-zero pixels (noise that a '> 0' reading would have made defect, or faint marks)."""
    if notes.soft:
        log.warning(
            "%d mask(s) are not binary (first: %s): thresholded at half their type's range (128 of 255) — "
            "save masks as two-level PNGs (0/255) to silence this",
            len(notes.soft),
            sorted(notes.soft)[0],
        )
    if notes.changed:
        named = ", ".join(f"{p} ({n} px)" for p, n in sorted(notes.changed.items()))
        log.warning(
            "%d mask(s) have more than %d non-zero pixels below half the range, read as normal: %s — check "
            "that these masks mark what you mean",
            len(notes.changed),
            FEW_PIXELS,
            named,
        )


DECODING = 2
"""The version of the decoding rules (16-bit by the type's range, masks by their levels), part of the key."""
DECODING_FILE = "decoding.json"
WIDE_MODES: tuple[str, ...] = (*SIXTEEN_BIT_MODES, "F")


def decoded_dir(manifest: dict, cache_dir: Path, size: int, state: dict[str, str]) -> Path:
    """The cache folder for these files' bytes, in this manifest's order, at this size, by these decoding and mask rules."""
    order = [r["image"] for r in manifest["samples"]]
    rule = manifest_mask_rule(manifest)
    extra = {} if rule == DEFAULT_MASK_RULE else {"mask_rule": rule}
    key = content_key(
        {
            "files": files_key({"files": state}),
            "order": order,
            "size": int(size),
            "decoding": DECODING,
            **extra,
        }
    )
    return Path(cache_dir) / "decoded" / manifest["category"] / f"{key}_{size}px"


def decoded_arrays(
    manifest: dict,
    category_dir: Path,
    cache_dir: Path,
    size: int,
    workers: int = 2,
    state: dict[str, str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images [N,size,size,3] and GT masks [N,size,size] (uint8) in manifest order, from the disk cache.

    `state` is `data.files.file_state` of `manifest_files(manifest)` (computed here when not given).
    """
    category_dir = Path(category_dir)
    rows = manifest["samples"]
    if state is None:
        state = file_state(category_dir, manifest_files(manifest))
    record = data_record(category_dir, state)
    target = decoded_dir(manifest, cache_dir, size, state)
    rule = manifest_mask_rule(manifest)

    def build(tmp: Path) -> None:
        announce_rebuild(target, record, f"the decoded arrays of {manifest['category']}")
        notes = MaskNotes()
        with ThreadPoolExecutor(max(1, workers)) as pool:
            decoded = list(pool.map(lambda r: decode_sample(category_dir, r, size, notes, rule), rows))
        warn_masks(notes)
        tmp.mkdir(parents=True)
        np.save(tmp / "images.npy", np.stack([d[0] for d in decoded]))
        np.save(tmp / "masks.npy", np.stack([d[1] for d in decoded]))
        wide = sum(_mode(category_dir / r["image"]) in WIDE_MODES for r in rows)
        atomic_write_json(tmp / DECODING_FILE, {"version": DECODING, "wide_images": int(wide)})
        write_record(tmp, record)

    build_once(target, build)
    images = np.load(target / "images.npy", mmap_mode="r")
    masks = np.load(target / "masks.npy", mmap_mode="r")
    if len(images) != len(rows):
        raise RuntimeError(f"decoded cache {target} does not match its manifest; delete the folder and rerun")
    return images, masks
