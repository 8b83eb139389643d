"""Lightning's overhead: U-Net training throughput under Lightning vs a plain PyTorch loop, same process.

Same model initialisation, data, batch size and optimiser; both timed from the end of the first batch to the
end of the last (data loading included), alternating the two loops to cancel drift.

    .venv/bin/python benchmarks/lightning_overhead.py [--batches 30] [--rounds 2] [--root ../shared/data/mvtec]
        [--tiny] [--out DIR]   (--tiny: 3 batches, 1 round, synthetic category at 64 px)
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time

import pytorch_lightning as pl
import torch
from common import DEFAULT_MVTEC, bench_parser, emit, md_table, write_section

from mvtec_seg.builders import build_datamodule, build_model
from mvtec_seg.callbacks import Throughput
from mvtec_seg.config import compose_config


def plain_loop(model, loader, batches: int) -> float:
    """Images/s of a hand-written training loop."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    images, mark = 0, None
    for i, batch in enumerate(loader):
        if i == batches:
            break
        logits = model.net(batch["image"])
        loss = model.criterion(logits, batch["target_mask"])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        now = time.perf_counter()
        if mark is None:
            mark, t_first = now, now
            continue
        images += len(batch["image"])
    return images / (time.perf_counter() - t_first)


def lightning_loop(model, loader, batches: int) -> float:
    meter = Throughput()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=batches,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[meter],
    )
    trainer.fit(model, train_dataloaders=loader)
    return meter.images_per_s


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--root", default=str(DEFAULT_MVTEC))
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    overrides = ["model=unet", "trainer.enable_progress_bar=false"]
    if args.tiny:
        args.batches, args.rounds = 3, 1
        overrides += ["category=synthetic", "data.image_size=64"]
    elif (DEFAULT_MVTEC / args.category).is_dir() or args.root != str(DEFAULT_MVTEC):
        overrides += [f"category={args.category}", f"data.root={args.root}"]
    tmp = tempfile.mkdtemp()
    cfg = compose_config(overrides, run_dir=tmp)
    pl.seed_everything(0)
    dm = build_datamodule(cfg)
    dm.prepare()
    base = build_model(cfg)
    plain, light = [], []
    for _ in range(args.rounds):
        plain.append(plain_loop(copy.deepcopy(base), dm.train_dataloader(), args.batches))
        light.append(lightning_loop(copy.deepcopy(base), dm.train_dataloader(), args.batches))
    p, lt = statistics.median(plain), statistics.median(light)
    result = {
        "command": "benchmarks/lightning_overhead.py " + " ".join(overrides),
        "image_size": int(cfg.data.image_size),
        "batch_size": int(cfg.data.batch_size),
        "plain_images_per_s": plain,
        "lightning_images_per_s": light,
        "ratio_lightning_over_plain": lt / p,
        "target": 0.95,
    }
    emit("lightning_overhead", result)
    rows = [
        ["plain PyTorch", ", ".join(f"{v:.2f}" for v in plain)],
        ["Lightning (`pl.Trainer`)", ", ".join(f"{v:.2f}" for v in light)],
    ]
    write_section(
        args,
        "lightning_overhead",
        "Lightning's overhead",
        f"U-Net, {' '.join(overrides)}, image size {int(cfg.data.image_size)}, batch {int(cfg.data.batch_size)}, "
        "same initial weights and data, both loops timed from the end of the first batch to the end of the "
        f"last (data loading included), alternating:\n\n{md_table(['loop', f'images/s ({args.rounds} rounds)'], rows)}"
        f"\n\nRatio Lightning / plain (medians): **{lt / p:.3f}** (target >= 0.95).",
    )


if __name__ == "__main__":
    main()
