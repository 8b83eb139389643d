"""The folder layouts a category can come in (`data.layout`), behind one interface.

Each reader returns the same `Sample` records (paths relative to the category folder), so the split, the
content digests, the decoded cache and the datamodule work the same for every layout. What differs is said
here once: which reader lists the files, which folder (`source`) lands in which part under
`data.protocol=official`, and how a mask file is decoded (`MASK_RULES`):

- `half_range` (MVTec AD, MVTec AD 2): resized, then binarised at half the mask's range
  (`data.mvtec.load_mask`);
- `nonzero` (VisA): any non-zero pixel is a defect, whatever its value (VisA masks hold 0/1 or 0/255),
  binarised before the resize so the area is kept (`load_mask_nonzero`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from mvtec_seg.config import category_options
from mvtec_seg.data.mvtec import (
    MaskNotes,
    Sample,
    binarise,
    load_mask,
    mask_levels,
    open_image,
    scan_category,
)
from mvtec_seg.data.mvtec_ad2 import scan_mvtec_ad2
from mvtec_seg.data.visa import DEFAULT_VISA_SPLIT, check_visa_split, labelled_train, scan_visa
from mvtec_seg.errors import UserError
from mvtec_seg.io_utils import check_name

LAYOUTS: tuple[str, ...] = ("mvtec", "visa", "mvtec_ad2")
DEFAULT_LAYOUT = "mvtec"
DATASET_NAMES: dict[str, str] = {"mvtec": "MVTec AD", "visa": "VisA", "mvtec_ad2": "MVTec AD 2"}


def _dataset_categories() -> dict[str, tuple[str, ...]]:
    """Each layout's category names, from the `category` group's files (`visa/pcb1.yaml` -> `pcb1` of
    `visa`); the built-in generated categories and `custom` are no dataset's."""
    out: dict[str, list[str]] = {layout: [] for layout in LAYOUTS}
    for option, node in category_options().items():
        category = node.get("category") or {}
        if category.get("generate") is None and option != "custom":
            out[(node.get("data") or {}).get("layout", DEFAULT_LAYOUT)].append(category["name"])
    return {layout: tuple(names) for layout, names in out.items()}


CATEGORIES: dict[str, tuple[str, ...]] = _dataset_categories()
MASK_RULES: dict[str, str] = {"mvtec": "half_range", "visa": "nonzero", "mvtec_ad2": "half_range"}
DEFAULT_MASK_RULE = "half_range"
_READERS: dict[str, Callable[[Path | str], list[Sample]]] = {
    "mvtec": scan_category,
    "visa": scan_visa,
    "mvtec_ad2": scan_mvtec_ad2,
}
OFFICIAL_PARTS: dict[str, str] = {
    "train": "train",  # MVTec AD train/good, VisA's CSV split=train (2cls: 1/8 to val), MVTec AD 2 train/good
    "validation": "val",  # MVTec AD 2 validation/good: normal only
    "test": "test",  # MVTec AD test/, VisA's CSV split=test
    "test_public": "test",  # MVTec AD 2 test_public/ (test_private* are never scanned)
}
"""The part each `Sample.source` belongs to under `data.protocol=official`."""


def check_layout(layout: str) -> str:
    """`data.layout` as given, or one line naming the choices."""
    if layout not in LAYOUTS:
        raise UserError(
            f"data.layout={layout!r} is not one of {list(LAYOUTS)} — set data.layout to one of those"
        )
    return layout


def check_visa_split_applies(layout: str, protocol: str, visa_split: str) -> None:
    """`data.visa_split` picks the file behind VisA's official parts: another than the default is one line
    under another layout or protocol, where it would change nothing the run reads."""
    check_visa_split(visa_split)
    if visa_split != DEFAULT_VISA_SPLIT and (layout != "visa" or protocol != "official"):
        raise UserError(
            f"data.visa_split={visa_split} picks the VisA split file of data.protocol=official, but this run has "
            f"data.layout={layout} and data.protocol={protocol} — use a VisA category (category=visa/<name>) "
            f"with data.protocol=official, or drop data.visa_split"
        )


