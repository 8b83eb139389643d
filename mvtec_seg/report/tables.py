"""The report's text: `report.csv` (one wide table, full precision) and `report.md` (readable tables).

CSV columns (``.mean``, ``.std``, ``.n``; empty = missing, ``n = 0`` = run present, metric undefined):
``<model>/<mask>/<metric>.*`` for the five test metrics (``<model>/<mask>[<setting>=<value>, ...]/...``
for a cell set apart by settings that vary between the runs), ``gap/<model>/<metric>`` (pseudo minus gt;
``gap/<model>[<settings>]/<metric>`` likewise),
``pseudo/strategy``, ``pseudo/threshold.*``, ``pseudo/train_<IoU|precision|recall|normal_nonempty>.*``
(``normal_nonempty``: fraction of normal train images with a non-empty mask) and
``<model>/<mask>/<train_images_per_s|test_images_per_s|train_s>.*``.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mvtec_seg.metrics.reference import REFERENCE_FLOOR
from mvtec_seg.report.aggregate import QUALITY_KEYS, Stat, Table
from mvtec_seg.report.collect import COST_KEYS, REPORT_METRICS, Cell, Collected
from mvtec_seg.summary import IOU_AT_THRESHOLD

GAP_MD_METRICS: tuple[str, ...] = ("pixel_AUPRO", "pixel_AP", "IoU")  # the CSV has the gap of all five
COST_LABELS: dict[str, str] = {
    "train_images_per_s": "train img/s",
    "test_images_per_s": "test img/s",
    "train_s": "train time (s)",
}
GAP = "–"  # markdown for a missing value
UNDEFINED = "†"  # markdown mark: the run exists but the metric was undefined (NaN / null)


def variant_label(cell: Cell) -> str:
    """'model.params.optimizer.lr=0.001, seed...' for a cell set apart by settings; '' otherwise."""
    return ", ".join(f"{k}={v}" for k, v in cell[2])


def _cell_name(cell: Cell) -> str:
    label = variant_label(cell)
    return f"{cell[0]}/{cell[1]}" + (f"[{label}]" if label else "")


def _stat_columns(prefix: str) -> list[str]:
    return [f"{prefix}.mean", f"{prefix}.std", f"{prefix}.n"]


def _put(row: dict[str, Any], prefix: str, stat: Stat | None) -> None:
    """Missing -> all three empty; undefined -> n = 0 with empty mean/std."""
    if stat is None:
        row.update(dict.fromkeys(_stat_columns(prefix)))
        return
    row[f"{prefix}.mean"] = stat.mean if stat.defined else None
    row[f"{prefix}.std"] = stat.std if stat.n >= 2 else None
    row[f"{prefix}.n"] = stat.n


def csv_columns(t: Table) -> list[str]:
    cols = ["category"]
    for cell in t.cells:
        for m in REPORT_METRICS:
            cols += _stat_columns(f"{_cell_name(cell)}/{m}")
    for model in t.gap_models:
        cols += [f"gap/{model}/{m}" for m in REPORT_METRICS]
    if t.quality:
        cols.append("pseudo/strategy")
        cols += _stat_columns("pseudo/threshold")
        for key in QUALITY_KEYS:
            cols += _stat_columns(f"pseudo/train_{key}")
    for cell in t.cells:
        for k in COST_KEYS:
            cols += _stat_columns(f"{_cell_name(cell)}/{k}")
    return cols


def csv_rows(t: Table) -> list[dict[str, Any]]:
    """One row per category plus the ``mean`` row; None is a gap."""
    rows: list[dict[str, Any]] = []
    for cat in [*t.categories, None]:
        row: dict[str, Any] = {"category": cat if cat is not None else "mean"}
        for cell in t.cells:
            for m in REPORT_METRICS:
                stat = t.get(cat, cell, m) if cat is not None else t.mean_metric(cell, m)
                _put(row, f"{_cell_name(cell)}/{m}", stat)
        for model in t.gap_models:
            for m in REPORT_METRICS:
                if cat is not None:
                    row[f"gap/{model}/{m}"] = t.gap(cat, model, m)
                else:
                    g = t.mean_gap(model, m)
                    row[f"gap/{model}/{m}"] = g.mean if g is not None else None
        if t.quality:
            row["pseudo/strategy"] = t.strategy.get(cat) if cat is not None else None
            for key in ("threshold", *QUALITY_KEYS):
                name = "pseudo/threshold" if key == "threshold" else f"pseudo/train_{key}"
                _put(row, name, t.quality.get((cat, key)) if cat is not None else t.mean_quality(key))
        for cell in t.cells:
            for k in COST_KEYS:
                stat = t.cost.get((cat, cell, k)) if cat is not None else t.mean_cost(cell, k)
                _put(row, f"{_cell_name(cell)}/{k}", stat)
        rows.append(row)
    return rows


def csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        out = []
        for col in columns:
            v = row.get(col)
            if v is None or (isinstance(v, float) and not math.isfinite(v)):
                out.append("")
            elif isinstance(v, float):
                out.append(repr(v))  # shortest exact round trip
            else:
                out.append(str(v))
        writer.writerow(out)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- markdown
def _fmt(stat: Stat | None, signed: bool = False, digits: int = 3, mean_row: bool = False) -> str:
    """'0.812 ± 0.010 (n=2)'; a gap is '–', an undefined metric '–†', a partly undefined one gets '†'."""
    if stat is None:
        return GAP
    if not stat.defined:
        return GAP + UNDEFINED
    text = f"{stat.mean:+.{digits}f}" if signed else f"{stat.mean:.{digits}f}"
    if stat.n >= 2 and not mean_row:
        text += f" ± {stat.std:.{digits}f} (n={stat.n})"
    elif mean_row:
        text += f" (n={stat.n})"
    if stat.n_values > stat.n and not mean_row:
        text += UNDEFINED
    return text


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], n_text: int = 1) -> list[str]:
    """GitHub table; the first ``n_text`` columns are text (left), the rest numbers (right)."""

    def esc(s: str) -> str:
        return str(s).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |"]
    lines.append("|" + "|".join([":---"] * n_text + ["---:"] * (len(header) - n_text)) + "|")
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return lines


def cell_label(cell: Cell) -> str:
    model, mask = cell[:2]
    text = f"{model} (reference)" if mask == "none" else f"{model} / {mask}"
    label = variant_label(cell)
    return f"{text} [{label}]" if label else text


def _metric_table(t: Table, m: str) -> list[str]:
    header = ["category", *[cell_label(c) for c in t.cells]]
    rows = [[cat, *[_fmt(t.get(cat, c, m)) for c in t.cells]] for cat in t.categories]
    rows.append(["**mean**", *[_fmt(t.mean_metric(c, m), mean_row=True) for c in t.cells]])
    return _md_table(header, rows)


NOT_A_REFERENCE = "†"
"""Marks a gap whose GT cell is no reference in its category (`metrics.reference`): left out of the mean."""


def _decision_table(t: Table) -> list[str]:
    """The decision threshold each cell's runs used for IoU@thr (mean ± std over seeds), and its rule."""
    if not any(s.defined for s in t.decision.values()):
        return []
    header = ["category", *[cell_label(c) for c in t.cells]]
    rows = [[cat, *[_fmt(t.decision.get((cat, c)), digits=4) for c in t.cells]] for cat in t.categories]
    rules = [f"- {cell_label(c)}: {t.decision_rule[c]}" for c in t.cells if t.decision_rule.get(c)]
    return [
        "Decision threshold of each run (IoU@thr counts `map >= threshold`; chosen on the val part, never the "
        "test part):",
        "",
        *_md_table(header, rows),
        "",
        *rules,
        "",
    ]


