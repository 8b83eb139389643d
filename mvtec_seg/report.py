"""Gather the ``summary.json`` of every finished run below a folder into one comparison report.

``python -m mvtec_seg.report <folder> [--out DIR]`` writes ``report.md`` (readable tables and embedded
plots), ``report.csv`` (one wide table, full precision) and ``report_plots/*.png``.

Why it looks the way it does:

- A cell is one (model, mask) pair; TransFusion (``mask=none``) is the reference, then the segmenters on
  GT and on pseudo masks, so the table reads as "teacher, then what GT / pseudo supervision buys".
- A missing run is a gap, never a zero: a zero would silently drag the mean row down. A metric that was
  undefined (NaN, written as ``null``) is also a gap, marked with a footnote, because "no value" and
  "no run" are different problems to fix.
- Several runs of one cell (seeds) are averaged and their spread (sample std, ``ddof=1``) is shown, so
  a difference smaller than the seed noise is visible as such.
- The ``mean`` row averages the per-category values over the categories that have the cell and says how
  many (there ``std`` is the spread across categories and ``n`` the number of categories).
- Heatmaps share one colour scale per column (the run's global min/max over all its saved test maps),
  never per-image normalisation, which would make a normal image's noise look like a defect.

CSV columns (``.mean``, ``.std``, ``.n``; empty = missing, ``n = 0`` = run present, metric undefined):
``<model>/<mask>/<metric>.*`` for the five test metrics, ``gap/<model>/<metric>`` (pseudo minus gt),
``pseudo/strategy``, ``pseudo/threshold.*``, ``pseudo/train_<IoU|precision|recall>.*`` and
``<model>/<mask>/<train_images_per_s|test_images_per_s|train_s>.*``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mvtec_seg.errors import UserError
from mvtec_seg.io_utils import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "CELL_ORDER",
    "COST_KEYS",
    "METRICS",
    "Run",
    "Stat",
    "build_report",
    "collect_runs",
    "main",
]

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("pixel_AUPRO", "pixel_AP", "IoU", "pixel_AUROC", "image_AUROC")
METRIC_LABELS: dict[str, str] = {
    "pixel_AUPRO": "pixel AUPRO",
    "pixel_AP": "pixel AP",
    "IoU": "IoU",
    "pixel_AUROC": "pixel AUROC",
    "image_AUROC": "image AUROC",
}
GAP_MD_METRICS: tuple[str, ...] = ("pixel_AUPRO", "pixel_AP", "IoU")  # the CSV has the gap of all five
BAR_METRICS: tuple[str, ...] = ("pixel_AUPRO", "pixel_AP")
CELL_ORDER: tuple[tuple[str, str], ...] = (
    ("transfusion", "none"),
    ("unet", "gt"),
    ("unet", "pseudo"),
    ("deeplab", "gt"),
    ("deeplab", "pseudo"),
)
COST_KEYS: tuple[str, ...] = ("train_images_per_s", "test_images_per_s", "train_s")
COST_LABELS: dict[str, str] = {
    "train_images_per_s": "train img/s",
    "test_images_per_s": "test img/s",
    "train_s": "train time (s)",
}
QUALITY_KEYS: tuple[str, ...] = ("IoU", "precision", "recall")
MAX_GRID_IMAGES = 6
PLOTS_DIR = "report_plots"
GAP = "–"  # markdown for a missing value
UNDEFINED = "†"  # markdown mark: the run exists but the metric was undefined (NaN / null)
PLACEHOLDER_GREY = 128

Cell = tuple[str, str]


# ------------------------------------------------------------------------------------------------ gather
@dataclass(frozen=True)
class Run:
    """What the report needs from one finished run (read from its summary.json)."""

    category: str
    model: str
    mask: str
    seed: int | None
    run_dir: Path  # the folder that holds summary.json (where the run is now, not where it was written)
    metrics: dict[str, float]
    cost: dict[str, float]
    params: int | None
    manifest: Path | None
    pseudo: dict[str, Any] | None

    @property
    def cell(self) -> Cell:
        return (self.model, self.mask)


@dataclass
class Collected:
    """Runs used by the report and what was left out (and why)."""

    runs: list[Run] = field(default_factory=list)
    n_files: int = 0
    skipped_status: dict[str, int] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)


def _num(value: Any) -> float:
    """JSON number -> float; null, missing or non-numeric -> NaN (undefined)."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _parse_summary(path: Path, data: dict[str, Any]) -> Run:
    metrics_in = data.get("metrics") or {}
    metrics = {m: _num(metrics_in.get(f"test/{m}")) for m in METRICS}
    time_in = data.get("time") or {}
    thr_in = data.get("throughput") or {}
    cost = {
        "train_images_per_s": _num(thr_in.get("train_images_per_s")),
        "test_images_per_s": _num(thr_in.get("test_images_per_s")),
        "train_s": _num(time_in.get("train_s")),
    }
    manifest = (data.get("split") or {}).get("manifest")
    params = data.get("params")
    seed = data.get("seed")
    return Run(
        category=str(data["category"]),
        model=str(data["model"]),
        mask=str(data.get("mask") or "none"),
        seed=int(seed) if isinstance(seed, int | float) and not isinstance(seed, bool) else None,
        run_dir=path.parent,
        metrics=metrics,
        cost=cost,
        params=int(params) if isinstance(params, int | float) and not isinstance(params, bool) else None,
        manifest=Path(manifest) if manifest else None,
        pseudo=data["pseudo"] if isinstance(data.get("pseudo"), dict) else None,
    )


