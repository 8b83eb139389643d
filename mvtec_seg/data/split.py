"""The one fixed, seeded 7:1:2 split of a category, saved once as a manifest every run shares.

All test images plus the normal training images are pooled and split per stratum (each defect type, and
the normal images as one stratum), so every part holds every defect type when there are enough images.

``protocol="official"`` (`PROTOCOLS`) instead keeps the dataset's own parts (`layouts.OFFICIAL_PARTS`): for
MVTec AD ``train/good`` is the train part and the whole ``test/`` folder the test part (no val part), as the
published results are computed; for VisA the split file's train/test (`data.visa_split`: under a 2cls file,
whose train rows hold anomalous images too, a seeded 1/8 of the train rows per label is the val part,
`carve_val`); for MVTec AD 2 ``train/good``, ``validation/good`` (a normal-only val part) and ``test_public``.

Every layout (`data.layouts`) is read into the same records; a manifest of another layout than MVTec AD
records its `layout` (which decides how its masks are decoded) and has a file name of its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from mvtec_seg.data.files import describe_changes
from mvtec_seg.data.layouts import (
    DEFAULT_LAYOUT,
    check_layout,
    check_visa_split_applies,
    official_part,
    official_train_has_defects,
    scan,
)
from mvtec_seg.data.mvtec import Sample
from mvtec_seg.data.visa import DEFAULT_VISA_SPLIT, split_file
from mvtec_seg.errors import UserError
from mvtec_seg.io_utils import atomic_write_json, file_lock, format_problem

log = logging.getLogger(__name__)

PARTS: tuple[str, ...] = ("train", "val", "test")
PROTOCOLS: tuple[str, ...] = ("split", "official")
VAL_FRACTION = 1 / 8
"""The share of an official train part that `carve_val` moves to val: train:val 7:1, as in the default ratios."""


def allocate(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """Split n items by ratios with largest remainders; give val and test one item each when n >= 3."""
    total = sum(ratios)
    exact = [n * r / total for r in ratios]
    counts = [int(np.floor(e)) for e in exact]
    order = sorted(range(3), key=lambda i: (exact[i] - counts[i], -i), reverse=True)
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    if n >= 3:
        for i in (1, 2):
            if counts[i] == 0:
                counts[i] = 1
                counts[0] -= 1
    return counts[0], counts[1], counts[2]


def make_split(samples: list[Sample], seed: int, ratios=(0.7, 0.1, 0.2)) -> list[dict]:
    """Assign each sample a part, stratified by defect type; deterministic in (samples, seed)."""
    rng = np.random.default_rng(seed)
    strata: dict[str, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.image):
        strata.setdefault(s.defect_type, []).append(s)
    rows: list[dict] = []
    for defect in sorted(strata):
        group = strata[defect]
        perm = rng.permutation(len(group))
        n_train, n_val, _ = allocate(len(group), tuple(ratios))
        for rank, idx in enumerate(perm):
            part = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
            rows.append({**group[idx].as_dict(), "label": group[idx].label, "part": part})
    rows.sort(key=lambda r: (PARTS.index(r["part"]), r["image"]))
    return rows


def official_split(samples: list[Sample]) -> list[dict]:
    """The dataset's own parts: by the folder (or split-file entry) each image came from, `OFFICIAL_PARTS`."""
    rows = [{**s.as_dict(), "label": s.label, "part": official_part(s)} for s in samples]
    rows.sort(key=lambda r: (PARTS.index(r["part"]), r["image"]))
    return rows


def _image(row: dict) -> str:
    return row["image"]


def carve_val(rows: list[dict], seed: int, fraction: float = VAL_FRACTION) -> list[dict]:
    """Move a seeded `fraction` of the train part to val, per label (at least one of a label with two or
    more rows, never the last): an official split whose train part holds labelled anomalous images but no
    val part (VisA's 2cls files) then has defective val images to choose a checkpoint and threshold on, and
    known normals the teacher never saw to calibrate pseudo masks on. Deterministic in (rows, seed)."""
    rng = np.random.default_rng(seed)
    for label in sorted({r["label"] for r in rows}):
        group = sorted((r for r in rows if r["part"] == "train" and r["label"] == label), key=_image)
        n = len(group)
        n_val = min(n - 1, max(1, int(np.floor(n * fraction + 0.5)))) if n > 1 else 0
        for idx in rng.permutation(n)[:n_val]:
            group[idx]["part"] = "val"
    rows.sort(key=lambda r: (PARTS.index(r["part"]), r["image"]))
    return rows


