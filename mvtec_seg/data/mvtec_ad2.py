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

from mvtec_seg.data.mvtec import Sample, _dead_link, _images_in, defect_samples, image_hw
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


def private_test_images(category_dir: Path | str, category: str | None = None) -> list[tuple[Path, str]]:
    """(file, `<category>/<split>/<stem>`) of every image of `test_private/` and `test_private_mixed/`: the
    images the server scores, named as its folder structure wants them (`category`: the run's, else the
    folder's name)."""
    root = Path(category_dir)
    category = category or root.name
    out: list[tuple[Path, str]] = []
    for split in PRIVATE_SPLITS:
        folder = root / split
        _dead_link(folder)
        if folder.is_dir():
            out += [(p, f"{category}/{split}/{p.stem}") for p in _images_in(folder)]
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


# ------------------------------------------------------------------------------------- submission check
SUBMISSION_SUFFIX: dict[str, str] = {SUBMISSION_MAPS: ".tiff", SUBMISSION_MASKS: ".png"}


def submission_categories() -> tuple[str, ...]:
    """The eight categories the server scores (the `category/mvtec_ad2/*.yaml` files)."""
    from mvtec_seg.data.layouts import CATEGORIES  # layouts imports this module

    return CATEGORIES["mvtec_ad2"]


def _map_problem(path: Path) -> tuple[str | None, tuple[int, ...] | None]:
    """Why a map file is not a 2-D float16 TIFF (None if it is), and its shape."""
    import tifffile

    try:
        arr = tifffile.imread(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one problem line
        return f"{path}: not a readable TIFF ({type(err).__name__}) — write it again", None
    if arr.ndim != 2 or arr.dtype != np.float16:
        return f"{path}: {arr.dtype} {list(arr.shape)}, the server takes 2-D float16 — write it again", None
    return None, tuple(arr.shape)


def _mask_problem(path: Path) -> tuple[str | None, tuple[int, ...] | None]:
    """Why a mask file is not a 2-D 8-bit PNG holding only 0 and 255 (None if it is), and its shape."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            fmt = im.format
            arr = np.asarray(im)
    except Exception as err:  # noqa: BLE001
        return f"{path}: not a readable PNG ({type(err).__name__}) — write it again", None
    if fmt != "PNG" or arr.ndim != 2 or arr.dtype != np.uint8:
        return f"{path}: {fmt} {arr.dtype} {list(arr.shape)}, the server takes a 2-D 8-bit PNG", None
    bad = sorted(set(np.unique(arr).tolist()) - {0, 255})
    if bad:
        return f"{path}: holds values {bad[:5]} besides 0 and 255 — threshold it to 0/255", None
    return None, tuple(arr.shape)


def _names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_submission(
    folder: Path | str, data_root: Path | str | None = None, category_dirs: dict[str, Path] | None = None
) -> list[str]:
    """Every reason MVTec AD 2's upload checker would refuse `folder`, one line each (empty: it passes).

    The folder must hold `anomaly_images/` and `anomaly_images_thresholded/` and nothing else; each the eight
    categories, each category both private splits, each split one file per private test image and nothing
    else (a temporary file left by a killed write is refused); maps 2-D float16 TIFFs, masks 2-D 8-bit PNGs of
    0 and 255, a map and its mask of one size. With `data_root` (the folder holding the eight categories),
    the files of a split must be named after its images, one each, at the image's size; without it, the maps
    and masks of a split must name the same images. `category_dirs` names a category's folder where it is not
    `data_root/<category>` (a renamed folder)."""
    out = Path(folder)
    if not out.is_dir():
        return [f"{out}: not a folder — pass the submission folder (holding {SUBMISSION_MAPS}/)"]
    problems: list[str] = []
    tops = tuple(SUBMISSION_SUFFIX)
    problems += [
        f"{p}: not part of a submission — remove it" for p in sorted(out.iterdir()) if p.name not in tops
    ]
    categories = submission_categories()
    found: dict[tuple[str, str, str], dict[str, Path]] = {}
    for top, suffix in SUBMISSION_SUFFIX.items():
        if not (out / top).is_dir():
            problems.append(
                f"{out / top}: missing — run predict format=mvtec_ad2 output={out} for each category"
            )
            continue
        for p in sorted((out / top).iterdir()):
            if p.name not in categories:
                problems.append(f"{p}: not one of the eight categories ({', '.join(categories)}) — remove it")
        for category in categories:
            cat = out / top / category
            if not cat.is_dir():
                problems.append(
                    f"{cat}: missing — predict format=mvtec_ad2 with the run of category {category}"
                )
                continue
            for p in sorted(cat.iterdir()):
                if p.name not in PRIVATE_SPLITS:
                    problems.append(f"{p}: not one of {' or '.join(PRIVATE_SPLITS)} — remove it")
            for split in PRIVATE_SPLITS:
                where = cat / split
                if not where.is_dir():
                    problems.append(f"{where}: missing — predict format=mvtec_ad2 again for {category}")
                    continue
                files = found.setdefault((top, category, split), {})
                for p in sorted(where.iterdir()):
                    if p.is_file() and p.suffix == suffix and not p.name.startswith("."):
                        files[p.stem] = p
                    else:
                        problems.append(f"{p}: not a {suffix} file of the submission — remove it")
    shapes: dict[tuple[str, str, str], tuple[int, ...]] = {}
    for (top, category, split), files in sorted(found.items()):
        for stem, path in sorted(files.items()):
            problem, shape = (_map_problem if top == SUBMISSION_MAPS else _mask_problem)(path)
            if problem:
                problems.append(problem)
            elif shape is not None:
                other = shapes.setdefault((category, split, stem), shape)
                if other != shape:
                    problems.append(f"{path}: {list(shape)} pixels, its map/mask has {list(other)}")
    for category in categories:
        for split in PRIVATE_SPLITS:
            maps = found.get((SUBMISSION_MAPS, category, split))
            masks = found.get((SUBMISSION_MASKS, category, split))
            if maps is None and masks is None:  # missing: said above
                continue
            base = (category_dirs or {}).get(category)
            if base is None and data_root is not None:
                base = Path(data_root) / category
            if base is not None:
                images = base / split
                expected = {p.stem: p for p in _images_in(images)} if images.is_dir() else {}
                if not expected:
                    problems.append(f"{images}: no images to check the submission against — fix data_root=")
                    continue
                for top, files in ((SUBMISSION_MAPS, maps), (SUBMISSION_MASKS, masks)):
                    if files is None:
                        continue
                    where = out / top / category / split
                    missing = sorted(set(expected) - set(files))
                    extra = sorted(set(files) - set(expected))
                    if missing:
                        problems.append(
                            f"{where}: {len(files)} files, {len(expected)} images — missing {_names(missing)}"
                        )
                    if extra:
                        problems.append(
                            f"{where}: no image of {images} is named {_names(extra)} — remove them"
                        )
                for stem, image in sorted(expected.items()):
                    shape = shapes.get((category, split, stem))
                    if shape is not None and image_hw(image) != shape:
                        problems.append(
                            f"{out}/*/{category}/{split}/{stem}: {list(shape)} pixels, the image has "
                            f"{list(image_hw(image))} — predict it again"
                        )
            elif maps is not None and masks is not None and set(maps) != set(masks):
                odd = sorted(set(maps) ^ set(masks))
                problems.append(
                    f"{category}/{split}: {len(maps)} maps and {len(masks)} masks; only one of them for "
                    f"{_names(odd)}"
                )
    return problems
