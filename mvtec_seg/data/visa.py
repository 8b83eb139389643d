"""Reader for VisA as distributed: `<root>/<category>/Data/Images/{Normal,Anomaly}/`, the masks in
`<root>/<category>/Data/Masks/Anomaly/<image stem>.png`, and one of its split files `<root>/split_csv/<name>.csv`
(columns object, split, label, image, mask; paths relative to `<root>`): `1cls.csv` (the one-class split,
train rows normal only) or, by `data.visa_split`, `2cls_highshot.csv` / `2cls_fewshot.csv`, whose train rows
also hold anomalous images with their masks (the supervised settings; `VISA_SPLITS`).

The folders and the split file are both read and must agree, so a file the CSV names but the tree lacks (or
the reverse) stops the run with one line instead of silently dropping an image from one protocol. VisA has
no defect-type folders: every anomalous image has the defect type `anomaly`. Its masks mark a defect with
any non-zero value (0/1 or 0/255), so they are decoded by the `nonzero` mask rule (`data.layouts`).
"""

from __future__ import annotations

import csv
from pathlib import Path

from mvtec_seg.data.mvtec import Sample, _dead_link, _images_in, check_one_mask_each
from mvtec_seg.errors import UserError

SPLIT_DIR = Path("split_csv")
"""Where VisA's split files lie, relative to the folder that holds the categories."""
VISA_SPLITS: dict[str, bool] = {"1cls": False, "2cls_highshot": True, "2cls_fewshot": True}
"""VisA's split files by name (`data.visa_split`; `split_csv/<name>.csv`): whether its train rows hold
anomalous images with masks beside the normal ones (what lets a segmenter train under the official parts)."""
DEFAULT_VISA_SPLIT = "1cls"
CSV_COLUMNS: tuple[str, ...] = ("object", "split", "label", "image", "mask")
ANOMALY = "anomaly"
_LABELS = {"normal": "good", "anomaly": ANOMALY}
_SPLITS = ("train", "test")


def check_visa_split(split: str) -> str:
    """`data.visa_split` as given, or one line naming the choices."""
    if split not in VISA_SPLITS:
        raise UserError(
            f"data.visa_split={split!r} is not one of {list(VISA_SPLITS)} — set data.visa_split to one of those"
        )
    return split


def labelled_train(split: str) -> bool:
    """Whether the split file's train rows hold anomalous images with masks (a 2cls file)."""
    return VISA_SPLITS[check_visa_split(split)]


def split_file(split: str = DEFAULT_VISA_SPLIT) -> Path:
    """The split file `split`, relative to the folder that holds the categories."""
    return SPLIT_DIR / f"{check_visa_split(split)}.csv"


def split_csv_path(category_dir: Path | str, split: str = DEFAULT_VISA_SPLIT) -> Path:
    return Path(category_dir).parent / split_file(split)


def _missing_file(csv_path: Path, name: str, split: str) -> UserError:
    """The one line for a split file that is not there (the 2cls ones say what else to do)."""
    fix = f"put the split_csv/ folder that comes with VisA into data.root (beside {name}/)"
    if split != DEFAULT_VISA_SPLIT:
        fix += (
            f": data.visa_split={split} reads {csv_path.name} from it — or use data.visa_split="
            f"{DEFAULT_VISA_SPLIT} (the one-class split)"
        )
    return UserError(f"VisA split file {csv_path} not found — {fix}")


