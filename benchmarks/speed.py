"""The speed suite: the teacher's training and maps, and the segmenters' training and testing, each through
the code a run uses (`build_datamodule`, `build_teacher`/`build_model`, `build_trainer`, `predict_maps`), on
the device present (a GPU when there is one: `trainer=gpu`; else the CPU), each case under every variant
(precision, memory layout) in one process, the variants interleaved over `rounds` rounds and each rate the
best of its rounds, so a case's ratios come from one run on one machine.

Training images/s come from `callbacks.Throughput` (each epoch timed from the end of its first batch, so the
warm-up is excluded); maps images/s is the wall time of `teacher.predict_maps` over the category, data loading
included; a segmenter's test images/s is the test loop's wall time. The data is the generated
synthetic category at the case's size, so the suite runs anywhere. The `official` case is `official_peer`.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from benchmarks.runner import context, measured_on, measured_rows, number, selected
from mvtec_seg.config import compose_config

log = logging.getLogger(__name__)
KEY = ("case", "variant", "device")


def _cfg(cfg: DictConfig, case: DictConfig, variant: list[str], tmp: Path, gpu: bool):
    device = list(cfg.gpu_overrides if gpu else cfg.cpu_overrides)
    tiny = list(cfg.get("tiny_overrides") or []) if cfg.get("tiny") else []
    overrides = [*cfg.base, *case.overrides, *device, *variant, *tiny, f"paths.cache_dir={tmp / 'cache'}"]
    return compose_config(overrides, run_dir=tmp / "run")


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


def teacher_case(run_cfg, steps: int, epochs: int, infer_images: int | None) -> dict[str, Any]:
    """Teacher training images/s in the Lightning loop, then maps images/s over the category's images (the
    first `infer_images` of them when set)."""
    from torch.utils.data import Subset

    from mvtec_seg.builders import build_datamodule
    from mvtec_seg.callbacks import Throughput
    from mvtec_seg.models.base import loader_maps, parameter_count
    from mvtec_seg.teacher import build_teacher, predict_maps

    tc = run_cfg.teacher
    dm = build_datamodule(run_cfg, train_subset="known_normal", batch_size=int(tc.batch_size), augment=False)
    dm.prepare()
    module = build_teacher(run_cfg)
    throughput = Throughput()
    trainer = _timed_trainer(tc.trainer, throughput, steps, epochs)
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    n = len(dm.manifest["samples"])
    t0 = time.perf_counter()
    if infer_images is None or infer_images >= n:
        predict_maps(tc.trainer, module, dm)
    else:  # the same inference path on the first images only (an emulated precision takes minutes an image)
        loader = dm.predict_dataloader()
        n = infer_images
        subset = Subset(loader.dataset, range(n))
        small = type(loader)(subset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
        loader_maps(module, small, (), tc.trainer.precision)
    maps_s = time.perf_counter() - t0
    return {
        "params": parameter_count(module),
        "batch_size": int(tc.batch_size),
        "train_images_per_s": throughput.images_per_s,
        "infer_images_per_s": n / maps_s,
        "infer_images": n,
    }


def segmenter_case(run_cfg, steps: int, epochs: int, infer_images: int | None) -> dict[str, Any]:
    """A segmenter's training images/s (`Throughput`) and its test loop's images/s."""
    from mvtec_seg.builders import build_datamodule, build_model
    from mvtec_seg.callbacks import Throughput
    from mvtec_seg.models.base import parameter_count

    dm = build_datamodule(run_cfg)
    dm.prepare()
    module = build_model(run_cfg)
    throughput = Throughput()
    trainer = _timed_trainer(run_cfg.trainer, throughput, steps, epochs)
    if infer_images is not None:
        trainer.limit_test_batches = max(1, infer_images // int(run_cfg.data.eval_batch_size))
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    tested = min(dm.counts()["test"], trainer.num_test_batches[0] * int(run_cfg.data.eval_batch_size))
    return {
        "params": parameter_count(module),
        "batch_size": int(run_cfg.data.batch_size),
        "train_images_per_s": throughput.images_per_s,
        "infer_images_per_s": tested / throughput.test_s,
        "infer_images": tested,
    }


def official_case(run_cfg, steps: int, epochs: int, infer_images: int | None) -> dict[str, Any]:
    from benchmarks.official_peer import official_case as run

    return run(run_cfg, steps * epochs, infer_images or 8)


CASES: dict[str, Callable[..., dict[str, Any]]] = {
    "teacher": teacher_case,
    "segmenter": segmenter_case,
    "official": official_case,
}


def _variants(cfg: DictConfig, case: DictConfig) -> list[str]:
    names = list(case.get("variants") or cfg.variants)
    return [n for n in selected(cfg, "variants", cfg.variants) if n in names]


def _measure(cfg: DictConfig, case: DictConfig, variant: str, tmp: Path, gpu: bool, emulated: bool):
    """One measurement of a case under a variant: (its composed config, steps, epochs, figures)."""
    steps, epochs = int(case.get("steps", cfg.steps)), int(case.get("epochs", cfg.epochs))
    infer_images = case.get("infer_images")
    overrides = list(cfg.variants[variant].overrides)
    if emulated and any(o.endswith("=bf16-mixed") for o in overrides):
        steps, epochs, infer_images = (cfg.emulated.get(k) for k in ("steps", "epochs", "infer_images"))
    if cfg.get("tiny"):
        steps, epochs, infer_images = 2, 1, 2
    run_cfg = _cfg(cfg, case, overrides, tmp, gpu)
    return run_cfg, steps, epochs, CASES[case.kind](run_cfg, int(steps), int(epochs), infer_images)


RATES = ("train_images_per_s", "infer_images_per_s", "infer_images_per_s_batch1")
RATES += ("official_train_images_per_s", "official_infer_images_per_s")


def _best(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Each rate's best of two measurements: on a shared machine, load only ever slows a run down."""
    if a is None:
        return b
    return b | {k: max(a[k], b[k]) for k in RATES if k in a and k in b}


