"""A trained model in use: loaded from a run folder or a checkpoint, batched anomaly maps, and the decision
threshold a run records.

Shared by `train` (which chooses the threshold at the end of a run), `predict` and `export`, so "the run's
model", "its input size" and "its threshold" mean one thing everywhere.

Decision threshold rule (`THRESHOLD_RULE`): the map value that maximises pixel F1 on the **val part** against
the run's training targets (GT with `mask=gt`, the pseudo masks with `mask=pseudo`, GT for TransFusion;
`mask=synthetic_only`: the synthetic validation set made from the val part's known normals),
with the model that was tested; every distinct map value is a candidate
(`metrics.f1_optimal_threshold`). A pixel is anomalous when `map >= threshold`; an image when its score
(the max of its map) is.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from mvtec_seg.builders import trainer_device
from mvtec_seg.data.mvtec import resize_map  # noqa: F401 - `inference.resize_map`: maps back at image size
from mvtec_seg.errors import UserError
from mvtec_seg.io_utils import file_digest
from mvtec_seg.metrics import f1_optimal_threshold, iou
from mvtec_seg.models.base import AnomalyModule, loader_maps, read_checkpoint
from mvtec_seg.summary import IOU_AT_THRESHOLD, SUMMARY_FILE, RunSummary

log = logging.getLogger(__name__)

THRESHOLD_RULE = "max pixel F1 on the val part (map >= threshold)"
SEGMENTER_CLASS = "mvtec_seg.models.segmenter.Segmenter"
TRANSFUSION_CLASS = "mvtec_seg.models.transfusion.lightning_model.TransFusion"
DEVICES = ("auto", "cpu", "gpu", "cuda")


@dataclass
class Trained:
    """A loaded model and what using it needs: its input size, batch size and decision threshold."""

    module: AnomalyModule
    model: str  # unet, deeplab, transfusion, ...
    image_size: int
    threshold: float | None  # the run's decision threshold (None: not recorded)
    checkpoint: Path
    run_dir: Path | None
    batch_size: int = 8
    category: str | None = None  # the run's category.name (None: a bare checkpoint)
    layout: str | None = None  # the run's data.layout


# ------------------------------------------------------------------------------------------- inference
def pick_device(name: str = "auto") -> torch.device:
    """`auto`: the GPU when one is present, else the CPU; `gpu`/`cuda` insist on a GPU."""
    if name not in DEVICES:
        raise UserError(f"trainer={name!r} is not one of {DEVICES}")
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer={name} but no CUDA GPU is visible — use trainer=cpu or trainer=auto")
    return trainer_device({"accelerator": name})


def choose_threshold(
    module: AnomalyModule, dataset: Dataset, batch_size: int, targets: str, device: torch.device | None = None
) -> dict[str, Any]:
    """The decision threshold by `THRESHOLD_RULE` on `dataset` (the val part, `target_mask` = the run's
    targets); `value` is None when undefined (no anomalous val pixel)."""
    if device is not None:
        module.to(device)
    if len(dataset) == 0:
        return {"value": None, "rule": THRESHOLD_RULE, "f1": None, "targets": targets, "n_images": 0}
    maps, kept = loader_maps(
        module, DataLoader(dataset, batch_size=batch_size, shuffle=False), ("target_mask",)
    )
    value, f1 = f1_optimal_threshold(maps, kept["target_mask"][:, 0] > 0.5)
    return {
        "value": value if math.isfinite(value) else None,
        "rule": THRESHOLD_RULE,
        "f1": f1 if math.isfinite(f1) else None,
        "targets": targets,
        "n_images": len(maps),
    }


def iou_at_decision(predictions: Path, threshold: float | None) -> dict[str, float]:
    """`test/IoU_at_threshold`: the test part's IoU of `map >= threshold` (the run's decision threshold, chosen
    on the val part by `choose_threshold`), from the saved test maps (`test_predictions.npz`, the maps the
    other test metrics saw). NaN when the threshold is undefined or no maps were saved."""
    key = f"test/{IOU_AT_THRESHOLD}"
    if threshold is None or not Path(predictions).is_file():
        return {key: math.nan}
    with np.load(predictions) as saved:
        maps, gt = saved["anomaly_map"], saved["gt_mask"]
    if not np.asarray(gt).any():
        return {key: math.nan}
    return {key: iou(maps, gt, float(threshold), name=IOU_AT_THRESHOLD)}


# --------------------------------------------------------------------------------------------- loading
def _read_checkpoint(path: Path) -> dict:
    state = read_checkpoint(path, "pass a .ckpt written by mvtec_seg")
    if not isinstance(state, dict) or not isinstance(state.get("hyper_parameters"), dict):
        raise UserError(
            f"{path} is not a mvtec_seg checkpoint (no hyper_parameters) — pass a run folder or the "
            f"checkpoints/best.ckpt of a run"
        )
    return state


def _load_module(target: str, path: Path) -> AnomalyModule:
    try:
        return get_class(target).load_from_checkpoint(path, map_location="cpu")
    except Exception as err:
        detail = " ".join(str(err).split())[:300]
        raise UserError(
            f"checkpoint {path} does not load as {target.rsplit('.', 1)[-1]} ({type(err).__name__}: {detail})"
            f" — pass the checkpoint of a U-Net, DeepLabv3+ or TransFusion run"
        ) from None


def _moved(path: Path, written_in: str | None, run_dir: Path) -> Path:
    """`path` as it is now when it lay inside the run folder `written_in` and that folder is now `run_dir`."""
    if not written_in:
        return path
    for old, p in ((Path(written_in), path), (Path(written_in).resolve(), path.resolve())):
        if p.is_relative_to(old):
            return run_dir / p.relative_to(old)
    return path


def run_checkpoint(run_dir: Path, summary: RunSummary) -> Path:
    """Exactly the checkpoint `summary.json` names (the tested weights), found inside the folder when the
    folder has moved since, and with the bytes it had then (`checkpoint_digest`)."""
    if not summary.checkpoint:
        raise UserError(
            f"run {run_dir} records no checkpoint (summary.json checkpoint is null) — pass a finished run "
            f"folder, or a .ckpt with threshold="
        )
    path = _moved(Path(summary.checkpoint), summary.run_dir, run_dir)
    if not path.is_file():
        raise UserError(
            f"checkpoint {path} that {run_dir}/{SUMMARY_FILE} names is missing — restore it, or pass a .ckpt "
            f"with threshold="
        )
    if summary.checkpoint_digest is not None:
        try:
            digest = file_digest(path)
        except OSError as err:
            raise UserError(f"cannot read checkpoint {path}: {err.strerror} — fix its permissions") from None
        if digest != summary.checkpoint_digest:
            raise UserError(
                f"checkpoint {path} is not the one run {run_dir} tested (its bytes changed since "
                f"{SUMMARY_FILE} was written, e.g. by a resumed run that did not finish) — finish that run "
                f"(resume=true), or pass the .ckpt itself with threshold="
            )
    return path


def _load_run(run_dir: Path, ckpt: Path | None) -> Trained:
    try:
        summary = RunSummary.from_dict(json.loads((run_dir / SUMMARY_FILE).read_text()))
        cfg = OmegaConf.load(run_dir / "config.yaml")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"cannot read run folder {run_dir}: {err} — pass a run folder written by mvtec_seg"
        ) from None
    if ckpt is None and summary.status != "ok":
        why = f": {summary.error}" if summary.error else ""
        raise UserError(
            f"run {run_dir} did not finish (status {summary.status}{why}) — pass a finished run folder, or "
            f"one of its checkpoints with threshold="
        )
    ckpt = ckpt or run_checkpoint(run_dir, summary)
    if cfg.model.get("source") == "teacher" and cfg.teacher.get("checkpoint"):
        from mvtec_seg.teacher import load_teacher_checkpoint  # a user's TransFusion, maybe a bare state dict

        module = load_teacher_checkpoint(cfg, ckpt)
    else:
        _read_checkpoint(ckpt)
        module = _load_module(str(cfg.model.module), ckpt)
    threshold = (summary.decision_threshold or {}).get("value")
    return Trained(
        module=module,
        model=summary.model,
        image_size=int(cfg.data.image_size),
        threshold=float(threshold) if threshold is not None else None,
        checkpoint=ckpt,
        run_dir=run_dir,
        batch_size=int(cfg.data.get("eval_batch_size") or 8),
        category=str(cfg.category.name),
        layout=str(cfg.data.get("layout") or "mvtec"),
    )


def _load_bare(ckpt: Path, image_size: int | None) -> Trained:
    hparams = _read_checkpoint(ckpt)["hyper_parameters"]
    is_transfusion = "anomalies" in hparams
    module = _load_module(TRANSFUSION_CLASS if is_transfusion else SEGMENTER_CLASS, ckpt)
    net = hparams.get("net") or {}
    size = image_size or net.get("image_size")
    if size is None:
        raise UserError(
            f"{ckpt} is not inside a run folder and does not record its input size — pass image_size=<the "
            f"data.image_size it was trained with>, or run=<its run folder>"
        )
    return Trained(
        module=module,
        model="transfusion" if is_transfusion else str(net.get("arch", "segmenter")),
        image_size=int(size),
        threshold=None,
        checkpoint=ckpt,
        run_dir=None,
    )


def load_trained(run: str | Path, image_size: int | None = None) -> Trained:
    """A trained model from a run folder, a run's `.ckpt` (its run folder gives the size and threshold),
    or a bare `.ckpt` (TransFusion records its size; a segmenter needs `image_size`)."""
    path = Path(run).expanduser()
    if not path.exists():
        raise UserError(f"run not found: {path} — pass run=<run folder> or run=<checkpoint .ckpt>")
    if path.is_dir():
        if not (path / SUMMARY_FILE).is_file():
            raise UserError(
                f"{path} is not a run folder (no {SUMMARY_FILE}) — pass the folder of one finished run"
            )
        trained = _load_run(path, None)
    else:
        parent = path.parent.parent
        in_run = path.parent.name == "checkpoints" and (parent / SUMMARY_FILE).is_file()
        trained = _load_run(parent, path) if in_run else _load_bare(path, image_size)
    if image_size is not None and trained.run_dir is not None and int(image_size) != trained.image_size:
        log.warning("image_size=%s overrides the run's data.image_size=%s", image_size, trained.image_size)
        trained.image_size = int(image_size)
    trained.module.eval()
    return trained
