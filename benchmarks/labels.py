"""The labels suite: how many GT masks PSEUDO is worth. Categories x seeds x k x {MIXED, GT only}, each case one
`train()` run with `mask.gt_images=k` (`data.sources` chooses the labelled images); the section puts AUPRO and
pixel AP against k and names the smallest k at which each reaches 90 % and 95 % of full GT's AUPRO.

A case is found again by the digest of its resolved config, as in the quality suite (`quality.digest`), so a
rerun trains only what changed; every MIXED case of one category and seed shares one cached teacher.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from benchmarks.quality import (
    REFERENCE_FLOOR,
    digest,
    finished_or_trained,
    summary_row,
    unlearned_reference,
)
from benchmarks.runner import category_seeds, context, measured_rows, number, selected
from mvtec_seg.config import compose_config
from mvtec_seg.io_utils import content_key

log = logging.getLogger(__name__)
KEY = ("category", "source", "k", "seed", "image_size")
ALL = "all"
SHARES = (0.9, 0.95)
"""The shares of full GT's AUPRO the headline asks for."""


# --------------------------------------------------------------------------------------------- the grid
def budgets(cfg: DictConfig) -> list[str]:
    """The k of the grid as text (`0`, `5`, `all`); `tiny=true` runs `tiny_k`."""
    return [str(k) for k in (cfg.tiny_k if cfg.get("tiny") else cfg.k)]


def resolved(cfg: DictConfig, category: str, source: str, k: str, seed: int, cache: Path) -> DictConfig:
    """The composed run config of one case, `paths.run_dir` still unset."""
    spec = cfg.sources[source]
    overrides = [
        *cfg.base,
        *cfg.categories[category],
        f"model={cfg.model}",
        f"mask={spec.mask}",
        f"mask.gt_images={'null' if k == ALL else k}",
        *spec.get("overrides", []),
        f"seed={seed}",
        *(list(cfg.tiny_overrides) if cfg.get("tiny") else []),
        "trainer.enable_progress_bar=false",
        f"paths.cache_dir={cache}",
    ]
    return compose_config(overrides, run_dir="unset")


def defective_train_images(run_cfg: DictConfig) -> int:
    """How many defective images the train part of the case's split holds (the largest k it can take)."""
    from mvtec_seg.builders import category_dir, layout
    from mvtec_seg.data.sources import defective_train_rows
    from mvtec_seg.data.split import load_or_create_manifest

    _, manifest = load_or_create_manifest(
        category_dir(run_cfg),
        Path(run_cfg.paths.cache_dir),
        run_cfg.category.name,
        int(run_cfg.seed),
        tuple(run_cfg.data.split_ratios),
        run_cfg.data.get("protocol", "split"),
        layout(run_cfg),
    )
    return int(defective_train_rows(manifest["samples"]).sum())


def run_case(
    cfg: DictConfig, category: str, source: str, k: str, seed: int, runs: Path, cache: Path, n_defective: int
) -> dict[str, Any]:
    """One case's CSV row: reused when its run folder holds a finished run of the same digest, else trained
    (`n_defective`: the split's defective train images, what k = all labels)."""
    run_cfg = resolved(cfg, category, source, k, seed, cache)
    key = digest(run_cfg)
    run_dir = runs / key
    out: dict[str, Any] = {
        "suite": "labels",
        "category": category,
        "source": source,
        "label": cfg.sources[source].get("label", source),
        "mask": str(run_cfg.mask.name),
        "k": k,
        "seed": seed,
        "image_size": int(run_cfg.data.image_size),
        "model": run_cfg.model.name,
        "deciding": category in (cfg.get("deciding") or []),
        "tiny": bool(cfg.get("tiny")),
        "config_digest": key,
        "run_dir": str(run_dir),
    }
    summary, error = finished_or_trained(
        run_cfg, run_dir, f"labels: {category} / {source} k={k} / seed {seed}"
    )
    if summary is None:
        return out | {"status": "failed", "error": error}
    labelled = summary.get("labelled_images")  # None: full GT, no budget (every defective image's mask)
    counts = {
        "n_labelled": n_defective if labelled is None else len(labelled),
        "labelled_digest": "" if labelled is None else content_key(labelled),
    }
    return out | {"status": summary.get("status", "ok"), "error": ""} | counts | summary_row(summary)