def collect_runs(folder: Path | str) -> Collected:
    """Read every summary.json below ``folder``; keep status "ok", count the others by status.

    Raises UserError when the folder is missing or holds no finished run, so the CLI can say so in a line.
    """
    root = Path(folder)
    if not root.exists():
        raise UserError(
            f"report folder not found: {root} — pass the output or sweep folder that holds the run folders"
        )
    if not root.is_dir():
        raise UserError(f"report folder is not a folder: {root} — pass the folder that holds the run folders")
    out = Collected()
    for path in sorted(root.rglob("summary.json")):
        if not path.is_file():
            continue
        out.n_files += 1
        try:
            data = json.loads(path.read_text())
            status = str(data.get("status", "unknown"))
            if status != "ok":
                out.skipped_status[status] = out.skipped_status.get(status, 0) + 1
                continue
            out.runs.append(_parse_summary(path, data))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("skipping unreadable %s: %s", path, err)
            out.unreadable.append(f"{path} ({type(err).__name__}: {err})")
    # a re-run of the same (category, model, mask, seed) replaces the earlier one instead of counting twice
    latest: dict[tuple, Run] = {}
    for run in sorted(out.runs, key=lambda r: (r.run_dir / "summary.json").stat().st_mtime_ns):
        key = (run.category, run.model, run.mask, run.seed)
        if key in latest:
            out.skipped_status["superseded"] = out.skipped_status.get("superseded", 0) + 1
        latest[key] = run
    out.runs = sorted(latest.values(), key=lambda r: str(r.run_dir))
    if out.n_files == 0:
        raise UserError(
            f"no summary.json found under {root} — pass the output or sweep folder that holds the run folders"
        )
    if not out.runs:
        found = ", ".join(f"{k}: {v}" for k, v in sorted(out.skipped_status.items())) or "none readable"
        raise UserError(
            f"no finished run (status 'ok') under {root}: {out.n_files} summary.json found ({found}) — "
            f"wait for the runs to finish or fix the failed ones"
        )
    return out


def _order_cells(cells: Iterable[Cell]) -> list[Cell]:
    """Reference first, then the segmenters in the documented order, then anything else sorted."""
    present = set(cells)
    known = [c for c in CELL_ORDER if c in present]
    return known + sorted(present - set(CELL_ORDER))


# ------------------------------------------------------------------------------------------------- stats
@dataclass(frozen=True)
class Stat:
    """Mean and spread of the finite values among ``n_values`` given ones (NaN = undefined)."""

    mean: float
    std: float  # sample std (ddof=1); NaN when fewer than two finite values
    n: int  # finite values
    n_values: int  # values given, undefined ones included

    @property
    def defined(self) -> bool:
        return self.n > 0