def _gap_table(t: Table) -> list[str]:
    header = ["category"]
    for model in t.gap_models:
        header += [f"{model} Δ{REPORT_METRICS[m]}" for m in GAP_MD_METRICS]
    rows = []
    for cat in t.categories:
        row = [cat]
        for pair, model in zip(t.gap_pairs, t.gap_models, strict=True):
            mark = NOT_A_REFERENCE if t.unlearned_reference(cat, pair) else ""
            for m in GAP_MD_METRICS:
                g = t.gap(cat, model, m)
                row.append(GAP if g is None else f"{g:+.3f}{mark}")
        rows.append(row)
    mean_row = ["**mean**"]
    for model in t.gap_models:
        mean_row += [_fmt(t.mean_gap(model, m), signed=True, mean_row=True) for m in GAP_MD_METRICS]
    rows.append(mean_row)
    return _md_table(header, rows)


def _unlearned_note(t: Table) -> list[str]:
    """One line per (category, model) whose GT cell is no reference, saying why."""
    found = [
        f"{cat} / {model}: {why}"
        for cat in t.categories
        for pair, model in zip(t.gap_pairs, t.gap_models, strict=True)
        if (why := t.unlearned_reference(cat, pair))
    ]
    if not found:
        return []
    floors = " and ".join(f"{m} >= {v}" for m, v in REFERENCE_FLOOR.items())
    return [
        f"{NOT_A_REFERENCE} GT is not learned there (its cell misses {floors}), so the difference says nothing "
        "about the pseudo masks; left out of the mean: " + "; ".join(found) + ".",
        "",
    ]


