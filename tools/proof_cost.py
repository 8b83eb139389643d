"""The read-time cost of verifying a cached artefact (`io_utils.proofs`) against reading it and a full digest.

    OMP_NUM_THREADS=1 python tools/proof_cost.py [folder] [images]

Writes a float16 map file of `images` x 256 x 256 (default 2400: 315 MB, the maps of a large category at
256 px) into `folder` (default a temporary one), records its proof and times, best of 5 with the file in the
page cache: the proof check `build_once` runs before every use, the format check, a full BLAKE2b digest, and
the memory-mapped load the readers do.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mvtec_seg.io_utils import damage, file_digest, format_problem, write_proof


def best_ms(fn: Callable[[], object], repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main(folder: Path, images: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    maps = folder / "maps.npy"
    np.save(maps, np.random.default_rng(0).random((images, 256, 256), dtype=np.float32).astype(np.float16))
    write_proof(folder)
    print(f"{maps}: {maps.stat().st_size / 1e6:.0f} MB")
    print(f"proof check (size + sampled digest): {best_ms(lambda: damage(folder)):8.2f} ms")
    print(f"format check (.npy header vs size):  {best_ms(lambda: format_problem(maps)):8.2f} ms")
    print(f"full BLAKE2b digest:                 {best_ms(lambda: file_digest(maps), 3):8.0f} ms")
    print(f"np.load(mmap_mode='r'):              {best_ms(lambda: np.load(maps, mmap_mode='r')):8.2f} ms")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(
            Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp),
            int(sys.argv[2]) if len(sys.argv) > 2 else 2400,
        )
