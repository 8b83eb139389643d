"""What it costs to fingerprint a category's files: size+mtime (stat) against a content hash (issue #7).

Every run fingerprints its data to key the cached artefacts, so this cost is paid per job. Measured on the
real bottle (900 px PNGs): `stat` of every file, SHA-256 and BLAKE2b of every file with the page cache warm,
the project's `data.files.file_state` (BLAKE2b on 4 threads), and SHA-256 with the files evicted from the page cache first (`posix_fadvise(DONTNEED)`, no root needed),
alternating the methods in one process; decoding the category once at 256 px is timed for scale.

    .venv/bin/python benchmarks/data_fingerprint.py [--root ../shared/data/mvtec] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from pathlib import Path

from common import DEFAULT_MVTEC, emit, require_category


def _files(category: Path) -> list[Path]:
    return sorted(p for p in category.rglob("*") if p.is_file())


def _stat(files: list[Path]) -> None:
    for p in files:
        st = p.stat()
        _ = (st.st_size, st.st_mtime_ns)


def _hash(files: list[Path], algo: str) -> None:
    for p in files:
        with open(p, "rb") as fh:
            hashlib.file_digest(fh, algo).hexdigest()


def _evict(files: list[Path]) -> None:
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=DEFAULT_MVTEC)
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    category = require_category(args.root, args.category)
    files = _files(category)
    total = sum(p.stat().st_size for p in files)
    _hash(files, "sha256")  # warm the page cache
    from mvtec_seg.data.files import file_state

    rels = [p.relative_to(category).as_posix() for p in files]
    times: dict[str, list[float]] = {
        "stat": [],
        "sha256_warm": [],
        "blake2b_warm": [],
        "file_state_warm": [],
        "sha256_cold": [],
    }
    for _ in range(args.repeats):  # alternate, so load from other jobs spreads over every method
        times["stat"].append(_timed(lambda: _stat(files)))
        times["sha256_warm"].append(_timed(lambda: _hash(files, "sha256")))
        times["blake2b_warm"].append(_timed(lambda: _hash(files, "blake2b")))
        times["file_state_warm"].append(_timed(lambda: file_state(category, rels)))  # what runs use
        _evict(files)
        times["sha256_cold"].append(_timed(lambda: _hash(files, "sha256")))

    from mvtec_seg.data.mvtec import load_rgb

    images = [p for p in files if "ground_truth" not in p.parts and p.suffix == ".png"]
    decode_s = _timed(lambda: [load_rgb(p, 256) for p in images])
    emit(
        "data_fingerprint",
        {
            "category": args.category,
            "n_files": len(files),
            "total_mb": round(total / 1e6, 1),
            "median_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
            "min_s": {k: round(min(v), 4) for k, v in times.items()},
            "decode_256px_once_s": round(decode_s, 2),
            "repeats": args.repeats,
        },
    )


if __name__ == "__main__":
    main()
