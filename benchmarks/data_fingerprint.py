"""What it costs to fingerprint a category's files: size+mtime (stat) against a content hash (issue #7).

Every run fingerprints its data to key the cached artefacts, so this cost is paid per job. Measured on the
real bottle (900 px PNGs): `stat` of every file, SHA-256 and BLAKE2b of every file with the page cache warm,
the project's `data.files.file_state` (BLAKE2b on 4 threads), and SHA-256 with the files evicted from the page cache first (`posix_fadvise(DONTNEED)`, no root needed),
alternating the methods in one process; decoding the category once at 256 px is timed for scale.

    .venv/bin/python benchmarks/data_fingerprint.py [--root ../shared/data/mvtec] [--category bottle]
        [--repeats 5] [--tiny] [--out DIR]
        (--tiny: a generated synthetic category of 32 px images in a temporary folder, 1 round)
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import DEFAULT_MVTEC, bench_parser, emit, md_table, require_category, write_section


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


def _tiny_category(tmp: Path) -> Path:
    """A small generated category (synthetic object, 32 px, 9 images and 4 masks): seconds, no shared data."""
    from mvtec_seg.data.synthetic import generate_category

    return generate_category(tmp, image_size=32, n_train=4, n_test_good=1, n_test_per_defect=1)


METHODS = {
    "stat": "size + mtime (`stat`)",
    "sha256_warm": "SHA-256, page cache warm",
    "blake2b_warm": "BLAKE2b, page cache warm",
    "file_state_warm": "`data.files.file_state` (BLAKE2b, 4 threads), warm",
    "sha256_cold": "SHA-256, files evicted from the page cache",
}


def measure(category: Path, repeats: int, decode_size: int) -> dict:
    """Seconds per method and round (all files together), and one decode of every image, for scale."""
    files = _files(category)
    total = sum(p.stat().st_size for p in files)
    _hash(files, "sha256")  # warm the page cache
    from mvtec_seg.data.files import file_state

    rels = [p.relative_to(category).as_posix() for p in files]
    times: dict[str, list[float]] = {k: [] for k in METHODS}
    for _ in range(repeats):  # alternate, so load from other jobs spreads over every method
        times["stat"].append(_timed(lambda: _stat(files)))
        times["sha256_warm"].append(_timed(lambda: _hash(files, "sha256")))
        times["blake2b_warm"].append(_timed(lambda: _hash(files, "blake2b")))
        times["file_state_warm"].append(_timed(lambda: file_state(category, rels)))  # what runs use
        _evict(files)
        times["sha256_cold"].append(_timed(lambda: _hash(files, "sha256")))

    from mvtec_seg.data.mvtec import load_rgb

    images = [p for p in files if "ground_truth" not in p.parts and p.suffix == ".png"]
    decode_s = _timed(lambda: [load_rgb(p, decode_size) for p in images])
    return {"n_files": len(files), "total_bytes": total, "times": times, "decode_s": decode_s}


def section(args, category: str, m: dict, decode_size: int) -> None:
    med = {k: statistics.median(v) for k, v in m["times"].items()}
    low = {k: min(v) for k, v in m["times"].items()}
    base = max(med["stat"], 1e-9)
    rows = [
        [label, f"{1e3 * med[k]:.2f}", f"{1e3 * low[k]:.2f}", f"{med[k] / base:.0f}"]
        for k, label in METHODS.items()
    ]
    rows.append(
        [f"decode every image once at {decode_size} px (for scale)", f"{1e3 * m['decode_s']:.0f}", "—", "—"]
    )
    rounds = f"{args.repeats} round" + ("s" if args.repeats != 1 else "")
    write_section(
        args,
        "data_fingerprint",
        "Fingerprinting a category's files: stat against a content hash (#7)",
        f"Category `{category}`: {m['n_files']} files, {m['total_bytes'] / 1e6:.2f} MB. Times for all files "
        f"together, median and minimum of {rounds} alternating the methods in one process (load from other "
        f"jobs spreads over every method); the ratio is the median to the median of `stat`:\n\n"
        + md_table(["method", "median (ms)", "min (ms)", "x stat"], rows),
    )


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--root", type=Path, default=DEFAULT_MVTEC)
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    decode_size = 256
    if args.tiny:
        args.repeats, decode_size = 1, 32
        with tempfile.TemporaryDirectory(prefix="data_fingerprint_") as tmp:
            r = measure(_tiny_category(Path(tmp)), args.repeats, decode_size)
        name = "synthetic (generated, 32 px)"
    else:
        r = measure(require_category(args.root, args.category), args.repeats, decode_size)
        name = args.category
    emit(
        "data_fingerprint",
        {
            "category": name,
            "n_files": r["n_files"],
            "total_mb": round(r["total_bytes"] / 1e6, 1),
            "median_s": {k: round(statistics.median(v), 4) for k, v in r["times"].items()},
            "min_s": {k: round(min(v), 4) for k, v in r["times"].items()},
            f"decode_{decode_size}px_once_s": round(r["decode_s"], 2),
            "repeats": args.repeats,
        },
    )
    section(args, name, r, decode_size)


if __name__ == "__main__":
    main()