def _read_rows(csv_path: Path, name: str, split: str = DEFAULT_VISA_SPLIT) -> dict[str, dict[str, str]]:
    """`{image path relative to the category folder: row}` for one object, every value checked."""
    _dead_link(csv_path)
    if not csv_path.is_file():
        raise _missing_file(csv_path, name, split)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(
                    f"VisA split file {csv_path} has no column {missing[0]} (found {reader.fieldnames}) — it "
                    f"needs the columns {','.join(CSV_COLUMNS)}"
                )
            raw = list(enumerate(reader, start=2))  # line 1 is the header
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read VisA split file {csv_path}: {err} — restore the file") from None
    rows: dict[str, dict[str, str]] = {}
    prefix = f"{name}/"
    for line, row in raw:
        if (row.get("object") or "").strip() != name:
            continue
        row = {k: (row.get(k) or "").strip() for k in CSV_COLUMNS}
        where = f"VisA split file {csv_path} line {line}"
        if row["split"] not in _SPLITS or row["label"] not in _LABELS:
            raise UserError(
                f"{where} has split={row['split']!r}, label={row['label']!r} — split must be one of "
                f"{list(_SPLITS)} and label one of {list(_LABELS)}"
            )
        for key in ("image", "mask"):
            if row[key] and not row[key].startswith(prefix):
                raise UserError(f"{where}: {key} {row[key]} is not inside {prefix} — fix the path in the CSV")
        if (row["label"] == ANOMALY) != bool(row["mask"]):
            raise UserError(
                f"{where} has label={row['label']} with mask={row['mask'] or None!r} — an anomaly row needs a "
                f"mask path, a normal row none: fix the mask column"
            )
        rel = row["image"][len(prefix) :]
        if rel in rows:
            raise UserError(f"{where} lists {row['image']} a second time — remove the duplicate row")
        rows[rel] = row | {"line": str(line)}
    if not rows:
        raise UserError(
            f"VisA split file {csv_path} lists no image of {name} (object column) — use the {csv_path.name} that "
            f"comes with VisA, or name the category folder after its object"
        )
    return rows


def _check_masks(anomaly_dir: Path, mask_dir: Path, images: list[Path]) -> None:
    """Exactly one `<stem>.png` mask per anomalous image."""
    if not mask_dir.is_dir():
        raise UserError(
            f"{anomaly_dir} has no mask folder {mask_dir} — add {mask_dir}/<image name>.png for each of its "
            f"{len(images)} images"
        )
    check_one_mask_each(anomaly_dir, images, mask_dir, ".png", "anomaly image")


def scan_visa(category_dir: Path | str, split: str = DEFAULT_VISA_SPLIT) -> list[Sample]:
    """Every image of a VisA category, its mask and its part in the split file `split` (`source`: `train` or
    `test`; under a 2cls file `train` holds anomalous images too)."""
    root = Path(category_dir)
    check_visa_split(split)
    _dead_link(root)
    if not root.is_dir():
        raise UserError(
            f"data folder not found: {root} — set data.root to the folder that holds your VisA categories and "
            f"split_csv/"
        )
    images_dir, mask_dir = root / "Data" / "Images", root / "Data" / "Masks" / "Anomaly"
    for folder in (root / "Data", images_dir, images_dir / "Normal", images_dir / "Anomaly", mask_dir):
        _dead_link(folder)
    normal = _images_in(images_dir / "Normal") if (images_dir / "Normal").is_dir() else []
    if not normal:
        raise UserError(
            f"{images_dir / 'Normal'} is missing or has no images — every VisA category needs normal images"
        )
    anomaly_dir = images_dir / "Anomaly"
    anomalous = _images_in(anomaly_dir) if anomaly_dir.is_dir() else []
    if not anomalous:
        raise UserError(
            f"{anomaly_dir} is missing or has no images — a VisA category needs anomalous images there, with "
            f"their masks in {mask_dir}"
        )
    _check_masks(anomaly_dir, mask_dir, anomalous)
    csv_path = split_csv_path(root, split)
    rows = _read_rows(csv_path, root.name, split)
    samples: list[Sample] = []
    for label, files in (("normal", normal), (ANOMALY, anomalous)):
        for p in files:
            rel = p.relative_to(root).as_posix()
            row = rows.pop(rel, None)
            if row is None:
                raise UserError(
                    f"image {p} is not listed in VisA split file {csv_path} — add its row "
                    f"({','.join(CSV_COLUMNS)}) or remove the image"
                )
            mask = (mask_dir / f"{p.stem}.png").relative_to(root).as_posix() if label == ANOMALY else None
            if row["label"] != label or (mask is not None and row["mask"] != f"{root.name}/{mask}"):
                raise UserError(
                    f"VisA split file {csv_path} line {row['line']} says label={row['label']}, "
                    f"mask={row['mask'] or None} for {p}, but the tree has it as {label} with mask "
                    f"{mask and root.parent / root.name / mask} — fix the row"
                )
            samples.append(Sample(rel, mask, _LABELS[label], row["split"]))
    if rows:
        first = min(rows.values(), key=lambda r: int(r["line"]))
        raise UserError(
            f"VisA split file {csv_path} line {first['line']} names {root.parent / first['image']}, which does "
            f"not exist ({len(rows)} such row{'s' if len(rows) > 1 else ''}) — restore the files or remove the rows"
        )
    return samples
