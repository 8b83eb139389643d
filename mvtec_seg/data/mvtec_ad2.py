"""Reader for the MVTec AD 2 layout, and the folder structure its evaluation server takes.

A category holds `train/good`, `validation/good` (normal only), `test_public/{good,bad}` with masks in
`test_public/ground_truth/bad/<image stem>_mask.png`, and `test_private/`, `test_private_mixed/` (no masks:
predicted for the server, never scored here). `source` is the folder a sample came from (`train`,
`validation`, `test_public`); the private images are listed by `private_test_images`, not by the scan, so no
split, cache or teacher ever sees them.

The server takes one folder holding `anomaly_images/<category>/<split>/<stem>.tiff` (single-channel float16:
its upload checker refuses any other type) and `anomaly_images_thresholded/<category>/<split>/<stem>.png`
(8-bit, 0 or 255), with `<split>` in `test_private`, `test_private_mixed` and nothing else in the folder
(MVTec's `check_and_prepare_data_for_upload.py`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from mvtec_seg.data.mvtec import Sample, _dead_link, _images_in, defect_samples
from mvtec_seg.errors import UserError
from mvtec_seg.io_utils import atomic_save_png, atomic_write_bytes

NORMAL_PARTS: tuple[str, ...] = ("train", "validation")
TEST_PUBLIC = "test_public"
PRIVATE_SPLITS: tuple[str, ...] = ("test_private", "test_private_mixed")
SUBMISSION_MAPS = "anomaly_images"
SUBMISSION_MASKS = "anomaly_images_thresholded"
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _part_samples(root: Path, test_dir: Path, source: str) -> list[Sample]:
    """The images of `test_dir/<defect>/` with exactly one `ground_truth/<defect>/<stem>_mask.png` each
    (`good`: normal, no mask)."""
    gt_root = test_dir / "ground_truth"
    entries = sorted(test_dir.iterdir())
    for entry in entries:
        _dead_link(entry)
    samples: list[Sample] = []
    for defect_dir in (d for d in entries if d.is_dir() and d.name != "ground_truth"):
        images = _images_in(defect_dir)
        if defect_dir.name == "good":
            samples += [Sample(p.relative_to(root).as_posix(), None, "good", source) for p in images]
            continue
        samples += defect_samples(root, defect_dir, gt_root / defect_dir.name, source)
    return samples


def scan_mvtec_ad2(category_dir: Path | str) -> list[Sample]:
    """Every scored image of an MVTec AD 2 category (train, validation, test_public), masks checked."""
    root = Path(category_dir)
    _dead_link(root)
    if not root.is_dir():
        raise UserError(
            f"data folder not found: {root} — set data.root to the folder that holds your MVTec AD 2 categories"
        )
    samples: list[Sample] = []
    for part in NORMAL_PARTS:
        good = root / part / "good"
        _dead_link(root / part)
        _dead_link(good)
        images = _images_in(good) if good.is_dir() else []
        if not images:
            raise UserError(
                f"{good} is missing or has no images — an MVTec AD 2 category needs normal images in "
                f"train/good and validation/good"
            )
        samples += [Sample(p.relative_to(root).as_posix(), None, "good", part) for p in images]
    test_dir = root / TEST_PUBLIC
    _dead_link(test_dir)
    if not test_dir.is_dir():
        raise UserError(
            f"{test_dir} is missing — an MVTec AD 2 category needs test_public/good, test_public/bad and its "
            f"masks in test_public/ground_truth/bad (the scored test set)"
        )
    public = _part_samples(root, test_dir, TEST_PUBLIC)
    if not public:
        raise UserError(f"{test_dir} has no images — add test_public/good and test_public/bad with images")
    return samples + public


def private_test_images(category_dir: Path | str) -> list[tuple[Path, str]]:
    """(file, `<category>/<split>/<stem>`) of every image of `test_private/` and `test_private_mixed/`: the
    images the server scores, named as its folder structure wants them."""
    root = Path(category_dir)
    out: list[tuple[Path, str]] = []
    for split in PRIVATE_SPLITS:
        folder = root / split
        _dead_link(folder)
        if folder.is_dir():
            out += [(p, f"{root.name}/{split}/{p.stem}") for p in _images_in(folder)]
    if not out:
        raise UserError(
            f"{root} has no images in {' or '.join(PRIVATE_SPLITS)} — input= must be an MVTec AD 2 category "
            f"folder for format=mvtec_ad2"
        )
    return out


def tiff_bytes(amap: np.ndarray) -> bytes:
    """A map as the single-channel float16 TIFF the server takes (clipped to float16's finite range)."""
    import tifffile

    arr = np.clip(np.asarray(amap, dtype=np.float32), -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16)
    if arr.ndim != 2:
        raise ValueError(f"an anomaly image must be [H,W], got {arr.shape}")
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


def write_submission_files(out: Path | str, name: str, amap: np.ndarray, mask: np.ndarray) -> None:
    """`name` (`<category>/<split>/<stem>`): the map as TIFF and the mask as a 0/255 PNG, atomically."""
    out = Path(out)
    atomic_write_bytes(out / SUBMISSION_MAPS / f"{name}.tiff", tiff_bytes(amap))
    atomic_save_png(out / SUBMISSION_MASKS / f"{name}.png", np.asarray(mask, dtype=bool))
