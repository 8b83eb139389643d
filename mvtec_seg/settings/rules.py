"""The table of every user-facing setting: what each must be, an example, and when it applies.

One row per setting (`RULES`), built from a few named kinds of value (`COUNT`, `FRACTION`, `choice(...)`),
so a new setting is one line here rather than another `if`. `mvtec_seg.settings.check_settings` applies it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mvtec_seg.data.split import PROTOCOLS
from mvtec_seg.metrics import METRIC_NAMES

Flat = Mapping[str, Any]
ENV_OF: dict[str, str] = {
    "data.root": "MVTEC_ROOT",
    "paths.output_dir": "MVTEC_SEG_OUTPUTS",
    "paths.cache_dir": "MVTEC_SEG_CACHE",
}
KINDS = ("object", "texture")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
MONITORS = (*(f"val/{m}" for m in METRIC_NAMES), "train/loss")
TARGETS = (
    "model.params.optimizer._target_",
    "model.params.scheduler._target_",
    "teacher.params.optimizer._target_",
    "teacher.params.scheduler._target_",
)
PRECISIONS = (
    "64-true",
    "64",
    "32-true",
    "32",
    "16-mixed",
    "16",
    "bf16-mixed",
    "bf16",
    "16-true",
    "bf16-true",
)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def whole(lo: int | None = None, hi: int | None = None) -> Callable[[Any], bool]:
    return lambda v: is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)


def number(lo: float, hi: float = math.inf, open_lo: bool = False, open_hi: bool = False) -> Callable:
    return lambda v: is_number(v) and (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)


def one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda v: any(v == c and type(v) is type(c) for c in choices)


def boolean(v: Any) -> bool:
    return isinstance(v, bool)


def nullable(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def batches(v: Any) -> bool:
    """Lightning's limit_*_batches: a count, or a fraction of the loader."""
    return v is None or whole(0)(v) or number(0.0, 1.0)(v)


Spec = tuple[Callable[[Any], bool], str]  # the check, and what a value must be ("must be ...")
BOOL: Spec = (boolean, "true or false")
COUNT: Spec = (whole(0), "a whole number >= 0")
POSITIVE: Spec = (whole(1), "a whole number >= 1")
FRACTION: Spec = (number(0.0, 1.0), "a fraction between 0 and 1")
NON_NEGATIVE: Spec = (number(0.0), "a number >= 0")
RATE: Spec = (number(0.0, open_lo=True), "a positive number")
BATCHES: Spec = (batches, "null, a whole number >= 0 or a fraction")


def choice(*options: Any) -> Spec:
    return one_of(*options), f"one of {list(options)}"


def optional(spec: Spec, what: str) -> Spec:
    return nullable(spec[0]), f"{spec[1]} (or null: {what})"


@dataclass(frozen=True)
class Rule:
    key: str
    spec: Spec
    example: str
    when: Callable[[Flat], bool] = lambda s: True


def fit(s: Flat) -> bool:
    return s.get("model.source") == "fit"


def teacher_used(s: Flat) -> bool:
    return s.get("model.source") == "teacher" or s.get("mask.name") == "pseudo"


def pseudo(s: Flat) -> bool:
    return s.get("mask.name") == "pseudo"


def generated(s: Flat) -> bool:
    return any(k.startswith("category.generate.") for k in s)


def rules(when: Callable[[Flat], bool], *rows: tuple[str, Spec, str]) -> tuple[Rule, ...]:
    return tuple(Rule(key, spec, example, when) for key, spec, example in rows)


def always(s: Flat) -> bool:
    return True


