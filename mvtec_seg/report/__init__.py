"""Gather the ``summary.json`` of every finished run below a folder into one comparison report.

``python -m mvtec_seg.report folder=<runs> [out=<folder>]`` writes ``report.md`` (readable tables and embedded
plots), ``report.html`` (the same on one self-contained page, images embedded), ``report.csv`` (one wide
table, full precision) and ``report_plots/*.png``.

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

Modules: `collect` (summaries, read through `mvtec_seg.summary.RunSummary`), `aggregate` (statistics),
`tables` (CSV and Markdown; the CSV columns are documented there), `plots` (bars, image grids), `html`
(the page from the Markdown), `build`.
"""

from mvtec_seg.report.aggregate import CELL_ORDER, Stat, Table, aggregate
from mvtec_seg.report.build import PLOTS_DIR, build_report, main
from mvtec_seg.report.collect import COST_KEYS, Collected, Run, collect_runs

__all__ = [
    "CELL_ORDER",
    "COST_KEYS",
    "PLOTS_DIR",
    "Collected",
    "Run",
    "Stat",
    "Table",
    "aggregate",
    "build_report",
    "collect_runs",
    "main",
]
