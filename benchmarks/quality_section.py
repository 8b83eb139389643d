"""The quality suite's section of RESULTS.md, from its CSV rows.

Rows are grouped by image size (each size is its own grid: a 64 px row never averages with a 128 px one).
Every metric is the mean over the seeds that ran with, where there are several, its spread over them
(`max - min`): a difference between two rows counts only where it exceeds the larger spread of the two
(`_counts`), which is how a default is chosen and how "what the teacher adds" is read.
"""

from __future__ import annotations

import math
import statistics

from benchmarks.runner import number
from mvtec_seg.metrics.reference import REFERENCE_FLOOR, unlearned

COLUMNS = ("image_AUROC", "pixel_AUROC", "pixel_AP", "pixel_AUPRO", "IoU", "IoU_at_threshold")
HEADS = {"IoU": "IoU@0.5", "IoU_at_threshold": "IoU@thr"}
"""Column titles where they differ from the CSV column (IoU@thr: at the run's decision threshold, chosen on
the val part)."""
EARLIER_PROTOCOL = (
    "Rows without a `protocol` value in the CSV were measured under the earlier protocol (image labels: the "
    "pseudo-mask chain treated every normal image as known, and the teacher trained on every normal image of "
    "the train part); rerun them for the current one (known normals: `train/good` only)."
)
SIZE_UNKNOWN = "64"
"""Rows written before the CSV had an `image_size` column were measured at the suite's 64 px of that time."""


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(statistics.fmean(finite)) if finite else math.nan


def _spread(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) - min(finite) if len(finite) > 1 else math.nan


def _f(v: float, digits: int = 3) -> str:
    return "–" if not math.isfinite(v) else f"{v:.{digits}f}"


def _signed(v: float) -> str:
    return "–" if not math.isfinite(v) else f"{v:+.3f}"


def _cell(values: list[float]) -> str:
    """`mean` or `mean ±spread` (max - min over the seeds)."""
    spread = _spread(values)
    return _f(_mean(values)) + ("" if not math.isfinite(spread) else f" ±{spread:.3f}")


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for fewer than 3 pairs or a constant."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return math.nan

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r

    rx, ry = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    if len(set(rx)) < 2 or len(set(ry)) < 2:
        return math.nan
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy)


def unlearned_reference(ok: list[dict], cats: list[str]) -> dict[str, str]:
    """Categories whose U-Net GT row misses `REFERENCE_FLOOR`, with the reason (e.g. `image_AUROC 0.683`)."""
    out: dict[str, str] = {}
    for cat in cats:
        gt = [
            r
            for r in ok
            if r["category"] == cat and r.get("mask") == "gt" and r.get("model") != "transfusion"
        ]
        if gt and (low := unlearned({m: _mean([number(r[m]) for r in gt]) for m in REFERENCE_FLOOR})):
            out[cat] = low
    return out


def section(rows: list[dict[str, str]]) -> str:
    """RESULTS.md's section for the quality suite: one part per image size, the largest first."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return "No quality results yet: `python -m benchmarks quality`."
    sizes = sorted({r.get("image_size") or SIZE_UNKNOWN for r in ok}, key=int, reverse=True)
    lines = [
        "Each cell: the mean over the seeds that ran, `±` their spread (max - min) where there are several. "
        "A difference between two rows counts only where it is larger than the larger spread of the two.",
        "",
    ]
    if any(not r.get("protocol") for r in ok):
        lines += [EARLIER_PROTOCOL, ""]
    for size in sizes:
        part = [r for r in ok if (r.get("image_size") or SIZE_UNKNOWN) == size]
        lines += [f"### {size} px", "", *_size_part(part)]
    commands = sorted({r["command"] for r in ok})
    lines += ["", "Commands: " + "; ".join(f"`{c}`" for c in commands)]
    return "\n".join(lines)


def _size_part(ok: list[dict]) -> list[str]:
    lines: list[str] = []
    cats = list(dict.fromkeys(r["category"] for r in ok))
    names = list(dict.fromkeys(r["row"] for r in ok))
    label = {r["row"]: r["label"] for r in ok}
    by: dict[tuple[str, str], list[dict]] = {}
    for r in ok:
        by.setdefault((r["category"], r["row"]), []).append(r)
    header = (
        "| row | seeds | "
        + " | ".join(HEADS.get(c, c) for c in COLUMNS)
        + " | mask IoU | mask precision | synthetic-val AUPRO |"
    )
    not_learned = unlearned_reference(ok, cats)
    for cat in cats:
        deciding = any(r["deciding"] == "True" for r in ok if r["category"] == cat)
        mark = f" (reference not learned: U-Net GT {not_learned[cat]})" if cat in not_learned else ""
        lines += [f"#### {cat}" + ("" if deciding else " (reported, not deciding)") + mark, "", header]
        lines.append("|" + "---|" * (len(COLUMNS) + 5))
        for name in names:
            cases = by.get((cat, name))
            if not cases:
                continue
            cells = [_cell([number(c.get(m)) for c in cases]) for m in COLUMNS]
            extra = [_f(_mean([number(c.get(k)) for c in cases])) for k in ("mask_IoU", "mask_precision")]
            synth = _f(_mean([number(c["synthetic_val_AUPRO"]) for c in cases]))
            earlier = " (earlier protocol)" if not any(r.get("protocol") for r in cases) else ""
            seeds = ", ".join(sorted({str(c["seed"]) for c in cases}))
            lines.append(
                f"| {label[name]}{earlier} | {seeds} | " + " | ".join(cells + extra + [synth]) + " |"
            )
        lines.append("")
    deciding_cats = [c for c in cats if any(r["deciding"] == "True" for r in ok if r["category"] == c)]
    learned = [c for c in deciding_cats if c not in not_learned]
    if deciding_cats:
        left_out = [c for c in deciding_cats if c in not_learned]
        if left_out:
            floors = " and ".join(f"{m} >= {v}" for m, v in REFERENCE_FLOOR.items())
            lines += [
                f"Left out of the deciding mean and of every PSEUDO / GT ratio: {', '.join(left_out)} (U-Net GT "
                f"misses {floors}: the reference is not learned there).",
                "",
            ]
        if learned:
            lines += _deciding_mean(learned, names, label, by)
        lines += _against_teacher_and_gt(ok, deciding_cats, names, label, by, set(not_learned))
        lines += _what_the_teacher_adds(ok, deciding_cats, names, label, by)
    lines += _rank_correlation(ok)
    lines += ["#### Resolved mask settings of each row", ""]
    for name in names:
        settings = next(r["mask_settings"] for r in ok if r["row"] == name)
        lines.append(f"- {label[name]}: `{settings or 'no mask source'}`")
    return [*lines, ""]


def _values(by: dict, cat: str, name: str, metric: str) -> list[float]:
    return [number(r.get(metric)) for r in by.get((cat, name), [])]


def _seed_mean(by: dict, cat: str, name: str, metric: str) -> float:
    """One row's metric in one category, the mean over its seeds."""
    return _mean(_values(by, cat, name, metric))


