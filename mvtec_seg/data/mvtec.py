"""Reader for the MVTec AD folder layout (`train/good`, `test/<defect>`, `ground_truth/<defect>/*_mask.png`).

Scanning validates everything up front so a bad tree stops the run before any training, with a message
that names the file and the fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mvtec_seg.errors import UserError

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
TEXTURE_CATEGORIES: frozenset[str] = frozenset({"carpet", "grid", "leather", "tile", "wood", "zipper"})
"""Anomalies go anywhere on these (no foreground): the official TransFusion texture list, zipper included."""
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Sample:
    """One image of a category; paths are relative to the category folder."""

    image: str
    gt_mask: str | None
    defect_type: str
    source: str  # where it came from: MVTec AD "train"/"test"; other layouts: `data.layouts.OFFICIAL_PARTS`

    @property
    def label(self) -> int:
        return 0 if self.defect_type == "good" else 1

    def as_dict(self) -> dict:
        return asdict(self)


def _dead_link(path: Path) -> None:
    """Stop on a symlink that leads nowhere (broken, or a loop): `is_file`/`is_dir` would silently skip it."""
    if path.is_symlink() and not path.exists():
        raise UserError(
            f"{path} is a symlink that leads nowhere (broken or a loop) — fix the link or remove it"
        )


def _images_in(folder: Path) -> list[Path]:
    """The image files of a folder (by suffix); other files (notes, thumbnails) are ignored."""
    entries = sorted(folder.iterdir())
    for p in entries:
        if p.suffix.lower() in IMAGE_SUFFIXES:
            _dead_link(p)
    return [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def scan_category(category_dir: Path | str) -> list[Sample]:
    """List every image of a category in MVTec layout, checking that each defect image has exactly one mask."""
    root = Path(category_dir)
    _dead_link(root)
    if not root.is_dir():
        raise UserError(
            f"data folder not found: {root} — set data.root to the folder that holds your MVTec AD categories "
            f"(or category=synthetic for the built-in demo data)"
        )
    train_good = root / "train" / "good"
    if not train_good.is_dir() or not _images_in(train_good):
        raise UserError(
            f"{train_good} is missing or has no images — every category needs normal training images"
        )
    test_dir = root / "test"
    if not test_dir.is_dir():
        raise UserError(
            f"{test_dir} is missing — a category needs test/<defect_type>/ folders (test/good for normal)"
        )
    samples = [Sample(p.relative_to(root).as_posix(), None, "good", "train") for p in _images_in(train_good)]
    gt_root = root / "ground_truth"
    for entry in sorted(test_dir.iterdir()):
        _dead_link(entry)
    for defect_dir in sorted(d for d in test_dir.iterdir() if d.is_dir()):
        defect = defect_dir.name
        images = _images_in(defect_dir)
        if defect == "good":
            samples += [Sample(p.relative_to(root).as_posix(), None, "good", "test") for p in images]
            continue
        mask_dir = gt_root / defect
        if images and not mask_dir.is_dir():
            raise UserError(
                f"{defect_dir} has no ground-truth folder {mask_dir} — add {mask_dir}/<image name>_mask.png "
                f"for each of its {len(images)} images, or remove {defect_dir}"
            )
        masks = {p.name for p in _images_in(mask_dir)} if mask_dir.is_dir() else set()
        expected = {f"{p.stem}_mask.png" for p in images}
        missing = sorted(expected - masks)
        if missing:
            raise UserError(
                f"missing mask {mask_dir / missing[0]} for test image {defect_dir / (missing[0][:-9])}.* "
                f"({len(missing)} missing in {mask_dir}) — add the masks or remove those test images"
            )
        extra = sorted(masks - expected)
        if extra:
            raise UserError(
                f"mask {mask_dir / extra[0]} has no test image in {defect_dir} ({len(extra)} such) — "
                f"remove it or add the image"
            )
        samples += [
            Sample(
                p.relative_to(root).as_posix(),
                (mask_dir / f"{p.stem}_mask.png").relative_to(root).as_posix(),
                defect,
                "test",
            )
            for p in images
        ]
    if not any(s.source == "test" for s in samples):
        raise UserError(f"{test_dir} has no images — add test/<defect_type>/ folders with images")
    return samples


def open_image(path: Path) -> Image.Image:
    """Open an image file, turning decoder failures into a UserError naming the file."""
    try:
        if path.stat().st_size == 0:
            raise UserError(f"image {path} is an empty file (0 bytes) — replace or remove the file")
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {err} — replace or remove the file") from None
    return img


def load_rgb(path: Path, size: int | None) -> np.ndarray:
    """Decode any image (grayscale, RGBA, 16-bit, any size) to uint8 RGB resized to size x size
    (`size=None`: at its own size)."""
    img = open_image(path)
    if img.mode in ("I;16", "I;16B", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = max(float(arr.max()), 1.0)
        img = Image.fromarray((arr / hi * 255.0).round().astype(np.uint8))
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return rgb if size is None else resize_rgb(rgb, size)


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 RGB [H,W,3] -> [size,size,3], bilinear: the one resize every model input goes through."""
    if rgb.shape[:2] == (size, size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def load_mask(
    path: Path, size: int, image_size_hw: tuple[int, int] | None = None, soft_masks: list[Path] | None = None
) -> np.ndarray:
    """Decode a mask, resize it with bilinear interpolation and binarise at half its range.

    Thresholding at half the range after resizing keeps the mask's area; thresholding at > 0 would dilate it.
    A mask with more than two grey levels (anti-aliased, or saved as JPEG) is thresholded the same way, not
    refused; its path is appended to `soft_masks` so the caller can warn once.
    """
    img = open_image(path)
    if image_size_hw is not None and (img.height, img.width) != tuple(image_size_hw):
        raise UserError(
            f"mask {path} is {img.width}x{img.height} but its image is {image_size_hw[1]}x{image_size_hw[0]} — "
            f"masks must have the size of their images"
        )
    arr = np.asarray(img.convert("L"), dtype=np.float32)
    if soft_masks is not None and len(np.unique(arr)) > 2:
        soft_masks.append(path)
    hi = float(arr.max())
    if hi <= 0:
        return np.zeros((size, size), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(arr / hi, mode="F").resize((size, size), Image.BILINEAR))
    return (resized >= 0.5).astype(np.uint8)


def image_hw(path: Path) -> tuple[int, int]:
    """Height and width of an image file without decoding its pixels."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"cannot read image {path}: {err} — replace or remove the file") from None
