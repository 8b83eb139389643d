"""Figures for runs and reports: overlay panels, ROC/PR/PRO curves, loss curves and comparison grids.

Matplotlib is imported inside the functions (importing the package stays fast) and only through its
object API with the Agg canvas (no pyplot global state: safe in workers and threads, no display needed).
Heatmaps use one fixed colour scale for a whole run: normalising each map by its own min/max would make a
normal image's noise look as hot as a real defect. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mvtec_seg.io_utils import atomic_save_png, atomic_write_bytes, flat_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "OVERLAY_DPI",
    "OVERLAY_FIGSIZE",
    "figure",
    "heat_overlay",
    "image_grid",
    "overlay_panel",
    "plot_curves",
    "plot_loss_curves",
    "save_figure",
    "save_overlays",
]

OVERLAY_FIGSIZE: tuple[float, float] = (10.0, 3.0)  # inches (w, h): overlay_panel returns [300, 1000, 3]
OVERLAY_DPI: int = 100
CURVE_FIGSIZE: tuple[float, float] = (5.0, 4.5)
CURVE_DPI: int = 100
GT_CONTOUR_COLOUR = "#00ff66"
HEAT_CMAP = "jet"
_MAX_PLOT_POINTS = 4000


# ------------------------------------------------------------------------------------------------ helpers
def figure(figsize: tuple[float, float], dpi: int = 100) -> Figure:
    """A matplotlib Figure on the Agg canvas (no pyplot state), constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _render(fig: Figure) -> np.ndarray:
    """Figure -> uint8 RGB array of exactly figsize*dpi pixels."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig: Figure, path: Path | str) -> Path:
    """Write the figure as PNG atomically at its own dpi."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return atomic_write_bytes(path, buf.getvalue())


