"""The quality suite: categories x rows (model, mask source and rules) x seeds, each case one `train()` run.

A row names its model and its mask configuration; a pseudo-mask row names an entry of the suite's `masks:`
section, which writes out every `mask.*` setting (an entry may `extends:` another). The entry replaces the
composed `mask` node whole, and a row whose entry misses a setting the package defines (or names one it does
not) is refused: a new default can never slip into an old row. A finished case is found again by the digest
of its resolved config (paths and progress display aside): its run folder is `<runs>/<digest>`, so a changed
setting anywhere, a default included, makes a new run instead of returning a stale one.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from benchmarks.quality_section import section, spearman, unlearned_reference
from benchmarks.runner import category_seeds, context, number, selected
from mvtec_seg.config import compose_config
from mvtec_seg.errors import UserError
from mvtec_seg.io_utils import content_key
from mvtec_seg.metrics import METRIC_NAMES
from mvtec_seg.metrics.reference import REFERENCE_FLOOR
from mvtec_seg.summary import IOU_AT_THRESHOLD, SUMMARY_FILE

log = logging.getLogger(__name__)
KEY = ("category", "row", "seed", "image_size")
NOT_IN_DIGEST = (
    "paths",
    "logger",
    "compare",
    "trainer.enable_progress_bar",
    "teacher.trainer.enable_progress_bar",
)
NEUTRAL_IN_DIGEST: dict[str, object] = {"mask.gt_images": None, "mask.evidence": None}
"""Settings added with a value that changes nothing: at that value they are left out of the digest, so the
cases measured before the setting existed are found again."""
QUALITY_KEYS = ("IoU", "precision", "recall", "normal_nonempty")


# --------------------------------------------------------------------------------------------- the grid
def mask_entry(cfg: DictConfig, name: str) -> dict:
    """The full mask settings of a `masks:` entry, its `extends:` chain merged under it."""
    entries = cfg.get("masks") or {}
    if name not in entries:
        raise UserError(f"quality suite: mask {name!r} is not in its masks: section ({', '.join(entries)})")
    entry = OmegaConf.to_container(entries[name], resolve=True)
    parent = entry.pop("extends", None)
    if parent is None:
        return entry
    merged = OmegaConf.merge(OmegaConf.create(mask_entry(cfg, parent)), OmegaConf.create(entry))
    return OmegaConf.to_container(merged)


def _leaves(node: Any, prefix: str = "") -> set[str]:
    if not isinstance(node, dict) or not node:
        return {prefix.rstrip(".")}
    return set().union(*(_leaves(v, f"{prefix}{k}.") for k, v in node.items()))


def pin_mask(run_cfg: DictConfig, settings: dict, row: str) -> None:
    """Replace the composed `mask` node by `settings`, after checking that they name every setting the
    package defines for that mask source, and no other."""
    defined = _leaves(OmegaConf.to_container(run_cfg.mask, resolve=True))
    given = _leaves(settings)
    missing, unknown = sorted(defined - given), sorted(given - defined)
    if missing or unknown:
        raise UserError(
            f"quality suite row {row!r} does not pin its mask: missing {missing}, unknown {unknown} — write out "
            f"every mask.* setting in its masks: entry"
        )
    run_cfg.mask = OmegaConf.create(settings)


def case_overrides(cfg: DictConfig, category: str, row: str, seed: int) -> list[str]:
    """The `python -m mvtec_seg` overrides of one case (the mask entry is applied after composing)."""
    spec = cfg.rows[row]
    mask = spec.get("mask", "none")
    tiny = list(cfg.get("tiny_overrides") or []) if cfg.get("tiny") else []
    # TransFusion's epochs are the teacher's, whatever the base sets for the students
    student = ["model.max_epochs=${teacher.trainer.max_epochs}"] if spec.model == "transfusion" else []
    return [
        *cfg.base,
        *cfg.categories[category],
        f"model={spec.model}",
        *student,
        "mask=gt" if mask in ("gt", "none") else f"mask={mask_entry(cfg, mask).get('name', 'pseudo')}",
        *(spec.get("overrides") or []),
        f"seed={seed}",
        *tiny,
        "trainer.enable_progress_bar=false",
    ]


def resolved(cfg: DictConfig, category: str, row: str, seed: int, cache: Path) -> DictConfig:
    """The composed run config of one case, its mask pinned, `paths.run_dir` still unset."""
    spec = cfg.rows[row]
    overrides = [*case_overrides(cfg, category, row, seed), f"paths.cache_dir={cache}"]
    run_cfg = compose_config(overrides, run_dir="unset")
    mask = spec.get("mask", "none")
    if mask not in ("gt", "none"):
        pin_mask(run_cfg, mask_entry(cfg, mask), row)
    return run_cfg


def digest(run_cfg: DictConfig) -> str:
    """The case's identity: its resolved config without where outputs go and how progress is shown."""
    plain = OmegaConf.to_container(run_cfg, resolve=True)
    for dotted in (*NOT_IN_DIGEST, *NEUTRAL_IN_DIGEST):
        *parents, leaf = dotted.split(".")
        node = plain
        for p in parents:
            node = node.get(p, {})
        if dotted in NOT_IN_DIGEST or (leaf in node and node[leaf] == NEUTRAL_IN_DIGEST[dotted]):
            node.pop(leaf, None)
    return content_key(plain)