def _counts(by: dict, cat: str, a: str, b: str, metric: str) -> tuple[float, float, bool]:
    """Row `a` minus row `b` (seed means), the larger of their seed spreads, and whether the difference
    exceeds it (with one seed each there is no spread, and nothing counts)."""
    diff = _seed_mean(by, cat, a, metric) - _seed_mean(by, cat, b, metric)
    spread = max(_spread(_values(by, cat, a, metric)), _spread(_values(by, cat, b, metric)))
    return diff, spread, math.isfinite(spread) and abs(diff) > spread


def _deciding_mean(cats: list[str], names: list[str], label: dict, by: dict) -> list[str]:
    lines = [
        f"#### Mean over {', '.join(cats)} (the categories that decide defaults)",
        "",
        "| row | " + " | ".join(HEADS.get(c, c) for c in COLUMNS) + " |",
        "|" + "---|" * (len(COLUMNS) + 1),
    ]
    for name in names:
        if not all((c, name) in by for c in cats):
            continue
        cells = [_f(_mean([_seed_mean(by, c, name, m) for c in cats])) for m in COLUMNS]
        lines.append(f"| {label[name]} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _kinds(ok: list[dict]) -> dict[str, str]:
    """Each row's kind: `teacher`, or its mask entry (`gt`, `synthetic_only`, ...)."""
    return {r["row"]: ("teacher" if r["model"] == "transfusion" else r["mask"]) for r in ok}


def _pseudo_rows(ok: list[dict], names: list[str]) -> list[str]:
    """The rows whose targets come from the teacher's maps (their mask settings name `pseudo`)."""
    return [n for n in names if any(r["row"] == n and '"name": "pseudo"' in r["mask_settings"] for r in ok)]


def _against_teacher_and_gt(
    ok: list[dict],
    cats: list[str],
    names: list[str],
    label: dict,
    by: dict,
    not_learned: set[str] = frozenset(),  # type: ignore[assignment]
) -> list[str]:
    """Each PSEUDO row against its teacher (AUPRO and pixel AP, PSEUDO - TransFusion) and against U-Net GT
    (AUPRO as a fraction of GT's) per deciding category: the question the suite answers, row by row. In a
    `not_learned` category the ratio is left out (`–`): its reference failed."""
    kind = _kinds(ok)
    teacher = next((n for n in names if kind[n] == "teacher"), None)
    gt = next((n for n in names if kind[n] == "gt"), None)
    if teacher is None or gt is None:
        return []
    head = " | ".join(f"{c}: AUPRO - TF | {c}: AP - TF | {c}: AUPRO / GT" for c in cats)
    lines = [
        "#### PSEUDO against its teacher and against GT (deciding categories, mean over seeds)",
        "",
        f"| row | {head} |",
        "|" + "---|" * (3 * len(cats) + 1),
    ]
    for name in names:
        if kind[name] in ("teacher", "gt") or not any((c, name) in by for c in cats):
            continue
        cells = []
        for c in cats:
            aupro, gt_aupro = _seed_mean(by, c, name, "pixel_AUPRO"), _seed_mean(by, c, gt, "pixel_AUPRO")
            cells += [
                _signed(aupro - _seed_mean(by, c, teacher, "pixel_AUPRO")),
                _signed(_seed_mean(by, c, name, "pixel_AP") - _seed_mean(by, c, teacher, "pixel_AP")),
                _f(aupro / gt_aupro if gt_aupro > 0 and c not in not_learned else math.nan, 2),
            ]
        lines.append(f"| {label[name]} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _what_the_teacher_adds(
    ok: list[dict], cats: list[str], names: list[str], label: dict, by: dict
) -> list[str]:
    """Each PSEUDO row minus `synthetic only` (the same synthetic defects, no teacher), per deciding category:
    AUPRO and pixel AP, `*` where the difference is larger than the seed spread of either row."""
    control = next((n for n in names if _kinds(ok)[n] == "synthetic_only"), None)
    pseudo = [n for n in _pseudo_rows(ok, names) if any((c, n) in by and (c, control) in by for c in cats)]
    if control is None or not pseudo:
        return []
    head = " | ".join(f"{c}: AUPRO | {c}: AP" for c in cats)
    lines = [
        "#### What the teacher adds: PSEUDO - synthetic only (deciding categories, mean over seeds)",
        "",
        "`*`: larger than the seed spread of either row (it counts); `(±s)`: that spread.",
        "",
        f"| row | {head} |",
        "|" + "---|" * (2 * len(cats) + 1),
    ]
    for name in pseudo:
        cells = []
        for c in cats:
            for metric in ("pixel_AUPRO", "pixel_AP"):
                diff, spread, counts = _counts(by, c, name, control, metric)
                shown = "" if not math.isfinite(spread) else f" (±{spread:.3f})"
                cells.append(f"{_signed(diff)}{'*' if counts else ''}{shown if math.isfinite(diff) else ''}")
        lines.append(f"| {label[name]} | " + " | ".join(cells) + " |")
    lines.append("")
    candidates = {r["row"] for r in ok if r.get("candidate_of")}  # in the table, not in the sentences
    for c in cats:
        for name in pseudo:
            if (c, name) in by and (c, control) in by and name not in candidates:
                lines.append(f"- {c}, {label[name]}: {_teacher_verdict(by, c, name, control)}")
    return [*lines, ""]


def _teacher_verdict(by: dict, cat: str, pseudo: str, control: str) -> str:
    """One plain sentence: does the teacher add to `pseudo` over `control` on both AUPRO and pixel AP?"""
    (d_pro, _, c_pro), (d_ap, _, c_ap) = (
        _counts(by, cat, pseudo, control, m) for m in ("pixel_AUPRO", "pixel_AP")
    )
    seeds = min(len(_values(by, cat, n, "pixel_AUPRO")) for n in (pseudo, control))
    figures = f"AUPRO {_signed(d_pro)}, AP {_signed(d_ap)}, {seeds} seed{'s' if seeds > 1 else ''}"
    if d_pro <= 0 and d_ap <= 0:
        return f"the teacher adds nothing: PSEUDO is at or below synthetic only ({figures})"
    if d_pro > 0 and d_ap > 0 and c_pro and c_ap:
        return f"the teacher adds to both, beyond the seed spread ({figures})"
    if c_pro or c_ap:
        return f"the teacher's gain is not on both metrics beyond the seed spread ({figures})"
    return f"no difference beyond the seed spread, or one seed only ({figures})"


def _rank_correlation(ok: list[dict]) -> list[str]:
    """Spearman between each pseudo row's synthetic-val AUPRO and its test AUPRO, per category and seed, and
    what choosing by it cost: the chosen candidate's test AUPRO against the best candidate's (a best known
    only from the test part, so no rule could choose it)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in ok:
        if (
            math.isfinite(number(r["synthetic_val_AUPRO"]))
            and not r.get("selected")
            and r.get("candidate_of")
        ):
            groups.setdefault((r["category"], r["seed"]), []).append(r)
    values, costs = [], []
    lines = ["#### Does the GT-free criterion rank candidates like the test AUPRO does?", ""]
    for (cat, seed), rs in sorted(groups.items()):
        aupro = [number(r["pixel_AUPRO"]) for r in rs]
        rho = spearman([number(r["synthetic_val_AUPRO"]) for r in rs], aupro)
        values.append(rho)
        line = f"- {cat}, seed {seed}: Spearman {_f(rho)} over {len(rs)} candidate rows"
        chosen = [a for r, a in zip(rs, aupro, strict=True) if r.get("chosen") == "True"]
        if chosen:
            costs.append(max(aupro) - chosen[0])
            line += f"; the chosen one's test AUPRO is {_f(costs[-1])} below the best candidate's"
        lines.append(line)
    if not values:
        return []
    mean = f"- mean: Spearman {_f(_mean(values))}"
    if costs:
        mean += f"; choosing by the criterion cost {_f(_mean(costs))} AUPRO against the best candidate"
    lines += [mean, "", "The best candidate is known only from the test part: no rule could choose it.", ""]
    return lines
