"""Reduce runs to a table: per (category, cell) mean / sample std / n, the mean over categories, the
pseudo-minus-GT gaps and the pseudo-mask quality. A missing run is a gap (None), never a zero.

A cell is (model, mask, variant) (`collect`): only runs of the same settings but the seed are averaged.
A gap compares a model's gt cell with each of its pseudo cells whose variants agree (`compatible`)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mvtec_seg.metrics.reference import REFERENCE_FLOOR, unlearned
from mvtec_seg.report.collect import COST_KEYS, REPORT_METRICS, Cell, Run
from mvtec_seg.summary import number

CELL_ORDER: tuple[tuple[str, str], ...] = (
    ("transfusion", "none"),
    ("unet", "gt"),
    ("unet", "pseudo"),
    ("deeplab", "gt"),
    ("deeplab", "pseudo"),
)
QUALITY_KEYS: tuple[str, ...] = ("IoU", "precision", "recall", "normal_nonempty")
GapPair = tuple[Cell, Cell]  # (gt cell, pseudo cell) of one model


def _order_cells(cells: Iterable[Cell]) -> list[Cell]:
    """Reference first, then the segmenters in the documented order, then anything else sorted; the
    variants of one (model, mask) together, sorted."""
    rank = {pair: i for i, pair in enumerate(CELL_ORDER)}
    return sorted(set(cells), key=lambda c: (rank.get(c[:2], len(rank)), c[:2], c[2]))


def compatible(a: Cell, b: Cell) -> bool:
    """Two cells whose variants agree on every setting both name (a gt run and a pseudo run of the same
    learning rate, say): their difference is the mask source's."""
    va, vb = dict(a[2]), dict(b[2])
    return all(va[k] == vb[k] for k in va.keys() & vb.keys())


def gap_name(pair: GapPair) -> str:
    """`unet`, or `unet[model.params.optimizer.lr=0.001]` when variants set the pair apart."""
    items = dict(pair[0][2]) | dict(pair[1][2])
    label = ", ".join(f"{k}={v}" for k, v in sorted(items.items()))
    return pair[0][0] + (f"[{label}]" if label else "")


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
        info = run.summary.pseudo
        if run.mask != "pseudo" or info is None:
            continue
        key = str(info.get("dir") or json.dumps([info.get("threshold"), info.get("quality")], sort_keys=True))
        seen.setdefault(key, info)
    return list(seen.values())


def _quality(info: dict[str, Any], key: str) -> float:
    train = (info.get("quality") or {}).get("train") or {}
    return number(train.get(key))


