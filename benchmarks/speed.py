"""The speed suite: the teacher's training and maps, and the segmenters' training and testing, each through
the code a run uses (`build_datamodule`, `build_teacher`/`build_model`, `build_trainer`, `predict_maps`), on
the device present (a GPU when there is one: `trainer=gpu`, bf16; else the CPU, float32).

Training images/s come from `callbacks.Throughput` (each epoch timed from the end of its first batch, so the
warm-up is excluded); maps images/s is the wall time of `teacher.predict_maps` over the category, data loading
included; a segmenter's test images/s is the test loop's wall time. The data is the generated
synthetic category at the case's size, so the suite runs anywhere.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from benchmarks.runner import context, measured_on, measured_rows, number, selected
from mvtec_seg.config import compose_config

log = logging.getLogger(__name__)
KEY = ("case", "device")


def _cfg(cfg: DictConfig, case: DictConfig, tmp: Path, gpu: bool):
    device = list(cfg.gpu_overrides if gpu else cfg.cpu_overrides)
    tiny = list(cfg.get("tiny_overrides") or []) if cfg.get("tiny") else []
    return compose_config(
        [*cfg.base, *case.overrides, *device, *tiny, f"paths.cache_dir={tmp / 'cache'}"], run_dir=tmp / "run"
    )


def _timed_trainer(node, throughput, steps: int, epochs: int):
    """A trainer that only trains and times `steps` batches for `epochs` epochs (no validation, no checkpoints)."""
    from mvtec_seg.builders import build_trainer

    return build_trainer(
        node,
        [throughput],
        max_epochs=epochs,
        limit_train_batches=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
    )


def teacher_case(run_cfg, steps: int, epochs: int) -> dict[str, Any]:
    """Teacher training images/s in the Lightning loop, then maps images/s over every image."""
    from mvtec_seg.builders import build_datamodule
    from mvtec_seg.callbacks import Throughput
    from mvtec_seg.models.base import parameter_count
    from mvtec_seg.teacher import build_teacher, predict_maps

    tc = run_cfg.teacher
    dm = build_datamodule(run_cfg, train_subset="normal", batch_size=int(tc.batch_size), augment=False)
    dm.prepare()
    module = build_teacher(run_cfg)
    throughput = Throughput()
    trainer = _timed_trainer(tc.trainer, throughput, steps, epochs)
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    n = len(dm.manifest["samples"])
    t0 = time.perf_counter()
    predict_maps(tc.trainer, module, dm)
    maps_s = time.perf_counter() - t0
    return {
        "params": parameter_count(module),
        "batch_size": int(tc.batch_size),
        "train_images_per_s": throughput.images_per_s,
        "infer_images_per_s": n / maps_s,
        "infer_images": n,
    }


def segmenter_case(run_cfg, steps: int, epochs: int) -> dict[str, Any]:
    """A segmenter's training images/s (`Throughput`) and its test loop's images/s."""
    from mvtec_seg.builders import build_datamodule, build_model
    from mvtec_seg.callbacks import Throughput
    from mvtec_seg.models.base import parameter_count

    dm = build_datamodule(run_cfg)
    dm.prepare()
    module = build_model(run_cfg)
    throughput = Throughput()
    trainer = _timed_trainer(run_cfg.trainer, throughput, steps, epochs)
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    return {
        "params": parameter_count(module),
        "batch_size": int(run_cfg.data.batch_size),
        "train_images_per_s": throughput.images_per_s,
        "infer_images_per_s": dm.counts()["test"] / throughput.test_s,
        "infer_images": dm.counts()["test"],
    }


def run(cfg: DictConfig, runs: Path, cache: Path, emit: Callable[[dict], None]) -> None:
    import torch

    gpu = torch.cuda.is_available()
    for name in selected(cfg, "cases", cfg.cases):
        case = cfg.cases[name]
        steps, epochs = int(case.get("steps", cfg.steps)), int(case.get("epochs", cfg.epochs))
        if cfg.get("tiny"):
            steps, epochs = 2, 1
        with tempfile.TemporaryDirectory(dir=runs if runs.is_dir() else None) as tmp:
            run_cfg = _cfg(cfg, case, Path(tmp), gpu)
            fn = teacher_case if case.kind == "teacher" else segmenter_case
            figures = fn(run_cfg, steps, epochs)
        row = {
            "suite": "speed",
            "case": name,
            "what": case.what,
            "image_size": int(run_cfg.data.image_size),
            "precision": str(run_cfg.trainer.precision),
            "steps_per_epoch": steps,
            "epochs": epochs,
            **figures,
            "tiny": bool(cfg.get("tiny")),
            **context(),
        }
        emit(row)
        log.warning("speed: %s: %s", name, {k: row[k] for k in ("train_images_per_s", "infer_images_per_s")})


def section(rows: list[dict[str, str]]) -> str:
    """RESULTS.md's section for the speed suite."""
    rows = measured_rows(rows)
    if not rows:
        return "No speed results yet: `python -m benchmarks speed`."
    lines = [
        "| case | what | device | size | precision | batch | params | train images/s | inference images/s |",
        "|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['what']} | {r['device']} | {r['image_size']} | {r['precision']} | "
            f"{r['batch_size']} | {int(number(r['params'])):,} | {number(r['train_images_per_s']):.2f} | "
            f"{number(r['infer_images_per_s']):.2f} |"
        )
    return "\n".join([*lines, "", measured_on(rows, device=False)])
