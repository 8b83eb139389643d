"""Anomaly generation with textures from files, the published recipe (#9): decoded every pick, or cached.

The paper takes half the anomaly appearances from DTD (`teacher.params.anomalies.texture_dir`). Until this
benchmark's change the generator opened, decoded and resized the picked JPEGs on the training loop's thread in
every step and copied them to the device from pageable memory, which on CUDA makes the host wait for the GPU's
queued work. No other benchmark covered it: they all use the built-in procedural textures. Now each file is
decoded once and kept (uint8) on the images' device (`texture_cache_mb`), misses staged through page-locked
memory.

Without DTD on this machine the folder is DTD-like: ``--files`` JPEGs (quality 90) of procedural textures with
photo-like grain, 300 to 640 px a side as DTD's are; `--texture-dir` measures a real folder instead. For the
published size (256 px, batch 8: 4 anomalous rows, each a texture with probability 1/2) it reports, per
`generate` call on the device present: ms (device-synchronised), files decoded, and on CUDA the host waits
torch's sync debug mode sees; for procedural textures, files decoded on every pick (`texture_cache_mb=0`, as
before) and cached (warm: every file seen once). Then the arithmetic for the published schedule on DTD.

    python benchmarks/texture_cache.py [--size 256] [--batch 8] [--calls 20] [--files 64] [--texture-dir DIR]
        [--tiny] [--out DIR]
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from common import bench_parser, emit, md_table, write_section
from PIL import Image
from transfusion_speed import device_name, object_images, sync

from mvtec_seg.models.transfusion import anomalies
from mvtec_seg.models.transfusion.anomalies import AnomalyGenerator
from mvtec_seg.models.transfusion.image_ops import procedural_textures

DTD_IMAGES = 5640  # DTD: 47 classes x 120 images
BOTTLE_TRAIN, EPOCHS, BATCH = 209, 1500, 8  # the published schedule on bottle


def dtd_like(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEGs like DTD's: textures 300-640 px a side with grain, quality 90."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(300, 641, 2))
        tex = procedural_textures(1, h, w, g, "cpu", torch.float32, rng)[0]
        pixels = tex.permute(1, 2, 0).numpy() * 255 + rng.normal(0, 8, (h, w, 3))
        Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8)).save(
            folder / f"{i:04d}.jpg", quality=90
        )
    return folder


class Decodes:
    """Counts the texture files the generator opens."""

    def __init__(self) -> None:
        self.count = 0
        self._open = anomalies.Image.open

    def __enter__(self) -> Decodes:
        def counting(path, *a, **kw):
            self.count += 1
            return self._open(path, *a, **kw)

        anomalies.Image.open = counting
        return self

    def __exit__(self, *exc) -> None:
        anomalies.Image.open = self._open


def host_waits(fn, device: torch.device) -> int:
    """CUDA sync-debug warnings (host waits, copies from pageable memory included) during ``fn()``."""
    if device.type != "cuda":
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def measure(name: str, gen: AnomalyGenerator, x: torch.Tensor, paths: list[str], calls: int) -> dict:
    device = x.device
    while gen.texture_cache_bytes and len(gen._textures) < len(gen.texture_files):  # warm: every file held
        gen.textures(8, x.shape[2], x.shape[3], device, x.dtype)
    gen.generate(x, paths=paths)  # the foreground cache and the constants
    sync(device)
    with Decodes() as decodes:
        t0 = time.perf_counter()
        for _ in range(calls):
            gen.generate(x, paths=paths)
        sync(device)
        ms = 1e3 * (time.perf_counter() - t0) / calls
    waits = host_waits(lambda: [gen.generate(x, paths=paths) for _ in range(3)], device) / 3
    return {"textures": name, "ms_per_call": ms, "decodes_per_call": decodes.count / calls, "waits": waits}


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--files", type=int, default=64, help="DTD-like JPEGs to make (without --texture-dir)")
    ap.add_argument("--texture-dir", type=Path, default=None, help="a real texture folder, e.g. <dtd>/images")
    args = ap.parse_args()
    if args.tiny:
        args.size, args.batch, args.calls, args.files = 32, 4, 2, 4
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = object_images(args.batch, args.size).to(device)
    paths = [f"train/good/{i:03d}.png" for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.texture_dir or dtd_like(Path(tmp), args.files)
        uncached = AnomalyGenerator(texture_dir=folder, seed=0, texture_cache_mb=0)
        cached = AnomalyGenerator(texture_dir=folder, seed=0)
        rows = [
            measure("procedural (texture_dir: null)", AnomalyGenerator(seed=0), x, paths, args.calls),
            measure("files, decoded every pick (texture_cache_mb=0; before)", uncached, x, paths, args.calls),
            measure("files, cached (warm; now)", cached, x, paths, args.calls),
        ]
    n_files = len(cached.texture_files)
    for r in rows:
        emit("texture_cache", {**r, "size": args.size, "batch": args.batch, "device": device_name(device)})
    before, now = rows[1], rows[2]
    saved = before["ms_per_call"] - now["ms_per_call"]
    per_decode = saved / max(before["decodes_per_call"], 1e-9)
    picks = (BATCH // 2) * 0.5  # anomalous rows x texture probability, at the published batch
    steps = EPOCHS * (BOTTLE_TRAIN // BATCH)
    total = picks * steps
    decoded_cached = DTD_IMAGES * (1 - math.exp(-total / DTD_IMAGES))  # distinct files among the picks
    table = md_table(
        ["textures", "ms per generate call", "files decoded per call", "host waits per call (CUDA)"],
        [
            [r["textures"], f"{r['ms_per_call']:.1f}", f"{r['decodes_per_call']:.2f}", f"{r['waits']:.1f}"]
            for r in rows
        ],
    )
    body = (
        f"`AnomalyGenerator.generate` at {args.size} px, batch {args.batch}, on {device_name(device)}; mean of "
        f"{args.calls} calls after a warm-up, device-synchronised. Texture folder: "
        + (
            f"`{args.texture_dir}`"
            if args.texture_dir
            else f"{n_files} DTD-like JPEGs (300-640 px, quality 90)"
        )
        + f".\n\n{table}\n\nCaching saves {saved:.1f} ms a call here, {per_decode:.1f} ms per file decoded. "
        f"The published schedule on bottle ({EPOCHS} epochs of {BOTTLE_TRAIN // BATCH} batches of {BATCH}) draws "
        f"{picks:g} textures a batch on average, {total:,.0f} in all: decoded every pick, that is {total:,.0f} "
        f"decodes ({total * per_decode / 60e3:.0f} min of the loop's thread at this machine's rate); cached, "
        f"the {DTD_IMAGES:,} DTD images are decoded at most once ({decoded_cached:,.0f} expected distinct), "
        f"{DTD_IMAGES * 3 * args.size**2 / 2**30:.2f} GiB of uint8 when all are held."
    )
    write_section(args, "texture_cache", "Textures from files: decoded every pick or cached (#9)", body)


if __name__ == "__main__":
    main()