def _fingerprint(samples: list[Sample], with_source: bool = False, split_file: str | None = None) -> str:
    """The files and their labels; `with_source` adds each file's official part, which outside MVTec AD is
    not a function of its path (VisA's split file says it); `split_file` the name of that file, so two
    files that place this category's images alike still make two manifests."""
    text = "\n".join(
        ([f"split_file={split_file}"] if split_file else [])
        + [
            f"{s.image}|{s.gt_mask}|{s.defect_type}" + (f"|{s.source}" if with_source else "")
            for s in sorted(samples, key=lambda s: s.image)
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _files_of(rows) -> set[str]:
    """The image and mask files named by samples or manifest rows (defect types are their folders)."""
    get = (lambda r, k: r[k]) if rows and isinstance(rows[0], dict) else getattr
    return {get(r, "image") for r in rows} | {get(r, "gt_mask") for r in rows if get(r, "gt_mask")}


def describe_file_changes(manifest: dict, samples: list[Sample]) -> str:
    """'added: a, b (+3 more); removed: c' between a manifest's files and a fresh scan (`describe_changes`
    on the names alone)."""
    before, after = (
        {"root": None, "files": dict.fromkeys(sorted(_files_of(r)), "")}
        for r in (manifest["samples"], samples)
    )
    return describe_changes(before, after) or "the same files under other defect types or official parts"


def manifest_path(
    cache_dir: Path,
    category: str,
    seed: int,
    protocol: str = "split",
    layout: str = DEFAULT_LAYOUT,
    visa_split: str = DEFAULT_VISA_SPLIT,
) -> Path:
    name = (
        f"seed{seed}.json" if protocol == "split" else f"{protocol}.json"
    )  # the official parts have no seed
    if visa_split != DEFAULT_VISA_SPLIT:  # another split file, and a seeded val part
        name = f"{protocol}_{visa_split}_seed{seed}.json"
    prefix = "" if layout == DEFAULT_LAYOUT else f"{layout}_"  # a custom name may exist in two layouts
    return Path(cache_dir) / "splits" / category / f"{prefix}{name}"


MANIFEST_KEYS: tuple[str, ...] = ("category", "seed", "fingerprint", "samples")


def _whole_manifest(path: Path) -> dict | None:
    """The manifest at `path`, or None when there is none or it is damaged (named in one line; the split is
    a function of the files and the seed, so it is made again the same)."""
    if not path.exists():
        return None
    problem = format_problem(path)
    manifest = None if problem else json.loads(path.read_text())
    if manifest is not None and not (
        isinstance(manifest, dict) and all(k in manifest for k in MANIFEST_KEYS)
    ):
        problem, manifest = f"it lacks one of {', '.join(MANIFEST_KEYS)}", None
    if problem:
        log.warning("damaged split manifest %s (%s): making it again", path, problem)
    return manifest


def load_or_create_manifest(
    category_dir: Path,
    cache_dir: Path,
    category: str,
    seed: int,
    ratios=(0.7, 0.1, 0.2),
    protocol: str = "split",
    layout: str = DEFAULT_LAYOUT,
    visa_split: str = DEFAULT_VISA_SPLIT,
) -> tuple[Path, dict]:
    """Return (path, manifest). The manifest is written once per category and seed (and protocol, and VisA
    split file) and reused by every job.

    If the category's files changed since the manifest was written, stop: silently re-splitting would make
    earlier results incomparable.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"data.protocol={protocol!r} must be one of {list(PROTOCOLS)}")
    check_visa_split_applies(check_layout(layout), protocol, visa_split)
    samples = scan(category_dir, layout, visa_split)
    named = None if visa_split == DEFAULT_VISA_SPLIT else split_file(visa_split).as_posix()
    fp = _fingerprint(samples, with_source=layout != DEFAULT_LAYOUT, split_file=named)
    path = manifest_path(cache_dir, category, seed, protocol, layout, visa_split)
    with file_lock(path):
        manifest = _whole_manifest(path)
        if manifest is not None:
            if manifest.get("fingerprint") != fp:
                raise UserError(
                    f"split manifest {path} was made from different files than {category_dir} now holds "
                    f"({describe_file_changes(manifest, samples)}) — "
                    f"delete it to make a new split (earlier results used the old one)"
                )
            if [float(r) for r in manifest.get("ratios", ratios)] != [float(r) for r in ratios]:
                raise UserError(
                    f"split manifest {path} was made with data.split_ratios={manifest['ratios']}, not "
                    f"{list(ratios)} — use those, or another seed, or delete it to make a new split"
                )
            return path, manifest
        manifest = {
            "category": category,
            "category_dir": str(Path(category_dir).resolve()),
            "seed": seed,
            "ratios": list(ratios),
            "fingerprint": fp,
            "samples": make_split(samples, seed, ratios) if protocol == "split" else official_split(samples),
        }
        if protocol != "split":
            manifest["protocol"] = protocol
        if protocol == "official" and official_train_has_defects(layout, visa_split):
            carve_val(manifest["samples"], seed)
        if named:
            manifest["split_file"] = named
        if layout != DEFAULT_LAYOUT:
            manifest["layout"] = layout
        atomic_write_json(path, manifest)
    return path, manifest


def part_counts(manifest: dict) -> dict[str, int]:
    return {p: sum(r["part"] == p for r in manifest["samples"]) for p in PARTS}