def _stat(values: Sequence[float]) -> Stat:
    arr = np.asarray([v for v in values], dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    n = int(finite.size)
    mean = float(finite.mean()) if n else math.nan
    std = float(finite.std(ddof=1)) if n >= 2 else math.nan
    return Stat(mean, std, n, int(arr.size))


def _mean_of(stats: Iterable[Stat | None]) -> Stat | None:
    """Mean over categories of the per-category means (categories without a defined value left out)."""
    means = [s.mean for s in stats if s is not None and s.defined]
    return _stat(means) if means else None


def _pseudo_records(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Distinct pseudo-mask sets of a category: U-Net and DeepLab share one set, so count it once."""
    seen: dict[str, dict[str, Any]] = {}
    for run in runs:
        if run.mask != "pseudo" or run.pseudo is None:
            continue
        info = run.pseudo
        key = str(info.get("dir") or json.dumps([info.get("threshold"), info.get("quality")], sort_keys=True))
        seen.setdefault(key, info)
    return list(seen.values())


def _quality(info: dict[str, Any], key: str) -> float:
    train = (info.get("quality") or {}).get("train") or {}
    return _num(train.get(key))


@dataclass
class Table:
    """Aggregated numbers; ``None`` means no run (a gap)."""

    categories: list[str]
    cells: list[Cell]
    gap_models: list[str]
    metric: dict[tuple[str, Cell, str], Stat]  # (category, cell, metric)
    cost: dict[tuple[str, Cell, str], Stat]
    params: dict[Cell, int]
    quality: dict[tuple[str, str], Stat]  # (category, "threshold" | IoU | precision | recall)
    strategy: dict[str, str]
    runs: dict[tuple[str, Cell], list[Run]]

    def get(self, category: str, cell: Cell, metric: str) -> Stat | None:
        return self.metric.get((category, cell, metric))

    def gap(self, category: str, model: str, metric: str) -> float | None:
        """Pseudo minus GT of the per-category means; None unless both are defined."""
        gt, ps = self.get(category, (model, "gt"), metric), self.get(category, (model, "pseudo"), metric)
        if gt is None or ps is None or not gt.defined or not ps.defined:
            return None
        return ps.mean - gt.mean

    def mean_metric(self, cell: Cell, metric: str) -> Stat | None:
        return _mean_of(self.get(c, cell, metric) for c in self.categories)

    def mean_cost(self, cell: Cell, key: str) -> Stat | None:
        return _mean_of(self.cost.get((c, cell, key)) for c in self.categories)

    def mean_gap(self, model: str, metric: str) -> Stat | None:
        gaps = [g for c in self.categories if (g := self.gap(c, model, metric)) is not None]
        return _stat(gaps) if gaps else None

    def mean_quality(self, key: str) -> Stat | None:
        return _mean_of(self.quality.get((c, key)) for c in self.categories)


def aggregate(runs: Sequence[Run]) -> Table:
    """Group runs by (category, cell) and reduce each group to mean / std / n."""
    groups: dict[tuple[str, Cell], list[Run]] = {}
    for run in sorted(
        runs, key=lambda r: (r.category, r.model, r.mask, r.seed if r.seed is not None else -1)
    ):
        groups.setdefault((run.category, run.cell), []).append(run)
    categories = sorted({r.category for r in runs})
    cells = _order_cells(r.cell for r in runs)
    metric: dict[tuple[str, Cell, str], Stat] = {}
    cost: dict[tuple[str, Cell, str], Stat] = {}
    params: dict[Cell, int] = {}
    for (cat, cell), group in groups.items():
        for m in METRICS:
            metric[(cat, cell, m)] = _stat([r.metrics[m] for r in group])
        for k in COST_KEYS:
            cost[(cat, cell, k)] = _stat([r.cost[k] for r in group])
        for r in group:
            if r.params is not None:
                params.setdefault(cell, r.params)
    quality: dict[tuple[str, str], Stat] = {}
    strategy: dict[str, str] = {}
    for cat in categories:
        records = _pseudo_records([r for (c, _), g in groups.items() if c == cat for r in g])
        if not records:
            continue
        quality[(cat, "threshold")] = _stat([_num(info.get("threshold")) for info in records])
        for key in QUALITY_KEYS:
            quality[(cat, key)] = _stat([_quality(info, key) for info in records])
        strategy[cat] = "/".join(sorted({str(info.get("strategy", "?")) for info in records}))
    gap_models = [
        m for m in dict.fromkeys(m for m, _ in cells) if (m, "gt") in cells and (m, "pseudo") in cells
    ]
    return Table(categories, cells, gap_models, metric, cost, params, quality, strategy, groups)


# --------------------------------------------------------------------------------------------------- CSV
def _cell_name(cell: Cell) -> str:
    return f"{cell[0]}/{cell[1]}"


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
        for m in METRICS:
            cols += _stat_columns(f"{_cell_name(cell)}/{m}")
    for model in t.gap_models:
        cols += [f"gap/{model}/{m}" for m in METRICS]
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
            for m in METRICS:
                stat = t.get(cat, cell, m) if cat is not None else t.mean_metric(cell, m)
                _put(row, f"{_cell_name(cell)}/{m}", stat)
        for model in t.gap_models:
            for m in METRICS:
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


def _csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
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


def _cell_label(cell: Cell) -> str:
    model, mask = cell
    return f"{model} (reference)" if mask == "none" else f"{model} / {mask}"


def _metric_table(t: Table, m: str) -> list[str]:
    header = ["category", *[_cell_label(c) for c in t.cells]]
    rows = [[cat, *[_fmt(t.get(cat, c, m)) for c in t.cells]] for cat in t.categories]
    rows.append(["**mean**", *[_fmt(t.mean_metric(c, m), mean_row=True) for c in t.cells]])
    return _md_table(header, rows)


def _gap_table(t: Table) -> list[str]:
    header = ["category"]
    for model in t.gap_models:
        header += [f"{model} Δ{METRIC_LABELS[m]}" for m in GAP_MD_METRICS]
    rows = []
    for cat in t.categories:
        row = [cat]
        for model in t.gap_models:
            for m in GAP_MD_METRICS:
                g = t.gap(cat, model, m)
                row.append(GAP if g is None else f"{g:+.3f}")
        rows.append(row)
    mean_row = ["**mean**"]
    for model in t.gap_models:
        mean_row += [_fmt(t.mean_gap(model, m), signed=True, mean_row=True) for m in GAP_MD_METRICS]
    rows.append(mean_row)
    return _md_table(header, rows)


def _quality_table(t: Table) -> list[str]:
    header = ["category", "strategy", "threshold", "IoU", "precision", "recall"]
    rows = []
    for cat in t.categories:
        if (cat, "IoU") not in t.quality:
            rows.append([cat, GAP, GAP, GAP, GAP, GAP])
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
            _cell_label(c),
            *[_fmt(t.mean_cost(c, k), mean_row=True) for k in COST_KEYS],
            _params_text(t.params.get(c)),
        ]
        for c in t.cells
    ]
    return _md_table(header, rows)


def _uses_undefined(t: Table) -> bool:
    return any(s.n_values > s.n for s in t.metric.values())


# ------------------------------------------------------------------------------------------------- plots
def _figure(figsize: tuple[float, float], dpi: int = 100) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_fig(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return atomic_write_bytes(path, buf.getvalue())


def _bar_plot(t: Table, m: str, path: Path) -> Path:
    """Grouped bars: categories (and the mean) on x, one bar per cell; missing cells leave no bar."""
    from matplotlib import colormaps

    groups = [*t.categories, "mean"]
    n_cells = max(len(t.cells), 1)
    width = 0.8 / n_cells
    fig = _figure((max(6.0, 0.35 * len(groups) * n_cells + 2.5), 4.2))
    ax = fig.subplots()
    colours = colormaps["tab10"]
    for j, cell in enumerate(t.cells):
        xs, ys, ex, ey, err = [], [], [], [], []
        for i, cat in enumerate(groups):
            stat = t.mean_metric(cell, m) if cat == "mean" else t.get(cat, cell, m)
            if stat is None or not stat.defined:
                continue
            x = i - 0.4 + width * (j + 0.5)
            xs.append(x)
            ys.append(stat.mean)
            if cat != "mean" and stat.n >= 2:  # spread over seeds only, not over categories
                ex.append(x)
                ey.append(stat.mean)
                err.append(stat.std)
        if xs:
            ax.bar(xs, ys, width * 0.95, color=colours(j % 10), label=_cell_label(cell))
        if ex:
            ax.errorbar(ex, ey, yerr=err, fmt="none", ecolor="black", elinewidth=1.0, capsize=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(
        groups, rotation=30 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center"
    )
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel(METRIC_LABELS[m])
    ax.set_title(
        f"{METRIC_LABELS[m]} per category (error bar: std over seeds; mean: over categories)", fontsize=9
    )
    ax.grid(axis="y", alpha=0.3)
    if t.cells:
        ax.legend(fontsize=8, ncols=min(len(t.cells), 5), loc="upper left", bbox_to_anchor=(0.0, -0.12))
    return _save_fig(fig, path)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "category"


def _resize(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Float [H,W] map resized bilinearly (runs trained at another image size still line up)."""
    if arr.shape == hw:
        return arr
    from PIL import Image

    return np.asarray(
        Image.fromarray(arr.astype(np.float32), mode="F").resize((hw[1], hw[0]), Image.BILINEAR)
    )


def _load_image(category_dir: Path, rel: str, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    from mvtec_seg.data.mvtec import load_rgb

    img = load_rgb(category_dir / rel, max(hw))
    if img.shape[:2] != hw:
        img = np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), Image.BILINEAR))
    return img