def official_train_has_defects(layout: str, visa_split: str = DEFAULT_VISA_SPLIT) -> bool:
    """Whether the official train part holds anomalous images with masks (VisA under a 2cls split file):
    only then can a segmenter train, and choose its checkpoint, on the official parts."""
    return layout == "visa" and labelled_train(visa_split)


def scan(
    category_dir: Path | str, layout: str = DEFAULT_LAYOUT, visa_split: str = DEFAULT_VISA_SPLIT
) -> list[Sample]:
    """Every scored image of a category in `layout`, validated (bad input is one `UserError` line; a file
    name that is not valid UTF-8 too: `io_utils.names`); a VisA category by its split file `visa_split`."""
    check_name(category_dir, "folder name")
    if check_layout(layout) == "visa":
        samples = scan_visa(category_dir, visa_split)
    else:
        if visa_split != DEFAULT_VISA_SPLIT:
            raise ValueError(f"visa_split={visa_split!r} is for data.layout=visa, not {layout}")
        samples = _READERS[layout](category_dir)
    for s in samples:
        for rel in (s.image, s.gt_mask):
            if rel is not None:
                check_name(Path(category_dir) / rel)
    return samples


def official_part(sample: Sample) -> str:
    return OFFICIAL_PARTS[sample.source]


def mask_rule(layout: str) -> str:
    return MASK_RULES[check_layout(layout)]


def load_mask_nonzero(path: Path, size: int, image_size_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a mask whose every non-zero pixel is a defect, resize it bilinearly and keep >= 0.5.

    Binarising before the resize makes 0/1, 0/255 and multi-valued masks alike; thresholding the resized
    fraction at one half keeps the area (thresholding at > 0 would dilate it).
    """
    img = open_image(path)
    if image_size_hw is not None and (img.height, img.width) != tuple(image_size_hw):
        raise UserError(
            f"mask {path} is {img.width}x{img.height} but its image is {image_size_hw[1]}x{image_size_hw[0]} — "
            f"masks must have the size of their images"
        )
    arr = np.asarray(img)
    if arr.ndim == 3:  # colour (alpha ignored) or grey + alpha
        arr = arr[..., : 3 if arr.shape[2] >= 3 else 1].any(axis=2)
    binary = (arr != 0).astype(np.float32)
    if not binary.any():
        return np.zeros((size, size), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(binary).resize((size, size), Image.BILINEAR))
    return (resized >= 0.5).astype(np.uint8)


def decode_mask(
    path: Path,
    size: int,
    image_size_hw: tuple[int, int] | None = None,
    notes: MaskNotes | None = None,
    rule: str = DEFAULT_MASK_RULE,
) -> np.ndarray:
    """A GT mask by its layout's rule: uint8 [size, size] in {0, 1}."""
    if rule == "nonzero":
        return load_mask_nonzero(path, size, image_size_hw)
    if rule != DEFAULT_MASK_RULE:
        raise ValueError(f"unknown mask rule {rule!r}; known: {sorted(set(MASK_RULES.values()))}")
    return load_mask(path, size, image_size_hw, notes)


def decode_mask_native(path: Path, rule: str = DEFAULT_MASK_RULE) -> np.ndarray:
    """A GT mask by its layout's rule at the mask's own size: uint8 [H, W] in {0, 1} (what a benchmark
    scoring at the images' resolution compares with)."""
    if rule == "nonzero":
        arr = np.asarray(open_image(path))
        if arr.ndim == 3:
            arr = arr[..., : 3 if arr.shape[2] >= 3 else 1].any(axis=2)
        return (arr != 0).astype(np.uint8)
    if rule != DEFAULT_MASK_RULE:
        raise ValueError(f"unknown mask rule {rule!r}; known: {sorted(set(MASK_RULES.values()))}")
    unit, _ = binarise(mask_levels(path))
    return (unit >= 0.5).astype(np.uint8)
