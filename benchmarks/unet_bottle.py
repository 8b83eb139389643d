"""U-Net on GT masks on the real MVTec AD bottle at 256 px: the five test metrics and the time it took.

Figure to beat (the reference work's recipe on these 2 cores): AUPRO 0.856 and pixel AP 0.641 in 34 min,
so the target is better AUPRO and pixel AP in at most 34/3 = 11.3 min.

    .venv/bin/python benchmarks/unet_bottle.py [--epochs 40] [--root ../shared/data/mvtec] [hydra overrides]
        [--tiny] [--out DIR]   (--tiny: one `debug=fast` epoch on the built-in synthetic category)

Recipe: `experiment=unet_fast_cpu` (128 px training crops of the 256 px images, batch 8, Adam 1e-3, cosine).
"""

from __future__ import annotations

import shutil

from common import (
    DEFAULT_MVTEC,
    ROOT,
    CpuClock,
    bench_parser,
    emit,
    md_table,
    require_category,
    write_section,
)

from mvtec_seg.config import compose_config
from mvtec_seg.train import train


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--root", default=str(DEFAULT_MVTEC))
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args()
    if args.tiny:
        data = ["category=synthetic", "debug=fast"]
        args.epochs = 1
    else:
        require_category(args.root, "bottle")
        data = ["category=bottle", f"data.root={args.root}"]
    run_dir = ROOT / "outputs" / "benchmarks" / ("unet_bottle_tiny" if args.tiny else "unet_bottle")
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        *data,
        "experiment=unet_fast_cpu",
        "mask=gt",
        f"seed={args.seed}",
        f"model.max_epochs={args.epochs}",
        "trainer.enable_progress_bar=false",
        *args.overrides,
    ]
    cfg = compose_config(overrides, run_dir=run_dir)
    with CpuClock() as clock:
        summary = train(cfg)
    result = {
        "command": "benchmarks/unet_bottle.py " + " ".join(overrides),
        "metrics": summary["metrics"],
        "params": summary["params"],
        "wall_s": clock.wall_s,
        "cpu_s": clock.cpu_s,
        "train_s": summary["time"]["train_s"],
        "train_images_per_s": summary["throughput"]["train_images_per_s"],
        "reference": {"wall_s": 34 * 60, "pixel_AUPRO": 0.856, "pixel_AP": 0.641},
        "beats_reference": summary["metrics"]["test/pixel_AUPRO"] > 0.856
        and summary["metrics"]["test/pixel_AP"] > 0.641
        and clock.wall_s <= 34 * 60 / 3,
    }
    emit("unet_bottle", result)
    m = summary["metrics"]
    names = ("image_AUROC", "pixel_AUROC", "pixel_AP", "pixel_AUPRO", "IoU")
    rows = [
        [
            "reference recipe (31 M U-Net, 8 epochs, Adam 1e-4, batch 4)",
            "0.959",
            "0.944",
            "0.641",
            "0.856",
            "0.465",
            "34 min",
            "—",
        ],
        [
            f"mvtec_seg U-Net ({(summary['params'] or 0) / 1e6:.1f} M), {args.epochs} epochs",
            *(f"{m[f'test/{k}']:.3f}" for k in names),
            f"{clock.wall_s:.0f} s",
            f"{clock.cpu_s:.0f} s",
        ],
    ]
    table = md_table(
        ["", "image AUROC", "pixel AUROC", "pixel AP", "AUPRO", "IoU", "wall time", "CPU time"], rows
    )
    verdict = "met" if result["beats_reference"] else "not met"
    write_section(
        args,
        "unet_bottle",
        "U-Net on GT masks, MVTec bottle, 256 px",
        f"{table}\n\nTarget (better AUPRO and pixel AP than the reference in at most 34/3 = 11.3 min of wall "
        f"time): **{verdict}**. Training throughput: {summary['throughput']['train_images_per_s']:.1f} images/s.",
    )


if __name__ == "__main__":
    main()
