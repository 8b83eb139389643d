"""The seed experiment at the scale of these machines: TransFusion -> pseudo masks -> U-Net on PSEUDO vs GT.

For one category: trains the CPU-sized TransFusion (cached like any run), scores it on the test part, measures
the pseudo-mask quality of every threshold strategy against GT on the train part, then trains U-Net on the
default pseudo masks and on GT with the same recipe and scores both on the same test part.

    .venv/bin/python benchmarks/transfusion_pipeline.py --category bottle --image-size 128 \
        --teacher-epochs 60 --unet-epochs 30 --unet model.params.optimizer.lr=1e-3
    .venv/bin/python benchmarks/transfusion_pipeline.py --category synthetic --teacher-epochs 60
    [--tiny] [--out DIR]   (--tiny: synthetic category, `debug=fast`, one epoch each)
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

from mvtec_seg.builders import build_datamodule
from mvtec_seg.config import compose_config
from mvtec_seg.pseudo.masks import ensure_pseudo_masks
from mvtec_seg.train import train

STRATEGIES = (
    ["mask.threshold.strategy=quantile", "mask.threshold.quantile=0.99"],
    ["mask.threshold.strategy=quantile", "mask.threshold.quantile=0.995"],
    ["mask.threshold.strategy=quantile", "mask.threshold.quantile=0.999"],
    ["mask.threshold.strategy=otsu"],
    ["mask.threshold.strategy=fixed"],
)


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--root", default=str(DEFAULT_MVTEC))
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--teacher-epochs", type=int, default=60)
    ap.add_argument("--unet-epochs", type=int, default=20)
    ap.add_argument("--unet", nargs="*", default=[], help="extra Hydra overrides for the two U-Net runs")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every stage")
    args = ap.parse_args()
    if args.tiny:
        args.category, args.teacher_epochs, args.unet_epochs = "synthetic", 1, 1
        args.overrides = [*args.overrides, "debug=fast"]
    base = [f"category={args.category}", "trainer.enable_progress_bar=false", *args.overrides]
    if not args.category.startswith("synthetic"):
        require_category(args.root, args.category)
        base += [f"data.root={args.root}", f"data.image_size={args.image_size}"]
    base += [f"teacher.trainer.max_epochs={args.teacher_epochs}"]
    out = ROOT / "outputs" / "benchmarks" / f"pipeline_{args.category}{'_tiny' if args.tiny else ''}"
    shutil.rmtree(out, ignore_errors=True)
    result: dict = {
        "command": "benchmarks/transfusion_pipeline.py " + " ".join(base),
        "category": args.category,
    }

    with CpuClock() as clock:
        tf = train(compose_config(base + ["model=transfusion"], run_dir=out / "transfusion"))
    result["transfusion"] = {
        "metrics": tf["metrics"],
        "params": tf["params"],
        "train_s": tf["time"]["train_s"],
        "train_images_per_s": tf["throughput"]["train_images_per_s"],
        "test_images_per_s": tf["throughput"]["test_images_per_s"],
        "wall_s_incl_training": clock.wall_s,
    }
    quality = []
    for strategy in STRATEGIES:
        cfg = compose_config(base + ["mask=pseudo", *strategy], run_dir=out / "unused")
        dm = build_datamodule(cfg)
        dm.prepare()
        with CpuClock() as c:
            _, info = ensure_pseudo_masks(cfg, dm)
        quality.append(
            {
                "settings": info["settings"],
                "threshold": info["threshold"],
                "train": info["quality"]["train"],
                "wall_s": c.wall_s,
            }
        )
    result["pseudo_quality"] = quality
    unet = ["model=unet", f"model.max_epochs={args.unet_epochs}", *args.unet]
    for mask in ("gt", "pseudo"):
        with CpuClock() as c:
            s = train(compose_config(base + unet + [f"mask={mask}"], run_dir=out / f"unet_{mask}"))
        result[f"unet_{mask}"] = {
            "metrics": s["metrics"],
            "train_s": s["time"]["train_s"],
            "wall_s": c.wall_s,
        }
    emit(f"pipeline_{args.category}", result)
    names = ("image_AUROC", "pixel_AUROC", "pixel_AP", "pixel_AUPRO", "IoU")
    models = [("TransFusion", result["transfusion"]), ("U-Net on PSEUDO masks", result["unet_pseudo"])]
    models.append(("U-Net on GT masks", result["unet_gt"]))
    rows = [[label, *(f"{r['metrics'][f'test/{k}']:.3f}" for k in names)] for label, r in models]
    header = ["model", "image AUROC", "pixel AUROC", "pixel AP", "AUPRO", "IoU"]
    qrows = [
        [
            " ".join(f"{k}={v}" for k, v in q["settings"].items())
            if isinstance(q["settings"], dict)
            else q["settings"],
            f"{q['threshold']:.3f}",
            *(f"{q['train'][k]:.3f}" for k in ("IoU", "precision", "recall")),
        ]
        for q in quality
    ]
    write_section(
        args,
        "transfusion_pipeline",
        f"TransFusion -> pseudo masks -> U-Net PSEUDO vs GT ({args.category})",
        f"{md_table(header, rows)}\n\nPseudo-mask quality against GT on the train part:\n\n"
        + md_table(["strategy", "threshold", "IoU", "precision", "recall"], qrows),
    )


if __name__ == "__main__":
    main()
