"""The report's figures: grouped bar plots per metric and, per category, a grid of the same test images
across models (image, GT, each model's heat overlay on one colour scale per column)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mvtec_seg.errors import UserError
from mvtec_seg.io_utils import flat_name
from mvtec_seg.metrics import METRIC_LABELS
from mvtec_seg.report.aggregate import Table
from mvtec_seg.report.collect import Run
from mvtec_seg.report.tables import cell_label
from mvtec_seg.summary import PREDICTIONS_FILE
from mvtec_seg.viz import figure, heat_overlay, image_grid, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

BAR_METRICS: tuple[str, ...] = ("pixel_AUPRO", "pixel_AP")
MAX_GRID_IMAGES = 6
PLACEHOLDER_GREY = 128
GRID_INCHES = 1.8
GRID_LABEL_CHARS = 24  # a column title's line over one panel of GRID_INCHES at 9 pt


def wrap_label(text: str, width: int) -> str:
    """A label in lines of at most `width` characters, broken after a space or a comma where it can be, so a
    long cell label (`unet / gt [model.params.optimizer._target_=...]`) stays inside its figure."""
    import textwrap

    return "\n".join(
        textwrap.wrap(text.replace(",", ", ").replace(",  ", ", "), width, break_on_hyphens=False) or [text]
    )


def _chars(inches: float, fontsize: float) -> int:
    """How many characters of this font size fit in this many inches (an average glyph is ~0.6 em)."""
    return max(12, int(inches * 72 / (0.6 * fontsize)))


def bar_plot(t: Table, m: str, path: Path) -> Path:
    """Grouped bars: categories (and the mean) on x, one bar per cell; missing cells leave no bar."""
    return save_figure(bar_figure(t, m), path)


def bar_figure(t: Table, m: str) -> Figure:
    """The figure of `bar_plot`, whole: the title wraps to the figure's width, the legend's cell labels wrap
    and take as many columns as fit, so neither is cut at any size the page shows it."""
    from matplotlib import colormaps

    groups = [*t.categories, "mean"]
    n_cells = max(len(t.cells), 1)
    width = 0.8 / n_cells
    fig_w = max(6.0, 0.35 * len(groups) * n_cells + 2.5)
    labels = [cell_label(cell) for cell in t.cells]
    label_w = min(max((len(s) for s in labels), default=1), 48)
    ncols = max(1, min(len(labels), _chars(fig_w - 0.3, 8) // (label_w + 6)))
    wrapped = [wrap_label(s, label_w) for s in labels]
    legend_lines = sum(
        max(w.count("\n") + 1 for w in wrapped[i : i + ncols]) for i in range(0, len(wrapped), ncols)
    )
    fig = figure((fig_w, 4.2 + 0.16 * legend_lines))
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
            ax.bar(xs, ys, width * 0.95, color=colours(j % 10), label=wrapped[j])
        if ex:
            ax.errorbar(ex, ey, yerr=err, fmt="none", ecolor="black", elinewidth=1.0, capsize=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(
        groups, rotation=30 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center"
    )
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel(METRIC_LABELS[m])
    title = f"{METRIC_LABELS[m]} per category (error bar: std over seeds; mean: over categories)"
    ax.set_title(wrap_label(title, _chars(fig_w - 0.8, 9)), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if t.cells:
        fig.legend(fontsize=8, ncols=ncols, loc="outside lower center")  # below the tick labels
    return fig


def safe_name(name: str) -> str:
    return flat_name(name, "category")


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


@dataclass
class _Preds:
    run: Run
    keys: list[str]
    key_row: dict[str, int]
    labels: np.ndarray
    npz: Any


def _open_preds(run: Run) -> _Preds | None:
    path = run.run_dir / PREDICTIONS_FILE
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
        manifest = run.summary.manifest
        if manifest is None or not manifest.is_file():
            continue
        try:
            cat_dir = json.loads(manifest.read_text()).get("category_dir")
        except (OSError, ValueError) as err:
            log.warning("cannot read manifest %s: %s", manifest, err)
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


def category_grid(t: Table, cat: str, path: Path) -> tuple[Path | None, list[str]]:
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
    notes: list[str] = []
    reps: list[_Preds] = []
    for cell in t.cells:
        group = t.runs.get((cat, cell), [])
        rep = next((opened[id(r)] for r in group if opened[id(r)] is not None), None)
        if rep is not None:
            reps.append(rep)
            if len(group) > 1:
                notes.append(f"{cell_label(cell)}: maps of seed {rep.run.seed} ({len(group)} runs)")
        elif group:
            notes.append(f"{cell_label(cell)}: no test_predictions.npz, column left out")
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
        columns.append((wrap_label(cell_label(rep.run.cell), GRID_LABEL_CHARS), maps, lo, hi))

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
            row.append(heat_overlay(image, amap, lo, hi, gt_mask=gt))
        rows.append(row)
        titles.append(_short(key) + (" (normal)" if label_of[key] != 1 else ""))
    col_titles = ["image", "GT"] + [f"{name}\n[{lo:.3g}, {hi:.3g}]" for name, _, lo, hi in columns]
    image_grid(rows, titles, col_titles, path, panel_inches=GRID_INCHES)
    if cat_dir is None:
        notes.append(f"{why}: images shown as grey placeholders")
    elif n_placeholder:
        notes.append(f"{n_placeholder} image(s) could not be read: grey placeholders")
    return path, notes
