"""What writing ``last.ckpt`` (the resume checkpoint) costs the TransFusion teacher's training loop (#9).

Fits the teacher's LightningModule with the project's own resume callbacks (`builders.resume_callbacks`)
twice: ``last.ckpt`` after every epoch (``checkpoint.last_every_s=0``, what 0.1.x to 0.3 did) and at the
configured default interval. For each it reports the epoch time (median over the epochs between the first
and the last, which both configurations write), the time of one write (device synchronised before) and the
file size. The published network's checkpoint (weights and AdamW state) does not depend on the image size,
so the CPU measures the write at a small size; a GPU run at 256 px gives the share of a real epoch
(`benchmarks/gpu_transfusion.sh`; a bottle epoch is 26 steps of 8 images).

    python benchmarks/resume_checkpoint.py [--net paper|default] [--size 32] [--batch 2]
        [--steps-per-epoch 4] [--epochs 5] [--tiny] [--out DIR]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from common import bench_parser, emit, md_table, write_section
from transfusion_speed import device_name, device_precision, lightning_fit, net_params, sync

from mvtec_seg.builders import resume_callbacks
from mvtec_seg.callbacks import ResumeCheckpoint
from mvtec_seg.config import compose_config


def fit(args, every_s: float, device: torch.device, folder: Path) -> dict:
    """One fit writing ``folder/last.ckpt`` at ``every_s``: epoch and write times, writes, file size."""
    starts: list[float] = []
    writes: list[float] = []

    class EpochClock(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            sync(device)
            starts.append(time.perf_counter())

    callbacks = resume_callbacks(folder, every_s)
    ckpt = next(c for c in callbacks if isinstance(c, ResumeCheckpoint))
    save = ckpt._save_checkpoint

    def timed_save(trainer, filepath):
        sync(device)
        t0 = time.perf_counter()
        save(trainer, filepath)
        writes.append(time.perf_counter() - t0)

    ckpt._save_checkpoint = timed_save
    lightning_fit(
        net_params(args.net == "paper", args.size),
        args.size,
        args.batch,
        args.steps_per_epoch,
        device,
        [EpochClock(), *callbacks],
        precision=device_precision(device),
        max_epochs=args.epochs,
    )
    epochs = [b - a for a, b in zip(starts, starts[1:], strict=False)][1:]  # without the first (warm-up)
    return {
        "every_s": every_s,
        "writes": len(writes),
        "epoch_s": statistics.median(epochs),
        "write_s": statistics.median(writes),
        "size_MB": (folder / "last.ckpt").stat().st_size / 1e6,
    }


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--net", default="paper", choices=["paper", "default"])
    ap.add_argument("--size", type=int, default=32, help="image size (the checkpoint does not depend on it)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps-per-epoch", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=5, help="at least 3: the first and last are not timed")
    args = ap.parse_args()
    if args.tiny:
        args.net, args.size, args.steps_per_epoch, args.epochs = "default", 32, 1, 3
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default_s = float(compose_config([], run_dir="/tmp/unused").checkpoint.last_every_s)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for every_s in (0.0, default_s):
            r = fit(args, every_s, device, Path(tmp) / f"every_{every_s:g}")
            r |= {"net": args.net, "size": args.size, "batch": args.batch, "device": device_name(device)}
            emit("resume_checkpoint", r)
            rows.append(r)
    table = md_table(
        ["last.ckpt", f"writes in {args.epochs} epochs", "epoch s (median)", "one write s", "checkpoint MB"],
        [
            [
                "every epoch" if r["every_s"] == 0 else f"every {r['every_s']:g} s (default)",
                r["writes"],
                f"{r['epoch_s']:.2f}",
                f"{r['write_s']:.2f}",
                f"{r['size_MB']:.0f}",
            ]
            for r in rows
        ],
    )
    every, interval = rows
    extra = every["epoch_s"] - interval["epoch_s"]
    body = (
        f"{args.net} network, {args.size} px, batch {args.batch}, {args.steps_per_epoch} steps an epoch, "
        f"{args.epochs} epochs, on {device_name(device)}. Epoch times are medians over epochs 2 to "
        f"{args.epochs - 1} (the first warms up; the last writes in both).\n\n{table}\n\n"
        f"Writing last.ckpt every epoch adds {extra:.2f} s to each epoch ({extra / interval['epoch_s']:+.0%}) "
        f"on this device at this size."
    )
    write_section(args, "resume_checkpoint", "Resume checkpoint cost in the teacher's loop (#9)", body)


if __name__ == "__main__":
    main()