@dataclass
class Table:
    """Aggregated numbers; ``None`` means no run (a gap)."""

    categories: list[str]
    cells: list[Cell]
    gap_pairs: list[GapPair]
    metric: dict[tuple[str, Cell, str], Stat]  # (category, cell, metric)
    cost: dict[tuple[str, Cell, str], Stat]
    params: dict[Cell, int]
    quality: dict[tuple[str, str], Stat]  # (category, "threshold" | IoU | precision | recall)
    strategy: dict[str, str]
    runs: dict[tuple[str, Cell], list[Run]]
    decision: dict[tuple[str, Cell], Stat] = field(default_factory=dict)  # the runs' decision thresholds
    decision_rule: dict[Cell, str] = field(default_factory=dict)  # how they were chosen, on which targets

    def get(self, category: str, cell: Cell, metric: str) -> Stat | None:
        return self.metric.get((category, cell, metric))

    @property
    def gap_models(self) -> list[str]:
        """The names of the gap pairs (`gap_name`): the model alone when no variant sets them apart."""
        return [gap_name(p) for p in self.gap_pairs]

    def gap(self, category: str, pair: GapPair | str, metric: str) -> float | None:
        """Pseudo minus GT of the per-category means; None unless both are defined. `pair` is a gap pair
        or its name (a model's name when no variant sets its cells apart)."""
        if isinstance(pair, str):
            found = [p for p in self.gap_pairs if gap_name(p) == pair]
            if not found:
                return None
            pair = found[0]
        gt, ps = self.get(category, pair[0], metric), self.get(category, pair[1], metric)
        if gt is None or ps is None or not gt.defined or not ps.defined:
            return None
        return ps.mean - gt.mean

    def unlearned_reference(self, category: str, pair: GapPair) -> str:
        """Why the pair's GT cell is no reference in `category` (`metrics.reference`); empty when it is."""
        stats = {m: self.get(category, pair[0], m) for m in REFERENCE_FLOOR}
        return unlearned({m: s.mean if s is not None and s.defined else None for m, s in stats.items()})

    def mean_metric(self, cell: Cell, metric: str) -> Stat | None:
        return _mean_of(self.get(c, cell, metric) for c in self.categories)

    def mean_cost(self, cell: Cell, key: str) -> Stat | None:
        return _mean_of(self.cost.get((c, cell, key)) for c in self.categories)

    def mean_gap(self, pair: GapPair | str, metric: str) -> Stat | None:
        """The mean over the categories where GT is a reference (`unlearned_reference`)."""
        if isinstance(pair, str):
            pair = next((p for p in self.gap_pairs if gap_name(p) == pair), None)  # type: ignore[assignment]
            if pair is None:
                return None
        gaps = [
            g
            for c in self.categories
            if not self.unlearned_reference(c, pair) and (g := self.gap(c, pair, metric)) is not None
        ]
        return _stat(gaps) if gaps else None

    def mean_quality(self, key: str) -> Stat | None:
        return _mean_of(self.quality.get((c, key)) for c in self.categories)


def aggregate(runs: Sequence[Run]) -> Table:
    """Group runs by (category, cell) and reduce each group to mean / std / n."""
    groups: dict[tuple[str, Cell], list[Run]] = {}
    for run in sorted(
        runs, key=lambda r: (r.category, r.model, r.mask, r.variant, r.seed if r.seed is not None else -1)
    ):
        groups.setdefault((run.category, run.cell), []).append(run)
    categories = sorted({r.category for r in runs})
    cells = _order_cells(r.cell for r in runs)
    metric: dict[tuple[str, Cell, str], Stat] = {}
    cost: dict[tuple[str, Cell, str], Stat] = {}
    params: dict[Cell, int] = {}
    for (cat, cell), group in groups.items():
        for m in REPORT_METRICS:
            metric[(cat, cell, m)] = _stat([r.metrics[m] for r in group])
        for k in COST_KEYS:
            cost[(cat, cell, k)] = _stat([r.cost[k] for r in group])
        for r in group:
            if r.summary.params is not None:
                params.setdefault(cell, r.summary.params)
    quality: dict[tuple[str, str], Stat] = {}
    strategy: dict[str, str] = {}
    for cat in categories:
        records = _pseudo_records([r for (c, _), g in groups.items() if c == cat for r in g])
        if not records:
            continue
        quality[(cat, "threshold")] = _stat([number(info.get("threshold")) for info in records])
        for key in QUALITY_KEYS:
            quality[(cat, key)] = _stat([_quality(info, key) for info in records])
        strategy[cat] = "/".join(
            sorted({str(info.get("label") or info.get("strategy", "?")) for info in records})
        )
    gap_pairs = [
        (g, p)
        for g in cells
        for p in cells
        if g[1] == "gt" and p[1] == "pseudo" and p[0] == g[0] and compatible(g, p)
    ]
    decision = {
        (cat, cell): _stat([number((r.summary.decision_threshold or {}).get("value")) for r in group])
        for (cat, cell), group in groups.items()
    }
    decision_rule = {
        cell: "; ".join(
            sorted(
                {
                    f"{d.get('rule')}, against {d.get('targets')}"
                    for (_, c), group in groups.items()
                    if c == cell
                    for r in group
                    if (d := r.summary.decision_threshold or {}).get("rule")
                }
            )
        )
        for cell in cells
    }
    return Table(
        categories, cells, gap_pairs, metric, cost, params, quality, strategy, groups, decision, decision_rule
    )
