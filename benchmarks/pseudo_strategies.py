"""Every pseudo-mask strategy through the whole chain: teacher maps -> masks -> U-Net -> test metrics on GT.

Per category one teacher (trained once, cached, shared by every strategy), then one U-Net per strategy on
its pseudo masks, plus the two reference rows: U-Net on GT and TransFusion itself. One table: mask quality
on the train part (IoU, precision, recall, fraction of normal images with a non-empty mask) and the U-Net's
test image AUROC, pixel AP, AUPRO, IoU. The strategy with the best AUPRO averaged over the categories that
ran is marked as the candidate default.

    .venv/bin/python benchmarks/pseudo_strategies.py --out /tmp/bench             # bottle, synthetic, texture
    .venv/bin/python benchmarks/pseudo_strategies.py --categories bottle --unet-epochs 15
    .venv/bin/python benchmarks/pseudo_strategies.py --tiny --out /tmp/tiny       # seconds: a smoke test

Writes `<out>/pseudo_strategies.md` (heading, exact command, table) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from common import DEFAULT_MVTEC, ROOT, CpuClock, emit

from mvtec_seg.config import compose_config
from mvtec_seg.io_utils import content_key
from mvtec_seg.summary import SUMMARY_FILE, RunSummary
from mvtec_seg.train import train

# name -> mask overrides (all without GT). Gate/area values chosen once, see benchmarks/RESULTS.md.
GATE = "mask.gate.quantile=0.99"
HYST = [
    "mask.threshold.strategy=hysteresis",
    "mask.threshold.low_quantile=0.98",
    "mask.threshold.quantile=0.995",
]
AREA = "mask.regions.min_area=16"
STRATEGIES: dict[str, list[str]] = {
    "fixed 0.5": ["mask.threshold.strategy=fixed"],
    "quantile 0.995": ["mask.threshold.strategy=quantile", "mask.threshold.quantile=0.995"],
    "quantile 0.995 + gate": ["mask.threshold.strategy=quantile", "mask.threshold.quantile=0.995", GATE],
    "hysteresis + gate + area": [*HYST, GATE, AREA],
    "hysteresis + gate + area + ignore": [*HYST, GATE, AREA, "mask.target=ignore"],
    "soft + gate": [*HYST, GATE, "mask.target=soft"],
    "hysteresis + gate + area + 1 round": [*HYST, GATE, AREA, "mask.rounds=1"],
    "hysteresis + gate + area + 2 rounds": [*HYST, GATE, AREA, "mask.rounds=2"],
}
CATEGORIES = ("bottle", "synthetic", "synthetic_texture")
METRICS = (("image_AUROC", "image AUROC"), ("pixel_AP", "pixel AP"), ("pixel_AUPRO", "AUPRO"), ("IoU", "IoU"))
QUALITY = (
    ("IoU", "mask IoU"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("normal_nonempty", "normal≠∅"),
)
TINY = [
    "debug=fast",
    "teacher.trainer.max_epochs=1",
    "teacher.trainer.limit_train_batches=2",
    "data.image_size=32",
]


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def plan(args: argparse.Namespace, cat: str, out_root: Path) -> list[tuple[str, str, list[str]]]:
    """(row name, folder stem, overrides) of every run for `cat`: the two references, then the strategies."""
    tiny = TINY if args.tiny else []
    data = [f"category={cat}", "trainer.enable_progress_bar=false", f"paths.output_dir={out_root}"]
    if cat.startswith("synthetic"):
        teacher = [f"teacher.trainer.max_epochs={args.synthetic_teacher_epochs}"]
    else:
        data.append(f"data.root={args.root}")
        teacher = [f"teacher.trainer.max_epochs={args.teacher_epochs}"]
    data += [f"data.image_size={args.image_size}", *tiny]
    unet = [
        "experiment=unet_fast_cpu",
        f"data.image_size={args.image_size}",
        f"data.train_crop={args.unet_crop or 'null'}",
        f"model.max_epochs={args.unet_epochs}",
        *tiny,  # again: after the experiment's own settings
    ]
    runs = []
    if not args.skip_references:
        runs += [("TransFusion (teacher)", "transfusion", [*data, *teacher, "model=transfusion"])]
        runs += [("U-Net (GT)", "unet_gt", [*data, *unet, "mask=gt"])]  # no teacher: its settings are no key
    for name in args.strategies:
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        runs.append((name, f"unet_pseudo_{slug}", [*data, *teacher, *unet, "mask=pseudo", *STRATEGIES[name]]))
    return runs


def run_dir(runs: Path, stem: str, overrides: list[str]) -> Path:
    """One run's folder, keyed by its overrides (less where outputs go): --reuse never returns a run made with
    other settings (teacher or U-Net epochs, image size, data root)."""
    settings = [
        o for o in overrides if not o.startswith(("paths.output_dir=", "trainer.enable_progress_bar="))
    ]
    return runs / f"{stem}-{content_key(settings)}"


def _run(overrides: list[str], folder: Path, reuse: bool) -> dict:
    """A finished run's summary (reused from `folder` with --reuse when it finished ok)."""
    done = folder / SUMMARY_FILE
    if reuse and done.exists():
        summary = RunSummary.from_dict(__import__("json").loads(done.read_text()))
        if summary.status == "ok":
            return {**summary.to_dict(), "wall_s": None}
    shutil.rmtree(folder, ignore_errors=True)
    with CpuClock() as clock:
        summary = train(compose_config(overrides, run_dir=folder))
    return {**summary, "wall_s": clock.wall_s}


