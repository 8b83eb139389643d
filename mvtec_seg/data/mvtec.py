"""Reader for the MVTec AD folder layout (`train/good`, `test/<defect>`, `ground_truth/<defect>/*_mask.png`).

Scanning validates everything up front so a bad tree stops the run before any training, with a message
that names the file and the fix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mvtec_seg.errors import UserError
from mvtec_seg.io_utils import check_name

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
            check_name(p)
            _dead_link(p)
    return [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def check_one_mask_each(image_dir: Path, images: list[Path], mask_dir: Path, suffix: str, what: str) -> None:
    """Exactly one `<mask_dir>/<stem><suffix>` per image of `image_dir` (`what` names the images in the
    message): the first missing or extra mask is one line naming it, with the count of such."""
    masks = {p.name for p in _images_in(mask_dir)} if mask_dir.is_dir() else set()
    expected = {f"{p.stem}{suffix}" for p in images}
    missing = sorted(expected - masks)
    if missing:
        raise UserError(
            f"missing mask {mask_dir / missing[0]} for {what} {image_dir / missing[0][: -len(suffix)]}.* "
            f"({len(missing)} missing in {mask_dir}) — add the masks or remove those {what}s"
        )
    extra = sorted(masks - expected)
    if extra:
        raise UserError(
            f"mask {mask_dir / extra[0]} has no {what} in {image_dir} ({len(extra)} such) — "
            f"remove it or add the image"
        )


def defect_samples(root: Path, defect_dir: Path, mask_dir: Path, source: str) -> list[Sample]:
    """The images of one defect folder, each with exactly one `<mask_dir>/<stem>_mask.png` (MVTec AD's rule,
    MVTec AD 2's too): a missing or an extra mask is one line naming it."""
    images = _images_in(defect_dir)
    _dead_link(mask_dir)
    if images and not mask_dir.is_dir():
        raise UserError(
            f"{defect_dir} has no ground-truth folder {mask_dir} — add {mask_dir}/<image name>_mask.png "
            f"for each of its {len(images)} images, or remove {defect_dir}"
        )
    check_one_mask_each(defect_dir, images, mask_dir, "_mask.png", "test image")
    return [
        Sample(
            p.relative_to(root).as_posix(),
            (mask_dir / f"{p.stem}_mask.png").relative_to(root).as_posix(),
            defect_dir.name,
            source,
        )
        for p in images
    ]


def scan_category(category_dir: Path | str) -> list[Sample]:
    """List every image of a category in MVTec layout, checking that each defect image has exactly one mask."""
    root = Path(category_dir)
    check_name(root, "folder name")
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
        check_name(entry)
        _dead_link(entry)
    for defect_dir in sorted(d for d in test_dir.iterdir() if d.is_dir()):
        defect = defect_dir.name
        images = _images_in(defect_dir)
        if defect == "good":
            samples += [Sample(p.relative_to(root).as_posix(), None, "good", "test") for p in images]
            continue
        samples += defect_samples(root, defect_dir, gt_root / defect, "test")
    if not any(s.source == "test" for s in samples):
        raise UserError(f"{test_dir} has no images — add test/<defect_type>/ folders with images")
    return samples


DEFAULT_MAX_IMAGE_PIXELS: int | None = Image.MAX_IMAGE_PIXELS
"""Pillow's decompression-bomb limit: a file above twice it is refused (it could exhaust memory)."""
SIXTEEN_BIT_MODES: tuple[str, ...] = ("I;16", "I;16B", "I;16L", "I;16N", "I")
FEW_PIXELS = 16
"""A non-binary mask whose binarisation differs from reading every non-zero pixel as defect by more than
this many pixels is named in a warning: its noise, or its faint marks, were dropped."""


@contextlib.contextmanager
def pixel_limit(limit: int | None) -> Iterator[None]:
    """Pillow's decompression-bomb limit while a job reads images (`data.max_image_pixels`; None: Pillow's
    own), restored after it: the limit is process-wide in Pillow."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS if limit is None else int(limit)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _bomb(path: Path, err: Exception) -> UserError:
    return UserError(
        f"cannot read image {path}: {' '.join(str(err).split())} — if you trust the file, raise the limit "
        f"with data.max_image_pixels=<pixels> (predict: max_image_pixels=), or shrink the image"
    )


def open_image(path: Path) -> Image.Image:
    """Open an image file, turning decoder failures into a UserError naming the file."""
    try:
        if path.stat().st_size == 0:
            raise UserError(f"image {path} is an empty file (0 bytes) — replace or remove the file")
        img = Image.open(path)
        img.load()
    except Image.DecompressionBombError as err:
        raise _bomb(path, err) from None
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {err} — replace or remove the file") from None
    return img


def unit_range(img: Image.Image) -> np.ndarray:
    """Pixel values as float32 in [0, 1] by the range of their type, as scikit-image's `img_as_float`
    does: 8-bit / 255, 16-bit / 65535 (32-bit integer images are read as 16-bit, above 65535 clips),
    float images clipped to [0, 1], bilevel as 0 / 1. Never by the image's own maximum, so a flat image
    keeps its brightness and a 16-bit image decodes like its 8-bit twin."""
    if img.mode in SIXTEEN_BIT_MODES:
        return (np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 65535.0).astype(np.float32)
    if img.mode == "F":
        return np.clip(np.nan_to_num(np.asarray(img, dtype=np.float32)), 0.0, 1.0)
    if img.mode == "1":
        return np.asarray(img, dtype=np.float32)
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        if img.mode == "RGBA":
            img = img.convert("RGB")
    return np.asarray(img, dtype=np.float32) / 255.0


def load_rgb(path: Path, size: int | None) -> np.ndarray:
    """Decode any image (grayscale, RGBA, 16-bit, any size) to uint8 RGB resized to size x size
    (`size=None`: at its own size); 16-bit and float images by their type's range (`unit_range`)."""
    img = open_image(path)
    if img.mode in (*SIXTEEN_BIT_MODES, "F"):
        img = Image.fromarray(np.rint(unit_range(img) * 255.0).astype(np.uint8))
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return rgb if size is None else resize_rgb(rgb, size)


def resize_map(amap: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Float [h,w] map -> [H,W], bilinear (a map back at its input image's size)."""
    amap = np.asarray(amap, dtype=np.float32)
    if amap.shape == tuple(hw):
        return amap
    return np.asarray(Image.fromarray(amap, mode="F").resize((hw[1], hw[0]), Image.BILINEAR))


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 RGB [H,W,3] -> [size,size,3], bilinear: the one resize every model input goes through."""
    if rgb.shape[:2] == (size, size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR), dtype=np.uint8)


@dataclass
class MaskNotes:
    """What decoding a set of masks noticed: the non-binary ones, and those whose binarisation dropped
    more than `FEW_PIXELS` non-zero pixels (path -> pixels)."""

    soft: list[Path] = field(default_factory=list)
    changed: dict[Path, int] = field(default_factory=dict)


def mask_levels(path: Path) -> np.ndarray:
    """A mask file as grey values in [0, 1] by its type's range (colour masks by their luma)."""
    img = open_image(path)
    if img.mode not in (*SIXTEEN_BIT_MODES, "F", "1", "L"):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB").convert("L")
    return unit_range(img)


def binarise(levels: np.ndarray) -> tuple[np.ndarray, bool]:
    """(float mask in [0,1] to resize and cut at 0.5, whether it was binary). Two levels (or one nonzero
    level) are binary whatever they are: the upper one is defect. More levels are cut at half the type's
    range, not at half their own, so compression noise stays noise. A uniform mask is read by the type's
    range too."""
    values = np.unique(levels)
    if len(values) == 2:
        return (levels >= values[1]).astype(np.float32), True
    if len(values) <= 1:  # uniform: defect everywhere only at half the type's range or more
        return (levels >= 0.5).astype(np.float32), True
    return levels, False


def load_mask(
    path: Path, size: int, image_size_hw: tuple[int, int] | None = None, notes: MaskNotes | None = None
) -> np.ndarray:
    """Decode a mask, resize it with bilinear interpolation and binarise at half the range.

    Thresholding at half the range after resizing keeps the mask's area; thresholding at > 0 would dilate it.
    A binary mask is recognised whatever its two levels (0/1, 0/255, 0/65535). A mask with more grey levels
    (anti-aliased, or saved as JPEG) is thresholded at half its type's range, not refused; `notes` collects
    it, and how many non-zero pixels its binarisation dropped when more than `FEW_PIXELS`.
    """
    levels = mask_levels(path)
    if image_size_hw is not None and levels.shape[:2] != tuple(image_size_hw):
        raise UserError(
            f"mask {path} is {levels.shape[1]}x{levels.shape[0]} but its image is "
            f"{image_size_hw[1]}x{image_size_hw[0]} — masks must have the size of their images"
        )
    unit, is_binary = binarise(levels)
    if notes is not None and not is_binary:
        notes.soft.append(path)
        dropped = int(np.count_nonzero(levels > 0)) - int(np.count_nonzero(levels >= 0.5))
        if dropped > FEW_PIXELS:
            notes.changed[path] = dropped
    if not unit.any():
        return np.zeros((size, size), dtype=np.uint8)
    resized = np.asarray(
        Image.fromarray(unit.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR)
    )
    return (resized >= 0.5).astype(np.uint8)


def image_hw(path: Path) -> tuple[int, int]:
    """Height and width of an image file without decoding its pixels."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except Image.DecompressionBombError as err:
        raise _bomb(path, err) from None
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"cannot read image {path}: {err} — replace or remove the file") from None