# ------------------------------------------------------------------------------------------------ a case
def _mean(values: list[float]) -> float:
    finite = [v for v in values if isinstance(v, float | int) and math.isfinite(v)]
    return float(statistics.fmean(finite)) if finite else math.nan


def summary_row(summary: dict) -> dict[str, Any]:
    """The CSV columns of one finished run: the five test metrics and the IoU at the run's decision threshold
    (with the threshold), the pseudo masks' train-part quality,
    the GT-free synthetic-validation score and the selection, the costs."""
    metrics = summary.get("metrics") or {}
    row: dict[str, Any] = {m: number(metrics.get(f"test/{m}")) for m in (*METRIC_NAMES, IOU_AT_THRESHOLD)}
    row["decision_threshold"] = number((summary.get("decision_threshold") or {}).get("value"))
    pseudo = summary.get("pseudo") or {}
    train_q = ((pseudo.get("quality") or {}).get("train")) or {}
    row |= {f"mask_{k}": number(train_q.get(k)) for k in QUALITY_KEYS}
    row["mask_label"] = pseudo.get("label", "")
    evidence = pseudo.get("evidence") or {}
    row["teacher_flagged"] = number(evidence.get("flagged", math.nan) / max(evidence.get("unlabelled", 1), 1))
    row["teacher_evidence_p"] = number(evidence.get("p_value"))
    synthetic = pseudo.get("synthetic_val") or {}
    row["synthetic_val_AUPRO"] = number(synthetic.get("pixel_AUPRO"))
    row["synthetic_val_AP"] = number(synthetic.get("pixel_AP"))
    selection = pseudo.get("selection") or {}
    row["selected"] = selection.get("chosen", "")
    row["rounds_kept"] = pseudo.get("round", "")
    row["protocol"] = summary.get("protocol") or ""  # known normals | image labels (older rows: none)
    time = summary.get("time") or {}
    row["train_s"] = number(time.get("train_s"))
    row["test_s"] = number(time.get("test_s"))
    return row


def _candidate_protocol(summary: dict, candidate: dict) -> str:
    """What a candidate's chain read. Runs record it per candidate; for a run recorded before that, a
    candidate asking for image labels read them, one that did not read what the case read when the case
    read known normals only, and is unknown ("") otherwise (the data's split may have labelled it)."""
    if "protocol" in candidate:
        return candidate["protocol"]
    if (candidate.get("settings") or {}).get("image_labels"):
        return "image labels"
    return "known normals" if summary.get("protocol") == "known normals" else ""


