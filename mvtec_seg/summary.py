"""The run folder's schema: `summary.json` (what a run records) and the predictions file's name, defined
once for the writer and the report.

Why one dataclass: the run writes it and the report reads it back; defining the fields once means a new
field cannot be written without the reader knowing, and an old or hand-edited file reads with gaps (NaN /
None) instead of crashing the report.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mvtec_seg.io_utils import atomic_write_json

SUMMARY_FILE = "summary.json"
PREDICTIONS_FILE = "test_predictions.npz"  # index, path, anomaly_map, gt_mask, gt_label of the test part
IOU_AT_THRESHOLD = "IoU_at_threshold"
"""The test IoU at the run's decision threshold (chosen on the val part), beside `IoU` at the fixed 0.5."""
TIME_KEYS: tuple[str, ...] = ("train_s", "test_s")
THROUGHPUT_KEYS: tuple[str, ...] = ("train_images_per_s", "test_images_per_s")


def _clean(value: Any) -> Any:
    """JSON-safe floats: NaN stays NaN in memory but is written as null."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def number(value: Any) -> float:
    """A JSON number as float; null, missing, bool or non-numeric -> NaN (undefined)."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


RESOLUTIONS: tuple[str, ...] = ("model", "native")
"""`evaluation.resolution`: test metrics at `data.image_size` (model) or at each image's own size (native,
`native_metrics`); `summary.json` records which as `resolution`."""


@dataclass
class RunSummary:
    """What one run records (field order is the order in `summary.json`).

    `metrics` holds the sectioned test metrics (`test/pixel_AUPRO`, ...); `mask` is `none` for a model that
    uses no mask source (TransFusion); `pseudo` is the pseudo-mask record (threshold, quality vs GT);
    `teacher_overlap` counts the val/test normal images an authors' teacher checkpoint was trained on.
    `status` is `running`, `ok`, `dry_run`, `failed` or `interrupted`; `error` the one-line reason of a
    failed or interrupted run. `teacher_params` counts the TransFusion teacher a run uses (mask=pseudo,
    model=transfusion), `params` the model it scores.
    `decision_threshold` is the map threshold `python -m mvtec_seg.predict` decides with (`value`, chosen
    on the val part by `rule`; see `inference.choose_threshold`).
    `identity` is what makes the run one run (`identity.py`): `config` and `data` digests and the
    `resume_mutable` settings; `checkpoint_digest` the BLAKE2b of the tested `checkpoint`, so `predict` and
    `export` load the very weights the metrics describe.
    """

    category: str
    model: str
    mask: str
    seed: int | None
    status: str = "running"
    mask_variant: str | None = None  # e.g. `GT + synthetic`, `PSEUDO + image labels` (`data.sources`)
    protocol: str | None = None  # what the mask chain may read: `known normals` or `image labels`
    task_name: str | None = None
    params: int | None = None
    teacher_params: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    resolution: str = "model"  # the size the test metrics were computed at (`RESOLUTIONS`)
    time: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(TIME_KEYS))
    throughput: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(THROUGHPUT_KEYS))
    split: dict[str, Any] = field(default_factory=dict)
    pseudo: dict[str, Any] | None = None
    decision_threshold: dict[str, Any] | None = None
    checkpoint: str | None = None
    checkpoint_digest: str | None = None
    run_dir: str | None = None
    teacher_overlap: dict[str, int] | None = None  # {val, test}: seen by an authors' checkpoint
    n_labelled: int | None = None  # `mask.gt_images`: how many defective train images kept their GT masks
    labelled_images: list[str] | None = None  # which (relative paths, in the order chosen; `data.sources`)
    error: str | None = None
    identity: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, run_dir: Path | str) -> Path:
        """Atomically write `<run_dir>/summary.json` (NaN as null)."""
        return atomic_write_json(Path(run_dir) / SUMMARY_FILE, _clean(self.to_dict()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        """Tolerant reader: missing or malformed optional fields become gaps; `category` and `model` are
        required (KeyError)."""
        time_in = data.get("time") if isinstance(data.get("time"), dict) else {}
        thr_in = data.get("throughput") if isinstance(data.get("throughput"), dict) else {}
        metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
        return cls(
            category=str(data["category"]),
            model=str(data["model"]),
            mask=str(data.get("mask") or "none"),
            seed=_int_or_none(data.get("seed")),
            status=str(data.get("status", "unknown")),
            mask_variant=data.get("mask_variant") if isinstance(data.get("mask_variant"), str) else None,
            protocol=data.get("protocol") if isinstance(data.get("protocol"), str) else None,
            task_name=data.get("task_name"),
            params=_int_or_none(data.get("params")),
            teacher_params=_int_or_none(data.get("teacher_params")),
            metrics={str(k): number(v) for k, v in metrics.items()},
            resolution=str(data.get("resolution") or "model"),
            time={k: number(time_in.get(k)) for k in TIME_KEYS},
            throughput={k: number(thr_in.get(k)) for k in THROUGHPUT_KEYS},
            split=data["split"] if isinstance(data.get("split"), dict) else {},
            pseudo=data["pseudo"] if isinstance(data.get("pseudo"), dict) else None,
            decision_threshold=(
                data["decision_threshold"] if isinstance(data.get("decision_threshold"), dict) else None
            ),
            checkpoint=data.get("checkpoint"),
            checkpoint_digest=data.get("checkpoint_digest")
            if isinstance(data.get("checkpoint_digest"), str)
            else None,
            run_dir=data.get("run_dir"),
            teacher_overlap=data["teacher_overlap"]
            if isinstance(data.get("teacher_overlap"), dict)
            else None,
            n_labelled=_int_or_none(data.get("n_labelled")),
            labelled_images=[str(p) for p in data["labelled_images"]]
            if isinstance(data.get("labelled_images"), list)
            else None,
            error=data.get("error") if isinstance(data.get("error"), str) else None,
            identity=data["identity"] if isinstance(data.get("identity"), dict) else None,
        )

    def test_metric(self, name: str) -> float:
        """`test/<name>` as float; NaN when missing or undefined."""
        return number(self.metrics.get(f"test/{name}"))

    @property
    def manifest(self) -> Path | None:
        path = self.split.get("manifest")
        return Path(path) if path else None