def _to_numpy(x: Any) -> np.ndarray:
    """Accept numpy arrays, lists and (CPU or GPU) torch tensors."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_rgb(image: Any) -> np.ndarray:
    """Image as float RGB [H,W,3] in [0,1]; accepts uint8 or float, HWC, CHW or grey."""
    img = _to_numpy(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.moveaxis(img, 0, -1)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an image [H,W,3], [3,H,W] or [H,W], got shape {img.shape}")
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def _as_2d(x: Any, what: str) -> np.ndarray:
    arr = _to_numpy(x)
    arr = arr.reshape(arr.shape[-2:]) if arr.ndim == 3 and arr.shape[0] == 1 else arr
    if arr.ndim != 2:
        raise ValueError(f"expected {what} [H,W] (or [1,H,W]), got shape {arr.shape}")
    return arr


def _safe_name(name: str) -> str:
    """'test/crack/000.png' -> 'test_crack_000' (one flat folder, no surprises in file names)."""
    stem = re.sub(r"\.(png|jpe?g|bmp|tiff?)$", "", str(name), flags=re.IGNORECASE)
    return flat_name(stem, "image")


def _thin(*curves: np.ndarray, n: int = _MAX_PLOT_POINTS) -> list[np.ndarray]:
    """Keep at most n points per curve for plotting (the AUCs are computed on the full curves)."""
    length = len(curves[0])
    if length <= n:
        return list(curves)
    idx = np.unique(np.linspace(0, length - 1, n).round().astype(np.int64))
    return [c[idx] for c in curves]


# ------------------------------------------------------------------------------------------------ overlay
def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask that touch a non-mask pixel (4-neighbourhood)."""
    if not mask.any():
        return mask
    padded = np.pad(mask, 1, mode="edge")
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def heat_overlay(
    image: Any, anomaly_map: Any, vmin: float, vmax: float, gt_mask: Any | None = None, alpha: float = 0.5
) -> np.ndarray:
    """The image with the map in 'jet' on the fixed scale [vmin, vmax] blended over it (``alpha``), and the
    GT outline in green when given: float RGB [H,W,3] in [0,1]. The one heat renderer of the project."""
    from matplotlib import colormaps

    img = _as_rgb(image)
    amap = _as_2d(anomaly_map, "anomaly_map").astype(np.float32)
    span = vmax - vmin if vmax > vmin else 1e-6
    norm = np.clip((np.nan_to_num(amap, nan=vmin) - vmin) / span, 0.0, 1.0)
    out = (1 - alpha) * img + alpha * colormaps[HEAT_CMAP](norm)[..., :3]
    if gt_mask is not None:
        out[_outline(_as_2d(gt_mask, "gt_mask") > 0.5)] = (0.0, 1.0, 0.4)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def overlay_panel(
    image: Any,
    gt_mask: Any,
    anomaly_map: Any,
    threshold: float,
    title: str = "",
    vmin: float = 0.0,
    vmax: float = 1.0,
    alpha: float = 0.5,
    dpi: int = OVERLAY_DPI,
) -> np.ndarray:
    """Four panels (image, GT, heatmap over the image, prediction >= threshold with the GT contour) as RGB.

    The heatmap uses the fixed scale [vmin, vmax] (pass the run's global range, or 0..1 for probabilities),
    never the map's own range, so panels of one run are comparable. Returns uint8 [h, w, 3] with
    (h, w) = OVERLAY_FIGSIZE * dpi, ready to save or log to W&B.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    img = _as_rgb(image)
    gt = _as_2d(gt_mask, "gt_mask") > 0.5
    amap = _as_2d(anomaly_map, "anomaly_map").astype(np.float32)
    if gt.shape != img.shape[:2] or amap.shape != img.shape[:2]:
        raise ValueError(
            f"image {img.shape[:2]}, gt_mask {gt.shape} and anomaly_map {amap.shape} differ in size"
        )
    if not vmax > vmin:
        vmax = vmin + 1e-6
    fig = figure(OVERLAY_FIGSIZE, dpi)
    axes = fig.subplots(1, 4)
    axes[0].imshow(img, interpolation="nearest")
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(gt, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[1].set_title(f"ground truth ({gt.mean() * 100:.1f}%)", fontsize=9)
    axes[2].imshow(heat_overlay(img, amap, vmin, vmax, alpha=alpha), interpolation="nearest")
    axes[2].set_title(f"anomaly map (max {np.nanmax(amap):.3g})", fontsize=9)
    scale = ScalarMappable(norm=Normalize(vmin=vmin, vmax=vmax), cmap=HEAT_CMAP)
    cbar = fig.colorbar(scale, ax=axes[2], fraction=0.046, pad=0.02)
    cbar.ax.tick_params(labelsize=7)
    pred = amap >= threshold
    axes[3].imshow(pred, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    if gt.any() and not gt.all():
        axes[3].contour(gt.astype(np.float32), levels=[0.5], colors=GT_CONTOUR_COLOUR, linewidths=1.0)
    inter, union = np.logical_and(pred, gt).sum(), np.logical_or(pred, gt).sum()
    iou = f", IoU {inter / union:.2f}" if union else ""
    axes[3].set_title(f"pred >= {threshold:.3g}{iou}", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return _render(fig)


def save_overlays(
    out_dir: Path | str,
    images: Any,
    gt_masks: Any,
    anomaly_maps: Any,
    names: Sequence[str],
    threshold: float,
    vmin: float | None = None,
    vmax: float | None = None,
    max_images: int | None = None,
) -> list[Path]:
    """Write one overlay PNG per image (the first ``max_images``) into ``out_dir``; returns the paths.

    vmin/vmax default to the global min/max over all given maps, so every panel shares one colour scale.
    """
    maps = _to_numpy(anomaly_maps).astype(np.float32)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    n = len(maps)
    if not (len(images) == len(gt_masks) == len(names) == n):
        raise ValueError(
            f"save_overlays needs as many images ({len(images)}), masks ({len(gt_masks)}) and "
            f"names ({len(names)}) as maps ({n})"
        )
    if n == 0:
        return []
    finite = maps[np.isfinite(maps)]
    lo = float(finite.min()) if vmin is None and finite.size else (0.0 if vmin is None else float(vmin))
    hi = float(finite.max()) if vmax is None and finite.size else (1.0 if vmax is None else float(vmax))
    out = Path(out_dir)
    count = n if max_images is None else max(0, min(int(max_images), n))
    paths: list[Path] = []
    used: set[str] = set()
    for i in range(count):
        stem = _safe_name(names[i])
        if stem in used:  # keep every panel even if two names flatten to the same file name
            stem = f"{stem}_{i}"
        used.add(stem)
        score = float(np.nanmax(maps[i])) if np.isfinite(maps[i]).any() else float("nan")
        panel = overlay_panel(
            images[i], gt_masks[i], maps[i], threshold, f"{names[i]}  (score {score:.3g})", vmin=lo, vmax=hi
        )
        paths.append(atomic_save_png(out / f"{stem}.png", panel))
    return paths


# ------------------------------------------------------------------------------------------------- curves
def _np(curve: tuple) -> list[np.ndarray]:
    return [c.numpy() for c in curve]


def _curve_figure(
    path: Path,
    x: np.ndarray,
    y: np.ndarray,
    label: str,
    xlabel: str,
    ylabel: str,
    title: str,
    diagonal: bool = False,
    xlim: tuple[float, float] = (0.0, 1.0),
) -> Path:
    fig = figure(CURVE_FIGSIZE, CURVE_DPI)
    ax = fig.subplots()
    x, y = _thin(x, y)
    ax.plot(x, y, lw=1.8, label=label)
    if diagonal:
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax.set_xlim(*xlim)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def plot_curves(
    anomaly_map: Any,
    gt_mask: Any,
    gt_label: Any,
    out_dir: Path | str,
    fpr_limit: float = 0.3,
    metrics: dict[str, float] | None = None,
) -> list[Path]:
    """Pixel ROC, image ROC, pixel precision-recall and PRO-vs-FPR (up to fpr_limit) as PNGs in out_dir.

    The curves come from `mvtec_seg.metrics` (exact, one point per distinct score) and their legends give
    the metric values: `metrics` (``test/<name>`` or ``<name>`` keys, e.g. a run's summary) when given, so a
    figure shows exactly the number in `summary.json`, else computed here. A curve that is undefined for
    the data (no defect pixel, or one image class) is skipped; the paths written are returned.
    """
    import torch

    from mvtec_seg.metrics import functional as F

    maps = _to_numpy(anomaly_map).astype(np.float32)
    masks = _to_numpy(gt_mask)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    masks = masks > 0.5 if masks.dtype.kind == "f" else masks > 0
    labels = _to_numpy(gt_label).astype(np.int64).ravel()
    if maps.shape != masks.shape or maps.ndim != 3 or len(labels) != len(maps):
        raise ValueError(
            f"plot_curves needs maps [N,H,W] {maps.shape}, masks {masks.shape}, labels [N] {labels.shape}"
        )
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    out = Path(out_dir)
    paths: list[Path] = []
    n_pos, n_pix = int(masks.sum()), int(masks.size)
    pixel_curves, image_curve = 0 < n_pos < n_pix, 0 < labels.sum() < len(labels)
    values = {k.split("/")[-1]: float(v) for k, v in (metrics or {}).items()}
    if (pixel_curves or image_curve) and not set(F.METRIC_NAMES) <= set(values):
        values = F.compute_all(maps, masks, labels, fpr_limit=fpr_limit)
    if pixel_curves:
        fpr, tpr = _np(F.roc_curve(maps, masks))
        paths.append(
            _curve_figure(
                out / "roc_pixel.png",
                fpr,
                tpr,
                f"pixel AUROC = {values['pixel_AUROC']:.4f}",
                "false positive rate",
                "true positive rate",
                "Pixel ROC",
                diagonal=True,
            )
        )
        precision, recall = _np(F.precision_recall_curve(maps, masks))
        paths.append(
            _curve_figure(
                out / "pr_pixel.png",
                np.r_[recall[0], recall],  # drawn from precision 1 at the first recall
                np.r_[1.0, precision],
                f"pixel AP = {values['pixel_AP']:.4f} (chance {n_pos / n_pix:.3f})",
                "recall",
                "precision",
                "Pixel precision-recall",
            )
        )
        pfpr, pro = _np(F.pro_curve(maps, masks, fpr_limit=fpr_limit))
        paths.append(
            _curve_figure(
                out / "pro_curve.png",
                pfpr,
                pro,
                f"AUPRO@{fpr_limit:g} = {values['pixel_AUPRO']:.4f}",
                "false positive rate",
                "per-region overlap",
                f"PRO up to FPR {fpr_limit:g}",
                xlim=(0.0, fpr_limit),
            )
        )
    if image_curve:
        fpr, tpr = _np(F.roc_curve(F.image_scores(torch.from_numpy(maps)), labels > 0))
        paths.append(
            _curve_figure(
                out / "roc_image.png",
                fpr,
                tpr,
                f"image AUROC = {values['image_AUROC']:.4f}",
                "false positive rate",
                "true positive rate",
                "Image ROC (score = max of map)",
                diagonal=True,
            )
        )
    return paths


# ---------------------------------------------------------------------------------------------- training
def _read_metrics_csv(path: Path) -> tuple[dict[str, list[tuple[float, float, float]]], bool]:
    """{metric: [(step, epoch, value), ...]} from a Lightning CSVLogger file (empty cells skipped)."""
    series: dict[str, list[tuple[float, float, float]]] = {}
    has_epoch = False
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            step = _float(row.get("step"))
            epoch = _float(row.get("epoch"))
            has_epoch |= not math.isnan(epoch)
            for key, cell in row.items():
                if key in (None, "step", "epoch"):
                    continue
                value = _float(cell)
                if not math.isnan(value):
                    series.setdefault(key, []).append((step, epoch, value))
    return series, has_epoch


def _float(cell: Any) -> float:
    try:
        return float(cell) if cell not in (None, "") else math.nan
    except (TypeError, ValueError):
        return math.nan


def plot_loss_curves(metrics_csv: Path | str, out_path: Path | str) -> Path:
    """Plot every metric of a Lightning CSVLogger ``metrics.csv`` against epoch (or step) into one PNG.

    Losses share one panel, scores in [0, 1] (AUROC, AP, AUPRO, IoU) another, anything else (learning
    rate, ...) a third on a log scale. Metrics logged at most once per epoch are drawn against the epoch;
    if any metric is logged more often, everything is drawn against the global step so the axes agree.
    """
    from matplotlib.ticker import MaxNLocator

    from mvtec_seg.errors import UserError

    path = Path(metrics_csv)
    if not path.is_file():
        raise UserError(f"metrics file not found: {path} — it is written by the CSV logger during training")
    series, has_epoch = _read_metrics_csv(path)
    per_epoch = has_epoch and all(
        len({e for _, e, _ in pts}) == len(pts) and not any(math.isnan(e) for _, e, _ in pts)
        for pts in series.values()
    )
    xi, xlabel = (1, "epoch") if per_epoch else (0, "step")
    groups: dict[str, list[str]] = {"loss": [], "score": [], "other": []}
    for key, pts in series.items():
        values = np.array([p[2] for p in pts])
        name = key.lower().rsplit("/", 1)[-1]
        if "loss" in name:
            groups["loss"].append(key)
        elif not name.startswith(("lr", "learning_rate")) and values.min() >= 0.0 and values.max() <= 1.0:
            groups["score"].append(key)
        else:
            groups["other"].append(key)
    panels = [(g, keys) for g, keys in groups.items() if keys]
    fig = figure((5.0 * max(len(panels), 1), 4.0), CURVE_DPI)
    axes = np.atleast_1d(fig.subplots(1, max(len(panels), 1)))
    if not panels:
        axes[0].text(0.5, 0.5, f"no metrics logged yet in\n{path.name}", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, (group, keys) in zip(axes, panels, strict=False):
        for key in sorted(keys):
            pts = sorted(series[key], key=lambda p: (p[xi], p[0]))
            x = np.array([p[xi] for p in pts])
            y = np.array([p[2] for p in pts])
            ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, lw=1.4, label=key)
        if group == "other" and all(p[2] > 0 for k in keys for p in series[k]):
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title({"loss": "losses", "score": "scores", "other": "other"}[group], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("/".join(path.parts[-3:]), fontsize=9)
    return save_figure(fig, out_path)


# ------------------------------------------------------------------------------------------------- grids
def image_grid(
    rows: Sequence[Sequence[Any | None]],
    row_titles: Sequence[str] | None,
    col_titles: Sequence[str] | None,
    out_path: Path | str,
    panel_inches: float = 2.0,
    dpi: int = 100,
) -> Path:
    """Save a grid of image panels (RGB/grey arrays; None leaves a cell blank), e.g. method x sample.

    Grey float panels are drawn with a fixed 0..1 grey scale, not stretched, so they stay comparable.
    """
    n_rows = len(rows)
    n_cols = max((len(r) for r in rows), default=0)
    if n_rows == 0 or n_cols == 0:
        raise ValueError("image_grid needs at least one row with one panel")
    title_lines = max((str(c).count("\n") + 1 for c in col_titles or []), default=0)
    # two lines fit in 0.3 in; each further line of a wrapped column title gets its room
    title_h = 0.3 + 0.15 * max(title_lines - 2, 0) if col_titles else 0.0
    title_w = 0.35 if row_titles else 0.0
    fig = figure((n_cols * panel_inches + title_w, n_rows * panel_inches + title_h), dpi)
    axes = np.array(fig.subplots(n_rows, n_cols, squeeze=False))
    for i in range(n_rows):
        for j in range(n_cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            panel = rows[i][j] if j < len(rows[i]) else None
            if panel is not None:
                arr = _to_numpy(panel)
                if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 1):
                    grey = arr.reshape(arr.shape[:2])
                    hi = 255 if grey.dtype == np.uint8 else 1.0
                    ax.imshow(grey, cmap="gray", vmin=0, vmax=hi, interpolation="nearest")
                else:
                    ax.imshow(_as_rgb(arr), interpolation="nearest")
            if col_titles and i == 0 and j < len(col_titles):
                ax.set_title(str(col_titles[j]), fontsize=9)
            if row_titles and j == 0 and i < len(row_titles):
                ax.set_ylabel(str(row_titles[i]), fontsize=9)
    return save_figure(fig, out_path)
