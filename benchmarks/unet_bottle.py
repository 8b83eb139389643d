"""U-Net on GT masks on the real MVTec AD bottle at 256 px: the five test metrics and the time it took.

Figure to beat (the reference work's recipe on these 2 cores): AUPRO 0.856 and pixel AP 0.641 in 34 min,
so the target is better AUPRO and pixel AP in at most 34/3 = 11.3 min.

    .venv/bin/python benchmarks/unet_bottle.py [--epochs 40] [--root ../shared/data/mvtec] [hydra overrides]

Recipe: `experiment=unet_fast_cpu` (128 px training crops of the 256 px images, batch 8, Adam 1e-3, cosine).
"""

from __future__ import annotations

import argparse
import shutil

from common import DEFAULT_MVTEC, ROOT, CpuClock, emit, require_category

from mvtec_seg.config import compose_config
from mvtec_seg.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(DEFAULT_MVTEC))
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args()
    require_category(args.root, "bottle")
    run_dir = ROOT / "outputs" / "benchmarks" / "unet_bottle"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        "category=bottle",
        f"data.root={args.root}",
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
    emit(
        "unet_bottle",
        {
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
        },
    )


if __name__ == "__main__":
    main()