def run(cfg: DictConfig, runs: Path, cache: Path, emit: Callable[[dict], None]) -> None:
    import torch

    from benchmarks.official_peer import checkout
    from mvtec_seg.precision import native_bf16

    gpu = torch.cuda.is_available()
    emulated = not gpu and not native_bf16()
    rounds = 1 if cfg.get("tiny") else int(cfg.get("rounds", 1))
    # the precision a run takes on this device when nothing is set: the trainer config's, as composed here
    default = str(compose_config(list(cfg.gpu_overrides if gpu else cfg.cpu_overrides)).trainer.precision)
    for name in selected(cfg, "cases", cfg.cases):
        case = cfg.cases[name]
        if case.get("gpu_only") and not gpu:
            log.warning("speed: %s runs on a GPU only (hours on a CPU): skipped", name)
            continue
        if case.kind == "official" and checkout() is None:
            log.warning("speed: %s skipped: set OFFICIAL_TRANSFUSION=<ECCV_TransFusion checkout>", name)
            continue
        variants = _variants(cfg, case)
        best: dict[str, dict[str, Any]] = {}
        for _ in range(rounds):  # variants interleaved round by round: a load change hits them alike
            for variant in variants:
                slow = emulated and "bf16" in variant
                if slow and variant in best:  # an emulated precision: one round (minutes, and 10x off)
                    continue
                with tempfile.TemporaryDirectory(dir=runs if runs.is_dir() else None) as tmp:
                    run_cfg, steps, epochs, figures = _measure(cfg, case, variant, Path(tmp), gpu, emulated)
                best[variant] = {
                    "cfg": run_cfg,
                    "steps": steps,
                    "epochs": epochs,
                    "figures": _best(best.get(variant, {}).get("figures"), figures),
                    "rounds": best.get(variant, {}).get("rounds", 0) + 1,
                }
        for variant in variants:
            m = best[variant]
            run_cfg = m["cfg"]
            precision = str(run_cfg.trainer.precision)
            channels_last = bool(run_cfg.model.params.get("channels_last"))
            row = {
                "suite": "speed",
                "case": name,
                "variant": variant,
                "what": case.what,
                "image_size": int(run_cfg.data.image_size),
                "precision": precision,
                "channels_last": channels_last,
                "default": precision == default and not channels_last,
                "bf16": "native" if gpu or native_bf16() else "emulated",
                "steps_per_epoch": m["steps"],
                "epochs": m["epochs"],
                "rounds": m["rounds"],
                **m["figures"],
                "tiny": bool(cfg.get("tiny")),
                **context(),
            }
            emit(row)
            log.warning("speed: %s / %s: %s", name, variant, {k: row.get(k) for k in RATES[:2]})


def _ratio(value: str, base: str) -> str:
    """`value / base` as '1.52x'; '–' where either is missing."""
    a, b = number(value), number(base)
    return f"{a / b:.2f}x" if math.isfinite(a) and math.isfinite(b) and b > 0 else "–"


def section(rows: list[dict[str, str]]) -> str:
    """RESULTS.md's section for the speed suite: each case's variants with their ratio to float32."""
    rows = measured_rows(rows)
    if not rows:
        return "No speed results yet: `python -m benchmarks speed`."
    base = {(r["case"], r["device"]): r for r in rows if r.get("variant") == "float32"}
    lines = [
        "| case | what | device | size | variant | bf16 | default | batch | params | train images/s | "
        "× float32 | inference images/s | × float32 |",
        "|---|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f32 = base.get((r["case"], r["device"]), {})
        lines.append(
            f"| {r['case']} | {r['what']} | {r['device']} | {r['image_size']} | {r.get('variant', '')} | "
            f"{r.get('bf16', '')} | {'yes' if r.get('default') == 'True' else ''} | {r['batch_size']} | "
            f"{int(number(r['params'])):,} | {number(r['train_images_per_s']):.2f} | "
            f"{_ratio(r['train_images_per_s'], f32.get('train_images_per_s', ''))} | "
            f"{number(r['infer_images_per_s']):.2f} | "
            f"{_ratio(r['infer_images_per_s'], f32.get('infer_images_per_s', ''))} |"
        )
    peers = [r for r in rows if r.get("official_train_images_per_s")]
    if peers:
        lines += [
            "",
            "The authors' network beside ours (`official` case; same configuration, inputs, threads and process; "
            "anomaly generation left out on both sides; their reverse process one image at a time, as their "
            "evaluation runs it):",
            "",
            "| case | variant | device | train images/s: ours | official | ours / official | maps images/s: "
            "ours (batch) | ours (one image) | official (one image) | ours (one image) / official |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in peers:
            lines.append(
                f"| {r['case']} | {r['variant']} | {r['device']} | {number(r['train_images_per_s']):.2f} | "
                f"{number(r['official_train_images_per_s']):.2f} | "
                f"{_ratio(r['train_images_per_s'], r['official_train_images_per_s'])} | "
                f"{number(r['infer_images_per_s']):.2f} | {number(r['infer_images_per_s_batch1']):.2f} | "
                f"{number(r['official_infer_images_per_s']):.2f} | "
                f"{_ratio(r['infer_images_per_s_batch1'], r['official_infer_images_per_s'])} |"
            )
    return "\n".join([*lines, "", measured_on(rows, device=False)])