FOLDER_NAME: Spec = (lambda v: isinstance(v, str) and v.strip() not in ("", ".", ".."), "a folder name")
DEVICES: Spec = (
    lambda v: v == "auto" or whole(1)(v) or (isinstance(v, list) and v and all(whole(0)(d) for d in v)),
    "auto, a whole number >= 1 or a list of device indices",
)
RULES: tuple[Rule, ...] = (
    *rules(
        always,
        ("seed", (whole(0, 2**32 - 1), "a whole number from 0 to 4294967295"), "0"),
        ("dry_run", BOOL, "false"),
        ("resume", BOOL, "false"),
        ("category.name", FOLDER_NAME, "bottle"),
        ("category.kind", choice(*KINDS), "object"),
        ("data.image_size", (whole(1), "a positive whole number of pixels"), "256"),
        ("data.batch_size", POSITIVE, "4"),
        ("data.eval_batch_size", POSITIVE, "8"),
        ("data.num_workers", COUNT, "0"),
        ("data.decode_workers", COUNT, "2"),
        ("data.pin_memory", (one_of("auto", True, False), "auto, true or false"), "auto"),
        ("data.protocol", choice(*PROTOCOLS), "split"),
        ("data.augment", BOOL, "true"),
        (
            "data.train_crop",
            optional(POSITIVE, "whole images; so is a crop of the image size or more"),
            "128",
        ),
        ("data.max_image_pixels", optional(POSITIVE, "Pillow's limit"), "200000000"),
        ("evaluation.iou_threshold", (number(0.0, 1.0), "a number between 0 and 1"), "0.5"),
        ("evaluation.fpr_limit", (number(0.0, 1.0, open_lo=True), "a number in (0, 1]"), "0.3"),
        ("evaluation.max_overlays", COUNT, "32"),
        ("checkpoint.mode", choice("min", "max"), "max"),
        ("checkpoint.last_every_s", NON_NEGATIVE, "60"),
        ("model.max_epochs", COUNT, "30"),
        ("trainer.max_epochs", optional(COUNT, "model.max_epochs"), "30"),
        ("trainer.accelerator", choice(*ACCELERATORS), "cpu"),
        ("trainer.devices", DEVICES, "1"),
        ("trainer.num_nodes", POSITIVE, "1"),
        ("trainer.precision", (lambda v: str(v) in PRECISIONS, f"one of {list(PRECISIONS)}"), "32-true"),
        ("trainer.check_val_every_n_epoch", optional(POSITIVE, "no validation"), "1"),
        ("trainer.log_every_n_steps", POSITIVE, "10"),
        (
            "trainer.deterministic",
            (lambda v: v is None or boolean(v) or v == "warn", "true, false or warn"),
            "false",
        ),
        ("trainer.num_sanity_val_steps", (whole(-1), "a whole number >= -1"), "0"),
        ("trainer.enable_progress_bar", BOOL, "true"),
        *((f"trainer.limit_{part}_batches", BATCHES, "null") for part in ("train", "val", "test")),
        ("logger.csv", BOOL, "true"),
        ("logger.wandb.mode", choice("offline", "online", "disabled"), "offline"),
        ("logger.wandb.log_overlays", COUNT, "16"),
    ),
    *rules(
        generated,
        ("category.generate.kind", choice(*KINDS), "object"),
        ("category.generate.image_size", (whole(16), "a whole number >= 16"), "128"),
        ("category.generate.n_train", POSITIVE, "60"),
        ("category.generate.n_test_good", COUNT, "12"),
        ("category.generate.n_test_per_defect", POSITIVE, "10"),
    ),
    *rules(
        fit,
        ("checkpoint.monitor", choice(None, *MONITORS), "val/pixel_AP"),
        ("model.params.optimizer.lr", RATE, "1e-4"),
        ("model.params.loss.bce_weight", NON_NEGATIVE, "1.0"),
        ("model.params.loss.dice_weight", NON_NEGATIVE, "1.0"),
        ("model.params.net.encoder_depth", (whole(1, 5), "a whole number from 1 to 5"), "5"),
    ),
    *rules(
        teacher_used,
        ("teacher.trainer.max_epochs", COUNT, "60"),
        ("teacher.trainer.limit_train_batches", BATCHES, "null"),
        ("teacher.batch_size", POSITIVE, "8"),
        ("teacher.params.net.num_steps", (whole(3), "a whole number >= 3"), "20"),
        ("teacher.params.net.base_channels", POSITIVE, "16"),
        ("teacher.params.net.num_res_blocks", POSITIVE, "1"),
        ("teacher.params.net.norm_groups", POSITIVE, "8"),
        (
            "teacher.params.net.smoothing_kernel",
            (lambda v: whole(1)(v) and v % 2 == 1, "an odd whole number"),
            "7",
        ),
        ("teacher.params.net.map_weight", FRACTION, "0.95"),
        ("teacher.params.net.dropout", (number(0.0, 1.0, open_hi=True), "a number in [0, 1)"), "0.0"),
        ("teacher.params.net.reverse", choice("official", "all_steps"), "official"),
        ("teacher.params.anomalies.kind", choice(*KINDS), "object"),
        ("teacher.params.anomalies.foreground_threshold", FRACTION, "0.1"),
        ("teacher.params.anomalies.anomaly_fraction", FRACTION, "0.5"),
        ("teacher.params.anomalies.rotation_probability", FRACTION, "0.3"),
        ("teacher.params.anomalies.rotation_degrees", NON_NEGATIVE, "20.0"),
        ("teacher.params.optimizer.lr", RATE, "1e-4"),
        ("teacher.params.loss.focal_weight", NON_NEGATIVE, "5.0"),
    ),
    *rules(
        pseudo,
        ("mask.threshold.quantile", FRACTION, "0.995"),
        ("mask.threshold.low_quantile", FRACTION, "0.98"),
        ("mask.threshold.fixed", FRACTION, "0.5"),
        ("mask.gate.quantile", (nullable(FRACTION[0]), f"{FRACTION[1]} (or null: off)"), "0.95"),
        *((f"mask.{k}", COUNT, "0") for k in ("regions.min_area", "regions.fill_holes", "rounds")),
        ("mask.gate.strategy", choice("quantile", "separation"), "quantile"),
        ("mask.gated", choice("empty", "ignore"), "empty"),
        ("mask.normal_empty", BOOL, "false"),
        ("mask.select", choice("fixed", "auto"), "fixed"),
        ("mask.synthetic_fraction", optional(FRACTION, "off"), "0.5"),
        ("mask.distill.weight", NON_NEGATIVE, "0.0"),
        ("mask.threshold.mebin.sample_rate", POSITIVE, "4"),
        ("mask.threshold.mebin.min_interval", POSITIVE, "4"),
        ("mask.threshold.mebin.erode", COUNT, "6"),
    ),
    *rules(
        lambda s: pseudo(s) and s.get("mask.select") == "auto",
        (
            "mask.candidates",
            (
                lambda v: isinstance(v, list | tuple) and len(v) > 0 and all(isinstance(c, dict) for c in v),
                "a non-empty list of mask settings to choose from (with mask.select=auto)",
            ),
            "'[{rounds: 0},{threshold: {strategy: otsu}}]'",
        ),
    ),
    *rules(
        lambda s: fit(s) and s.get("synthetic_val.enabled") is not False,
        ("synthetic_val.enabled", (one_of("auto", True, False), "auto, true or false"), "auto"),
        ("synthetic_val.per_image", POSITIVE, "2"),
        ("synthetic_val.texture_probability", FRACTION, "0.0"),
    ),
)


def shown(key: str, value: Any) -> str:
    env = ENV_OF.get(key)
    source = (
        f" (from {env})" if env and os.environ.get(env) and str(value).startswith(os.environ[env]) else ""
    )
    return f"{key}={value!r}{source}"