def _row(category: str, name: str, summary: dict) -> dict:
    s = RunSummary.from_dict(summary)
    quality = ((s.pseudo or {}).get("quality") or {}).get("train") or {}
    return {
        "category": category,
        "strategy": name,
        "label": (s.pseudo or {}).get("label"),
        "quality": {k: quality.get(k) for k, _ in QUALITY},
        "rounds": [
            {"round": r["round"], **(r["quality"]["train"])} for r in (s.pseudo or {}).get("rounds", [])
        ],
        "metrics": {k: s.test_metric(k) for k, _ in METRICS},
        "wall_s": summary.get("wall_s"),
    }


def markdown(rows: list[dict], command: str, notes: list[str]) -> tuple[str, str | None]:
    """The section text and the strategy with the best mean AUPRO over the categories it ran on."""
    cats = list(dict.fromkeys(r["category"] for r in rows))
    means: dict[str, float] = {}
    for name in STRATEGIES:
        vals = [r["metrics"]["pixel_AUPRO"] for r in rows if r["strategy"] == name]
        vals = [v for v in vals if math.isfinite(v)]
        if len(vals) == len(cats) and vals:
            means[name] = sum(vals) / len(vals)
    best = max(means, key=means.get) if means else None
    head = ["category", "model / strategy", *(q for _, q in QUALITY), *(m for _, m in METRICS)]
    lines = [
        "## Pseudo-mask strategies: teacher maps → masks → U-Net (issue #10)",
        "",
        "```",
        command,
        "```",
        "",
        *notes,
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|" + "---:|" * (len(head) - 2),
    ]
    for r in rows:
        name = f"**{r['strategy']}** (best mean AUPRO)" if r["strategy"] == best else r["strategy"]
        q = [_fmt(r["quality"].get(k)) for k, _ in QUALITY]
        m = [_fmt(r["metrics"].get(k)) for k, _ in METRICS]
        lines.append("| " + " | ".join([r["category"], name, *q, *m]) + " |")
    lines += ["", f"Mean downstream AUPRO over {', '.join(cats)}:", ""]
    lines += [f"- {name}: {_fmt(v)}" for name, v in sorted(means.items(), key=lambda kv: -kv[1])]
    rounds = [r for r in rows if len(r["rounds"]) > 1]
    if rounds:
        lines += ["", "Self-training: mask quality (train part) per round:", ""]
        for r in rounds:
            per = "; ".join(
                f"round {x['round']}: IoU {_fmt(x.get('IoU'))}, normal≠∅ {_fmt(x.get('normal_nonempty'))}"
                for x in r["rounds"]
            )
            lines.append(f"- {r['category']}: {per}")
    return "\n".join(lines) + "\n", best


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a few batches of everything on synthetic (seconds)")
    ap.add_argument("--out", type=Path, default=None, help="write <out>/pseudo_strategies.md")
    ap.add_argument("--categories", nargs="*", default=list(CATEGORIES))
    ap.add_argument("--strategies", nargs="*", default=list(STRATEGIES), help="names from STRATEGIES")
    ap.add_argument("--root", default=str(DEFAULT_MVTEC), help="folder holding MVTec categories")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--teacher-epochs", type=int, default=25, help="TransFusion epochs, real categories")
    ap.add_argument("--synthetic-teacher-epochs", type=int, default=30)
    ap.add_argument("--unet-epochs", type=int, default=15)
    ap.add_argument("--unet-crop", type=int, default=None, help="train U-Nets on random crops of this size")
    ap.add_argument("--skip-references", action="store_true", help="no TransFusion / U-Net(GT) rows")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs under outputs/benchmarks/")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        ap.error(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    command = "benchmarks/pseudo_strategies.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    tmp = Path(tempfile.mkdtemp(prefix="pseudo_strategies_")) if args.tiny else None
    out_root = tmp or ROOT / "outputs"
    categories = ["synthetic"] if args.tiny else args.categories
    rows: list[dict] = []
    notes = []
    try:
        for cat in categories:
            if not cat.startswith("synthetic") and not (Path(args.root) / cat).is_dir():
                notes.append(f"- {cat}: skipped ({Path(args.root) / cat} not found)")
                continue
            runs = out_root / "benchmarks" / "pseudo_strategies" / cat
            for name, stem, over in plan(args, cat, out_root):
                rows.append(_row(cat, name, _run(over, run_dir(runs, stem, over), args.reuse)))
        notes.insert(
            0,
            f"U-Net: `experiment=unet_fast_cpu` at {args.image_size} px, trained on "
            f"{f'random {args.unet_crop} px crops' if args.unet_crop else 'whole images'}, {args.unet_epochs} epochs; "
            f"teacher: the default CPU TransFusion ({args.teacher_epochs} epochs on real categories, "
            f"{args.synthetic_teacher_epochs} on synthetic), one per category shared by all rows. Mask quality "
            "on the train part against GT; metrics on the test part against GT.",
        )
        text, best = markdown(rows, command, notes)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        if args.tiny:  # the heading, then the flag the runner and the test look for
            head, rest = text.split("\n\n", 1)
            text = f"{head}\n\n**Tiny mode: a smoke run, not a measurement.**\n\n{rest}"
        (args.out / "pseudo_strategies.md").write_text(text)
    emit("pseudo_strategies", {"command": command, "best": best, "rows": rows})


if __name__ == "__main__":
    main()