def _quality_table(t: Table) -> list[str]:
    header = ["category", "strategy", "threshold", "IoU", "precision", "recall", "normal non-empty"]
    rows = []
    for cat in t.categories:
        if (cat, "IoU") not in t.quality:
            rows.append([cat] + [GAP] * (len(header) - 1))
            continue
        rows.append(
            [cat, t.strategy.get(cat, GAP), _fmt(t.quality.get((cat, "threshold")), digits=4)]
            + [_fmt(t.quality.get((cat, k))) for k in QUALITY_KEYS]
        )
    rows.append(
        ["**mean**", "", _fmt(t.mean_quality("threshold"), digits=4, mean_row=True)]
        + [_fmt(t.mean_quality(k), mean_row=True) for k in QUALITY_KEYS]
    )
    return _md_table(header, rows, n_text=2)


def _params_text(n: int | None) -> str:
    if n is None:
        return GAP
    return f"{n / 1e6:.2f} M" if n >= 10_000 else str(n)


def _cost_table(t: Table) -> list[str]:
    header = ["model / mask", *[COST_LABELS[k] for k in COST_KEYS], "parameters"]
    rows = [
        [
            cell_label(c),
            *[_fmt(t.mean_cost(c, k), mean_row=True) for k in COST_KEYS],
            _params_text(t.params.get(c)),
        ]
        for c in t.cells
    ]
    return _md_table(header, rows)


def _uses_undefined(t: Table) -> bool:
    return any(s.n_values > s.n for s in t.metric.values())