def _heat_overlay(
    image: np.ndarray, amap: np.ndarray, gt: np.ndarray, vmin: float, vmax: float
) -> np.ndarray:
    """Image with the map in 'jet' on a fixed [vmin, vmax] scale, half transparent, GT outline in green."""
    from matplotlib import colormaps

    span = vmax - vmin if vmax > vmin else 1e-6
    norm = np.clip((np.nan_to_num(amap.astype(np.float32), nan=vmin) - vmin) / span, 0.0, 1.0)
    heat = colormaps["jet"](norm)[..., :3]
    out = 0.5 * (image.astype(np.float32) / 255.0) + 0.5 * heat
    edge = _outline(gt > 0)
    out[edge] = (0.0, 1.0, 0.4)
    return np.clip(out, 0.0, 1.0)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask that touch a non-mask pixel (4-neighbourhood)."""
    if not mask.any():
        return mask
    padded = np.pad(mask, 1, mode="edge")
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


@dataclass
class _Preds:
    run: Run
    keys: list[str]
    key_row: dict[str, int]
    labels: np.ndarray
    npz: Any


def _open_preds(run: Run) -> _Preds | None:
    path = run.run_dir / "test_predictions.npz"
    if not path.is_file():
        return None
    try:
        npz = np.load(path, allow_pickle=False)
        keys = [str(p) for p in npz["path"]] if "path" in npz.files else [str(i) for i in npz["index"]]
        labels = np.asarray(npz["gt_label"]).astype(np.int64).ravel()
    except (OSError, ValueError, KeyError) as err:
        log.warning("cannot read %s: %s", path, err)
        return None
    return _Preds(run, keys, {k: i for i, k in enumerate(keys)}, labels, npz)


def _category_dir(runs: Sequence[Run]) -> tuple[Path | None, str]:
    """The category folder from the first readable split manifest, and why not if there is none."""
    for run in runs:
        if run.manifest is None or not run.manifest.is_file():
            continue
        try:
            cat_dir = json.loads(run.manifest.read_text()).get("category_dir")
        except (OSError, ValueError) as err:
            log.warning("cannot read manifest %s: %s", run.manifest, err)
            continue
        if cat_dir:
            return Path(cat_dir), ""
    return None, "split manifest not found"


def _choose_images(keys: Sequence[str], labels: dict[str, int], k: int = MAX_GRID_IMAGES) -> list[str]:
    """Up to k images, anomalous first, spread evenly over the sorted list (so over defect types)."""
    bad = sorted(x for x in keys if labels.get(x, 0) == 1)
    good = sorted(x for x in keys if labels.get(x, 0) != 1)

    def spread(items: list[str], n: int) -> list[str]:
        if len(items) <= n:
            return items
        idx = np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))
        return [items[i] for i in idx]

    chosen = spread(bad, k)
    return chosen + spread(good, k - len(chosen))


def _short(rel: str) -> str:
    """'test/crack/001.png' -> 'crack/001' for row labels."""
    p = Path(rel)
    parent = p.parent.name
    return f"{parent}/{p.stem}" if parent else p.stem


def _category_grid(t: Table, cat: str, path: Path) -> tuple[Path | None, list[str]]:
    """Grid of the same test images across cells: image, GT, one heatmap overlay per cell.

    Returns the PNG (or None) and markdown notes (scales, placeholders, what was left out).
    """
    all_runs = [r for c in t.cells for r in t.runs.get((cat, c), [])]
    opened = {id(r): _open_preds(r) for r in all_runs}
    try:
        return _draw_grid(t, cat, path, all_runs, opened)
    finally:
        for preds in opened.values():
            if preds is not None:
                preds.npz.close()


def _draw_grid(
    t: Table, cat: str, path: Path, all_runs: list[Run], opened: dict[int, _Preds | None]
) -> tuple[Path | None, list[str]]:
    from mvtec_seg.viz import image_grid

    notes: list[str] = []
    reps: list[_Preds] = []
    for cell in t.cells:
        group = t.runs.get((cat, cell), [])
        rep = next((opened[id(r)] for r in group if opened[id(r)] is not None), None)
        if rep is not None:
            reps.append(rep)
            if len(group) > 1:
                notes.append(f"{_cell_label(cell)}: maps of seed {rep.run.seed} ({len(group)} runs)")
        elif group:
            notes.append(f"{_cell_label(cell)}: no test_predictions.npz, column left out")
    available = [p for p in opened.values() if p is not None]
    if not reps:
        return None, ["no run of this category has test_predictions.npz"]
    common = set(available[0].keys)
    for p in available[1:]:
        common &= set(p.keys)
    if not common:
        return None, ["the runs share no test image (different splits?)"]
    label_of = {k: int(reps[0].labels[reps[0].key_row[k]]) for k in common}
    chosen = _choose_images(sorted(common), label_of)

    first = reps[0]
    gt_all = first.npz["gt_mask"]
    hw = tuple(int(s) for s in gt_all.shape[-2:])
    cat_dir, why = _category_dir([r.run for r in reps] + all_runs)
    if cat_dir is not None and not cat_dir.is_dir():
        why = f"category folder {cat_dir} not found"
        cat_dir = None
    n_placeholder = 0

    columns: list[tuple[str, np.ndarray, float, float]] = []
    for rep in reps:
        maps = np.asarray(rep.npz["anomaly_map"], dtype=np.float32)
        finite = maps[np.isfinite(maps)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        columns.append((_cell_label(rep.run.cell), maps, lo, hi))

    rows: list[list[np.ndarray]] = []
    titles: list[str] = []
    grey = np.full((*hw, 3), PLACEHOLDER_GREY, dtype=np.uint8)
    for key in chosen:
        image = grey
        if cat_dir is not None:
            try:
                image = _load_image(cat_dir, key, hw)
            except (UserError, OSError) as err:
                log.warning("report: %s", err)
                n_placeholder += 1
        gt = np.asarray(gt_all[first.key_row[key]]).reshape(hw) > 0
        row: list[np.ndarray] = [image, gt.astype(np.float32)]
        for rep, (_, maps, lo, hi) in zip(reps, columns, strict=True):
            amap = _resize(maps[rep.key_row[key]], hw)
            row.append(_heat_overlay(image, amap, gt, lo, hi))
        rows.append(row)
        titles.append(_short(key) + (" (normal)" if label_of[key] != 1 else ""))
    col_titles = ["image", "GT"] + [f"{name}\n[{lo:.3g}, {hi:.3g}]" for name, _, lo, hi in columns]
    image_grid(rows, titles, col_titles, path, panel_inches=1.8)
    if cat_dir is None:
        notes.append(f"{why}: images shown as grey placeholders")
    elif n_placeholder:
        notes.append(f"{n_placeholder} image(s) could not be read: grey placeholders")
    return path, notes


# ------------------------------------------------------------------------------------------------ report
def _markdown(
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
    lines.append(f"Categories: {len(t.categories)}. Cells: {', '.join(_cell_label(c) for c in t.cells)}.")
    lines += [
        "",
        "Values: mean ± sample std (n = runs, e.g. seeds) when a cell has several runs; "
        f"`{GAP}` = no run. The **mean** row averages over the categories that have the cell "
        "(n = number of categories). 3 decimals; full precision in `report.csv`.",
        "",
    ]
    if coll.unreadable:
        lines += ["Unreadable summaries (left out):", *[f"- `{u}`" for u in coll.unreadable[:10]], ""]

    lines += ["## Test metrics", ""]
    for m in METRICS:
        lines += [f"### {METRIC_LABELS[m]}", "", *_metric_table(t, m), ""]
        if m in plots:
            lines += [f"![{METRIC_LABELS[m]} per category]({link(plots[m])})", ""]
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


def build_report(folder: Path | str, out: Path | str | None = None) -> dict[str, Any]:
    """Write report.md, report.csv and report_plots/ for every finished run below ``folder``.

    Returns the paths written, the CSV columns and rows (None = gap), categories and cells, so a caller or
    a test can check numbers without parsing files.
    """
    folder = Path(folder)
    coll = collect_runs(folder)
    out_dir = Path(out) if out is not None else folder
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir = out_dir.resolve()
    t = aggregate(coll.runs)
    plots_dir = out_dir / PLOTS_DIR

    plots: dict[str, Path] = {}
    for m in BAR_METRICS:
        plots[m] = _bar_plot(t, m, plots_dir / f"bars_{m}.png")
    grids: dict[str, tuple[Path | None, list[str]]] = {}
    for cat in t.categories:
        try:
            grids[cat] = _category_grid(t, cat, plots_dir / f"grid_{_safe(cat)}.png")
        except Exception as err:  # one bad prediction file must not cost the whole report
            log.warning("report: no image grid for %s: %s", cat, err)
            grids[cat] = (None, [f"image grid failed: {type(err).__name__}: {err}"])

    columns = csv_columns(t)
    rows = csv_rows(t)
    csv_path = atomic_write_text(out_dir / "report.csv", _csv_text(columns, rows))
    md_path = atomic_write_text(out_dir / "report.md", _markdown(folder, out_dir, t, coll, plots, grids))
    return {
        "report_md": md_path,
        "report_csv": csv_path,
        "plots": [*plots.values(), *[p for p, _ in grids.values() if p is not None]],
        "columns": columns,
        "rows": rows,
        "categories": t.categories,
        "cells": t.cells,
        "n_runs": len(coll.runs),
        "skipped": dict(coll.skipped_status),
        "unreadable": list(coll.unreadable),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: returns 0, or 2 with a one-line message on bad input (no traceback)."""
    parser = argparse.ArgumentParser(
        prog="python -m mvtec_seg.report",
        description="Gather the summary.json of every finished run below FOLDER into report.md/csv and plots.",
    )
    parser.add_argument("folder", type=Path, help="output or sweep folder holding run folders")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: FOLDER)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = build_report(args.folder, args.out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"report: {result['report_md']} and {result['report_csv']} "
        f"({result['n_runs']} runs, {len(result['categories'])} categories, {len(result['plots'])} plots)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