def candidate_rows(case: dict, summary: dict) -> list[dict]:
    """A `mask.select=auto` case's candidates as rows of their own (`candidate_of` the case): their test
    metrics, recorded by the run after its choice, their synthetic-val scores (the criterion) and what
    their chain read."""
    selection = (summary.get("pseudo") or {}).get("selection") or {}
    rows = []
    for c in selection.get("candidates") or []:
        synthetic = c.get("synthetic_val") or {}
        quality_train = (c.get("quality") or {}).get("train") or {}
        test = c.get("test_metrics") or {}
        rows.append(
            case
            | {
                "row": f"{case['row']}/{c['index']}",
                "label": f"candidate: {c['label']}",
                "candidate_of": case["row"],
                "chosen": c["index"] == selection.get("chosen"),
                "mask_settings": json.dumps(c.get("settings"), sort_keys=True),
                "status": "ok",
                "error": "",
                **{m: number(test.get(f"test/{m}")) for m in METRIC_NAMES},
                **{f"mask_{k}": number(quality_train.get(k)) for k in QUALITY_KEYS},
                "synthetic_val_AUPRO": number(synthetic.get("pixel_AUPRO")),
                "synthetic_val_AP": number(synthetic.get("pixel_AP")),
                "train_s": number(c.get("train_s")),
                "protocol": _candidate_protocol(summary, c),
            }
        )
    return rows


def run_case(cfg: DictConfig, category: str, row: str, seed: int, runs: Path, cache: Path) -> list[dict]:
    """One case (and, for `mask.select=auto`, a row per candidate): reused when its run folder holds a
    finished run of the same digest, else trained."""
    run_cfg = resolved(cfg, category, row, seed, cache)
    key = digest(run_cfg)
    run_dir = runs / key
    out: dict[str, Any] = {
        "suite": "quality",
        "category": category,
        "row": row,
        "label": cfg.rows[row].get("label", row),
        "seed": seed,
        "image_size": int(run_cfg.data.image_size),
        "model": run_cfg.model.name,
        "mask": cfg.rows[row].get("mask", "none"),
        "config_digest": key,
        "run_dir": str(run_dir),
        "mask_settings": ""
        if run_cfg.model.source == "teacher"
        else json.dumps(OmegaConf.to_container(run_cfg.mask, resolve=True), sort_keys=True),
        "deciding": category in (cfg.get("deciding") or []),
    }
    summary, error = finished_or_trained(run_cfg, run_dir, f"quality: {category} / {row} / seed {seed}")
    if summary is None:
        return [out | {"status": "failed", "error": error}]
    case = out | {"status": summary.get("status", "ok"), "error": ""} | summary_row(summary)
    return [case, *candidate_rows(out, summary)]


def finished_or_trained(run_cfg: DictConfig, run_dir: Path, what: str) -> tuple[dict | None, str]:
    """(summary, "") of the finished run in `run_dir`, else of training it there now (continuing the run an
    interrupted grid left there: same digest, so the same settings); (None, the one-line reason) when it
    failed: a bug in one case must not cost the rest of a grid of hours."""
    from mvtec_seg.train import train

    summary_path = run_dir / SUMMARY_FILE
    if summary_path.is_file():
        status = json.loads(summary_path.read_text()).get("status")
        if status == "ok":
            log.warning("%s reused from %s", what, run_dir)
            return json.loads(summary_path.read_text()), ""
        log.warning("%s: continuing the %s run in %s", what, status, run_dir)
        run_cfg.resume = True
    run_cfg.paths.run_dir = str(run_dir)
    try:
        return train(run_cfg), ""
    except UserError as err:
        return None, str(err)
    except Exception as err:
        log.exception("%s crashed", what)
        return None, f"{type(err).__name__}: {err}"


def run(cfg: DictConfig, runs: Path, cache: Path, emit: Callable[[dict], None]) -> None:
    """Every selected case, in the order category, seed, row (a category's teacher is trained once)."""
    for category, seed, command in category_seeds(cfg):
        for row in selected(cfg, "rows", cfg.rows):
            for result in run_case(cfg, category, row, seed, runs, cache):
                emit(result | {"command": command} | context())


__all__ = ["KEY", "REFERENCE_FLOOR", "run", "section", "spearman", "unlearned_reference"]