def run(cfg: DictConfig, runs: Path, cache: Path, emit: Callable[[dict], None]) -> None:
    """Every selected case, in the order category, seed, k, source (a category's teacher is trained once)."""
    for category, seed, command in category_seeds(cfg):
        first = resolved(cfg, category, next(iter(cfg.sources)), ALL, seed, cache)
        n = defective_train_images(first)
        for k in selected(cfg, "k", budgets(cfg)):
            if k != ALL and int(k) > n:
                log.warning(
                    "labels: %s seed %s: k=%s skipped (%d defective train images)", category, seed, k, n
                )
                continue
            for source in selected(cfg, "sources", cfg.sources):
                if k != ALL and int(k) < int(cfg.sources[source].get("min_k", 0)):
                    continue
                row = run_case(cfg, category, source, k, seed, runs, cache, n)
                emit(row | {"command": command} | context())


# ------------------------------------------------------------------------------------------- the section
def _order(k: str) -> float:
    return math.inf if k == ALL else float(k)


def _stats(values: list[float]) -> tuple[float, float]:
    """(mean, standard deviation) of the finite values; the deviation is NaN below two."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else math.nan)


def _cell(values: list[float]) -> str:
    mean, sd = _stats(values)
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.3f}" + (f" ± {sd:.3f}" if math.isfinite(sd) else "")


def _k_label(k: str, cases: list[dict]) -> str:
    if k == ALL:
        counts = sorted({c.get("n_labelled", "") for c in cases} - {""}, key=float)
        return f"all ({'/'.join(counts)})" if counts else "all"
    return f"{k} (PSEUDO)" if k == "0" and any(c["mask"] == "mixed" for c in cases) else k


def curve(ok: list[dict], category: str, source: str, metric: str = "pixel_AUPRO") -> dict[str, list[float]]:
    """k -> the metric of every seed, for one category and source."""
    out: dict[str, list[float]] = {}
    for r in ok:
        if r["category"] == category and r["source"] == source:
            out.setdefault(r["k"], []).append(number(r[metric]))
    return dict(sorted(out.items(), key=lambda item: _order(item[0])))


def full_gt(ok: list[dict], category: str) -> list[dict]:
    """The reference: GT-only rows labelling every defective train image (full GT)."""
    return [r for r in ok if r["category"] == category and r["mask"] == "gt" and r["k"] == ALL]


def first_reaching(points: dict[str, list[float]], level: float) -> str | None:
    """The smallest k whose mean over seeds reaches `level`; None when no k does."""
    for k, values in points.items():
        mean = _stats(values)[0]
        if math.isfinite(mean) and mean >= level:
            return k
    return None


def _headline(ok: list[dict], category: str, sources: list[str], label: dict, unlearned: dict) -> list[str]:
    gt_rows = full_gt(ok, category)
    if not gt_rows:
        return ["No full-GT case (k = all with GT only): no share of GT to report.", ""]
    if category in unlearned:
        return [
            f"Full GT is not learned here (U-Net GT {unlearned[category]}): no share of GT is reported.",
            "",
        ]
    reference = _stats([number(r["pixel_AUPRO"]) for r in gt_rows])[0]
    lines = [
        f"Full GT's AUPRO: {reference:.3f}. The smallest k reaching a share of it (mean over seeds):",
        "",
    ]
    for share in SHARES:
        found = []
        for source in sources:
            k = first_reaching(curve(ok, category, source), share * reference)
            found.append(f"{label[source]} {'not reached within the grid' if k is None else f'k = {k}'}")
        lines.append(f"- {share:.0%} of full GT: " + "; ".join(found))
    if {"mixed", "gt"} <= set(sources):
        lines.append(_half_the_labels(ok, category, SHARES[0] * reference, label))
    return [*lines, ""]


def _labelled(ok: list[dict], category: str, k: str) -> float:
    """How many labelled images a k stands for (k = all: the mean count of the split's defective images)."""
    if k != ALL:
        return float(k)
    return statistics.fmean(number(r["n_labelled"]) for r in full_gt(ok, category))


def _half_the_labels(ok: list[dict], category: str, level: float, label: dict) -> str:
    """The verdict on the suite's target: does MIXED reach `level` with at most half the labelled images GT
    only needs for it?"""
    mixed = first_reaching(curve(ok, category, "mixed"), level)
    gt = first_reaching(curve(ok, category, "gt"), level)
    if mixed is None:
        verdict = f"no: {label['mixed']} does not reach it within the grid"
    elif gt is None:
        verdict = f"yes: {label['gt']} does not reach it within the grid"
    else:
        n_mixed, n_gt = _labelled(ok, category, mixed), _labelled(ok, category, gt)
        verdict = f"{'yes' if n_mixed <= n_gt / 2 else 'no'}: {n_mixed:g} labelled images against {n_gt:g}"
    return f"- {label['mixed']} at {SHARES[0]:.0%} of full GT with at most half the labels {label['gt']} needs: {verdict}"


def section(rows: list[dict[str, str]]) -> str:
    """RESULTS.md's section for the labels suite, from its CSV rows (smoke runs left out)."""
    ok = [r for r in measured_rows(rows) if r.get("status") == "ok"]
    if not ok:
        return "No labels results yet: `python -m benchmarks labels`."
    cats = list(dict.fromkeys(r["category"] for r in ok))
    sources = list(dict.fromkeys(r["source"] for r in ok))
    label = {r["source"]: r["label"] for r in ok}
    unlearned = unlearned_reference([r for c in cats for r in full_gt(ok, c)], cats)
    head = " | ".join(f"{label[s]} {m}" for m in ("AUPRO", "pixel AP") for s in sources)
    lines: list[str] = []
    for cat in cats:
        deciding = any(r["deciding"] == "True" for r in ok if r["category"] == cat)
        lines += [f"### {cat}" + ("" if deciding else " (reported, not deciding)"), ""]
        lines += [f"| k | seeds | {head} |", "|" + "---|" * (2 + 2 * len(sources))]
        ks = sorted({r["k"] for r in ok if r["category"] == cat}, key=_order)
        for k in ks:
            cases = [r for r in ok if r["category"] == cat and r["k"] == k]
            cells = [
                _cell(curve(ok, cat, s, m).get(k, [])) for m in ("pixel_AUPRO", "pixel_AP") for s in sources
            ]
            seeds = len({c["seed"] for c in cases})
            lines.append(f"| {_k_label(k, cases)} | {seeds} | " + " | ".join(cells) + " |")
        lines += ["", *_headline(ok, cat, sources, label, unlearned)]
    floors = " and ".join(f"{m} >= {v}" for m, v in REFERENCE_FLOOR.items())
    lines += [f"Full GT counts as learned where it reaches {floors} (the quality suite's floors)."]
    commands = sorted({r["command"] for r in ok})
    lines += ["", "Commands: " + "; ".join(f"`{c}`" for c in commands)]
    return "\n".join(lines)


def figure(rows: list[dict[str, str]], path: Path) -> Path | None:
    """AUPRO against k (k = all at its count), MIXED beside GT only, one panel per category, with full GT's
    AUPRO and (where full GT is learned) 90 % of it as lines; None when there is nothing to draw."""
    from mvtec_seg.viz import figure as new_figure
    from mvtec_seg.viz import save_figure

    ok = [r for r in measured_rows(rows) if r.get("status") == "ok"]
    cats = list(dict.fromkeys(r["category"] for r in ok))
    if not cats:
        return None
    unlearned = unlearned_reference([r for c in cats for r in full_gt(ok, c)], cats)
    sources = list(dict.fromkeys(r["source"] for r in ok))
    colour = {source: f"C{i}" for i, source in enumerate(sources)}  # one colour per source in every panel
    fig = new_figure((4.0 * len(cats), 3.2))
    axes = fig.subplots(1, len(cats), squeeze=False)[0]
    for ax, cat in zip(axes, cats, strict=True):
        for source in dict.fromkeys(r["source"] for r in ok if r["category"] == cat):
            points = curve(ok, cat, source)
            xs = [_x(ok, cat, k) for k in points]
            stats = [_stats(v) for v in points.values()]
            ax.errorbar(
                xs,
                [m for m, _ in stats],
                yerr=[0.0 if not math.isfinite(s) else s for _, s in stats],
                marker="o",
                capsize=3,
                color=colour[source],
                label=next(r["label"] for r in ok if r["source"] == source),
            )
        reference = _stats([number(r["pixel_AUPRO"]) for r in full_gt(ok, cat)])[0]
        if math.isfinite(reference):
            ax.axhline(reference, color="grey", linewidth=0.8, label="full GT")
        if math.isfinite(reference) and cat not in unlearned:  # a share of a failed reference says nothing
            ax.axhline(0.9 * reference, color="grey", linestyle="--", linewidth=0.8, label="90 % of full GT")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=-0.3)
        ax.set_title(cat + (" (full GT not learned)" if cat in unlearned else ""))
        ax.set_xlabel("k (labelled defective train images)")
        ax.set_ylabel("test AUPRO")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def _x(ok: list[dict], category: str, k: str) -> float:
    """Where k sits on the plot's axis: itself, or for `all` the mean count of labelled images."""
    if k != ALL:
        return float(k)
    counts = [number(r.get("n_labelled")) for r in ok if r["category"] == category and r["k"] == ALL]
    return _stats(counts)[0]