def _failed_runs(coll: Collected, link) -> list[str]:
    """**FAILED** rows for the runs that failed or were interrupted (left out of every table below)."""
    if not coll.failed:
        return []
    lines = [
        f"## Failed runs ({len(coll.failed)}, left out of the tables)",
        "",
        "| status | category | model | mask | seed | reason | run folder |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in coll.failed:
        s = run.summary
        reason = (s.error or "no reason recorded").replace("|", "\\|")
        lines.append(
            f"| **{s.status.upper()}** | {s.category} | {s.model} | {s.mask} | {s.seed} | {reason} | "
            f"`{link(run.run_dir)}` |"
        )
    return [*lines, ""]


def markdown(
    folder: Path,
    out: Path,
    t: Table,
    coll: Collected,
    plots: dict[str, Path],
    grids: dict[str, tuple[Path | None, list[str]]],
) -> str:
    def link(p: Path) -> str:
        return p.relative_to(out).as_posix() if p.is_relative_to(out) else p.as_posix()

    lines = ["# MVTec AD segmentation report", ""]
    skipped = ", ".join(f"{v} {k}" for k, v in sorted(coll.skipped_status.items()))
    lines.append(
        f"Runs: {len(coll.runs)} finished (status `ok`) from {coll.n_files} `summary.json` under `{folder}`"
        + (f"; left out: {skipped}" if skipped else "")
        + (f"; {len(coll.unreadable)} unreadable" if coll.unreadable else "")
        + "."
    )
    lines.append(f"Categories: {len(t.categories)}. Cells: {', '.join(cell_label(c) for c in t.cells)}.")
    at = Counter(r.summary.resolution for r in coll.runs)
    where = {"model": "at the model's input size (`data.image_size`)", "native": "at each image's own size"}
    if at:
        lines.append(
            "Test metrics computed "
            + "; ".join(f"{where.get(k, k)}: {n} run{'s' if n != 1 else ''}" for k, n in sorted(at.items()))
            + " (`evaluation.resolution`)."
        )
    varying = sorted({k for c in t.cells for k, _ in c[2]})
    if varying:
        lines.append(
            "Cells are kept apart by every setting that differs between their runs ("
            + ", ".join(f"`{k}`" for k in varying)
            + "; `data`: the digest of the files read); only runs that differ in nothing but the seed are "
            "averaged."
        )
    lines += [
        "",
        "Values: mean ± sample std (n = runs, e.g. seeds) when a cell has several runs; "
        f"`{GAP}` = no run. The **mean** row averages over the categories that have the cell "
        "(n = number of categories). 3 decimals; full precision in `report.csv`.",
        "",
    ]
    if coll.unreadable:
        lines += ["Unreadable summaries (left out):", *[f"- `{u}`" for u in coll.unreadable[:10]], ""]
    lines += _failed_runs(coll, link)

    lines += ["## Test metrics", ""]
    for m in REPORT_METRICS:
        lines += [f"### {REPORT_METRICS[m]}", "", *_metric_table(t, m), ""]
        if m in plots:
            lines += [f"![{REPORT_METRICS[m]} per category]({link(plots[m])})", ""]
        if m == IOU_AT_THRESHOLD:
            lines += _decision_table(t)
    if _uses_undefined(t):
        lines += [
            f"{UNDEFINED} The run exists but the metric was undefined (NaN, `null` in summary.json; e.g. no "
            "defect pixel or only one image class in the test part): left out of the mean, never counted as 0.",
            "",
        ]

    lines += ["## GT vs pseudo masks (pseudo − gt)", ""]
    if t.gap_models:
        lines += [
            "Difference of the per-category means; negative = the pseudo-mask model is worse. "
            "All five metrics are in `report.csv` (`gap/<model>/<metric>`).",
            "",
            *_gap_table(t),
            "",
            *_unlearned_note(t),
        ]
    else:
        lines += ["No segmenter has both a `gt` and a `pseudo` run.", ""]

    lines += ["## Pseudo-mask quality (train part, against GT)", ""]
    if t.quality:
        lines += [*_quality_table(t), ""]
    else:
        lines += ["No pseudo-mask run.", ""]

    lines += [
        "## Cost",
        "",
        "Mean over categories (n = categories) of the per-category means (per category: `report.csv`). "
        "TransFusion's training cost is that of the shared teacher (empty when it was loaded from the cache).",
        "",
        *_cost_table(t),
        "",
    ]

    lines += [
        "## Test images across models",
        "",
        "Columns: image, GT, then each model's anomaly map over the image (GT outline in green). Each column "
        "uses one colour scale for all its rows: the run's global [min, max] over its saved test maps "
        "(shown in the column title), never per-image normalisation. Images present in every run of the "
        "category, anomalous first.",
        "",
    ]
    for cat in t.categories:
        path, notes = grids.get(cat, (None, ["not drawn"]))
        lines += [f"### {cat}", ""]
        if path is not None:
            lines += [f"![{cat}: test images across models]({link(path)})", ""]
        lines += [f"- {n}" for n in notes]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
