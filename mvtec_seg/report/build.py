"""`build_report(folder)` and the `python -m mvtec_seg.report` command line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mvtec_seg.cli import command_args, run_command
from mvtec_seg.errors import UserError
from mvtec_seg.io_utils import atomic_write_text
from mvtec_seg.report.aggregate import aggregate
from mvtec_seg.report.collect import collect_runs
from mvtec_seg.report.html import markdown_to_html
from mvtec_seg.report.plots import BAR_METRICS, bar_plot, category_grid, safe_name
from mvtec_seg.report.tables import csv_columns, csv_rows, csv_text, markdown
from mvtec_seg.settings import folder_problem

log = logging.getLogger(__name__)
PLOTS_DIR = "report_plots"


def build_report(folder: Path | str, out: Path | str | None = None) -> dict[str, Any]:
    """Write report.md, report.html (the same page, self-contained), report.csv and report_plots/ for every
    finished run below ``folder``.

    Returns the paths written, the CSV columns and rows (None = gap), categories and cells, so a caller or
    a test can check numbers without parsing files.
    """
    folder = Path(folder)
    coll = collect_runs(folder)
    out_dir = Path(out) if out is not None else folder
    problem = folder_problem(out_dir)
    if problem:
        raise UserError(f"report output {out_dir} cannot be a folder: {problem} — pass out=<a folder>")
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir = out_dir.resolve()
    t = aggregate(coll.runs)
    plots_dir = out_dir / PLOTS_DIR

    plots: dict[str, Path] = {}
    for m in BAR_METRICS:
        plots[m] = bar_plot(t, m, plots_dir / f"bars_{m}.png")
    grids: dict[str, tuple[Path | None, list[str]]] = {}
    for cat in t.categories:
        try:
            grids[cat] = category_grid(t, cat, plots_dir / f"grid_{safe_name(cat)}.png")
        except Exception as err:  # one bad prediction file must not cost the whole report
            log.warning("report: no image grid for %s: %s", cat, err)
            grids[cat] = (None, [f"image grid failed: {type(err).__name__}: {err}"])

    columns = csv_columns(t)
    rows = csv_rows(t)
    csv_path = atomic_write_text(out_dir / "report.csv", csv_text(columns, rows))
    md_text = markdown(folder, out_dir, t, coll, plots, grids)
    md_path = atomic_write_text(out_dir / "report.md", md_text)
    html_path = atomic_write_text(out_dir / "report.html", markdown_to_html(md_text, out_dir))
    return {
        "report_md": md_path,
        "report_csv": csv_path,
        "report_html": html_path,
        "plots": [*plots.values(), *[p for p, _ in grids.values() if p is not None]],
        "columns": columns,
        "rows": rows,
        "categories": t.categories,
        "cells": t.cells,
        "n_runs": len(coll.runs),
        "skipped": dict(coll.skipped_status),
        "unreadable": list(coll.unreadable),
        "failed": [
            {"run_dir": str(r.run_dir), "status": r.summary.status, "error": r.summary.error}
            for r in coll.failed
        ],
    }


def _main(cfg: DictConfig) -> int:
    args = command_args(cfg, build_report, required=("folder",))
    out = Path(args["out"]).expanduser() if args["out"] else None
    result = build_report(Path(args["folder"]).expanduser(), out)
    for failed in result["failed"]:
        print(f"failed run: {failed['run_dir']}: {failed['error'] or failed['status']}", file=sys.stderr)
    print(
        f"report: {result['report_md']}, {result['report_html']} and {result['report_csv']} "
        f"({result['n_runs']} runs, {len(result['categories'])} categories, {len(result['plots'])} plots)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI `python -m mvtec_seg.report folder=<runs> [out=<folder>]`: returns 0, or 2 with a one-line message
    on bad input (no traceback), or 128 + the signal on SIGTERM/SIGINT."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):  # `report <folder>` reads as folder=
        argv[0] = f"folder={argv[0]}"
    return run_command("mvtec_seg.report", __doc__, argv, _main, config_name="report")
