"""The table of every user-facing setting: what each must be and when it applies.

One row per setting (`RULES`), built from a few named kinds of value (`COUNT`, `FRACTION`, `choice(...)`),
so a new setting is one line here rather than another `if`. `mvtec_seg.settings.check_settings` applies it.
Each setting is declared once: its default (the example a refusal shows) is the composed config's
(`defaults`), and the choices of a named setting come from the code that implements them (the metrics a
run logs, the data protocols, VisA's split files, Lightning's precisions; the pseudo-mask rules and network options are passed
in by `preflight.check_config`, which may import them).
"""

from __future__ import annotations

import functools
import math
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mvtec_seg.data.sources import SOURCES, makes_pseudo_targets, needs_teacher
from mvtec_seg.data.split import PROTOCOLS
from mvtec_seg.data.synthetic import KINDS
from mvtec_seg.data.visa import VISA_SPLITS
from mvtec_seg.metrics import MONITORS
from mvtec_seg.summary import RESOLUTIONS

Flat = Mapping[str, Any]
ENV_OF: dict[str, str] = {
    "data.root": "MVTEC_ROOT",
    "paths.output_dir": "MVTEC_SEG_OUTPUTS",
    "paths.cache_dir": "MVTEC_SEG_CACHE",
}
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
TARGETS = (
    "model.params.optimizer._target_",
    "model.params.scheduler._target_",
    "teacher.params.optimizer._target_",
    "teacher.params.scheduler._target_",
)


def _precisions() -> tuple[str, ...]:
    """Lightning's own list of `precision` values (as text: `32` and `"32"` are the same setting)."""
    from lightning_fabric.connector import _PRECISION_INPUT

    return tuple(str(v) for part in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(part))


PRECISIONS = _precisions()


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
GT_IMAGES: Spec = (
    lambda v: v is None or whole(0)(v) or number(0.0, 1.0, open_lo=True, open_hi=True)(v),
    "null (every defective train-part image), a whole number >= 0 or a fraction in (0, 1)",
)


def choice(*options: Any) -> Spec:
    return one_of(*options), f"one of {list(options)}"


def optional(spec: Spec, what: str) -> Spec:
    return nullable(spec[0]), f"{spec[1]} (or null: {what})"


@dataclass(frozen=True)
class Rule:
    """A setting, what it must be, when it applies; `example` only where the default cannot show the form."""

    key: str
    spec: Spec
    when: Callable[[Flat], bool] = lambda s: True
    example: str | None = None


def as_override(value: Any) -> str:
    """A value as it is typed on the command line (`true`, `null`, `[0.7,0.1,0.2]`)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ",".join(as_override(v) for v in value) + "]"
    return str(value)


@functools.cache
def defaults() -> dict[str, Any]:
    """The composed default config, flat, with `mask=pseudo` and `logger=wandb` (which bring every `mask.*`,
    teacher and W&B setting in): the one source of the defaults a refusal shows. Composed once, when first
    needed."""
    from omegaconf import OmegaConf

    from mvtec_seg.config import compose_config
    from mvtec_seg.identity import flat_settings

    cfg = compose_config(["mask=pseudo", "logger=wandb"], run_dir="unused")
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation of the environment: the unresolved text still shows the form
        container = OmegaConf.to_container(cfg, resolve=False)
    return flat_settings(container)


def example(rule: Rule) -> str:
    """`key=value` a user can type: the rule's own example, else the setting's default."""
    if rule.example is not None:
        return f"{rule.key}={rule.example}"
    return f"{rule.key}={as_override(defaults().get(rule.key))} (the default)"


def fit(s: Flat) -> bool:
    return s.get("model.source") == "fit"


def teacher_used(s: Flat) -> bool:
    return needs_teacher(s)


def pseudo(s: Flat) -> bool:
    """The mask source runs the pseudo-mask chain (`pseudo`, `mixed`): the `mask.*` rules apply."""
    return makes_pseudo_targets(s)


def labels_budget(s: Flat) -> bool:
    """A fitted model on a source that takes `mask.gt_images` (`gt`, `mixed`)."""
    source = SOURCES.get(str(s.get("mask.name")))
    return fit(s) and source is not None and source.takes_gt_images


def monitored(s: Flat) -> bool:
    """The mask source names its own checkpoint criterion (`mask.monitor`: pseudo, synthetic only)."""
    return s.get("mask.monitor") is not None


def generated(s: Flat) -> bool:
    return any(k.startswith("category.generate.") for k in s)


def rules(when: Callable[[Flat], bool], *rows: tuple[str, Spec] | tuple[str, Spec, str]) -> tuple[Rule, ...]:
    return tuple(Rule(row[0], row[1], when, *row[2:]) for row in rows)


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
        ("seed", (whole(0, 2**32 - 1), "a whole number from 0 to 4294967295")),
        ("dry_run", BOOL),
        ("resume", BOOL),
        ("category.name", FOLDER_NAME),
        ("category.kind", choice(*KINDS)),
        ("data.image_size", (whole(1), "a positive whole number of pixels")),
        ("data.batch_size", POSITIVE),
        ("data.eval_batch_size", POSITIVE),
        ("data.num_workers", COUNT),
        ("data.decode_workers", COUNT),
        ("data.pin_memory", (one_of("auto", True, False), "auto, true or false")),
        ("data.protocol", choice(*PROTOCOLS)),
        ("data.visa_split", choice(*VISA_SPLITS)),
        ("data.augment", BOOL),
        ("data.train_crop", optional(POSITIVE, "whole images; so is a crop of the image size or more")),
        ("data.max_image_pixels", optional(POSITIVE, "Pillow's limit")),
        ("evaluation.iou_threshold", (number(0.0, 1.0), "a number between 0 and 1")),
        ("evaluation.fpr_limit", (number(0.0, 1.0, open_lo=True), "a number in (0, 1]")),
        ("evaluation.max_overlays", COUNT),
        ("evaluation.resolution", choice(*RESOLUTIONS)),
        ("checkpoint.mode", choice("min", "max")),
        ("checkpoint.last_every_s", NON_NEGATIVE),
        ("model.max_epochs", COUNT),
        ("trainer.max_epochs", optional(COUNT, "model.max_epochs")),
        ("trainer.accelerator", choice(*ACCELERATORS)),
        ("trainer.devices", DEVICES),
        ("trainer.num_nodes", POSITIVE, "1"),  # Lightning's default: not in the config
        ("trainer.precision", (lambda v: str(v) in PRECISIONS, f"one of {list(PRECISIONS)}")),
        ("trainer.check_val_every_n_epoch", optional(POSITIVE, "no validation")),
        ("trainer.log_every_n_steps", POSITIVE),
        ("trainer.deterministic", (lambda v: v is None or boolean(v) or v == "warn", "true, false or warn")),
        ("trainer.num_sanity_val_steps", (whole(-1), "a whole number >= -1")),
        ("trainer.enable_progress_bar", BOOL),
        *((f"trainer.limit_{part}_batches", BATCHES) for part in ("train", "val", "test")),
        ("logger.csv", BOOL),
        ("logger.wandb.mode", choice("offline", "online", "disabled")),
        ("logger.wandb.log_overlays", COUNT),
    ),
    *rules(
        generated,
        ("category.generate.kind", choice(*KINDS)),
        ("category.generate.image_size", (whole(16), "a whole number >= 16")),
        ("category.generate.n_train", POSITIVE),
        ("category.generate.n_test_good", COUNT),
        ("category.generate.n_test_per_defect", POSITIVE),
    ),
    *rules(fit, ("mask.name", choice(*SOURCES))),
    *rules(monitored, ("mask.monitor", choice(*MONITORS))),  # before checkpoint.monitor, which it sets
    *rules(
        fit,
        ("checkpoint.monitor", choice(None, *MONITORS)),
        ("model.params.optimizer.lr", RATE),
        ("model.params.loss.bce_weight", NON_NEGATIVE),
        ("model.params.loss.dice_weight", NON_NEGATIVE),
        ("model.params.net.encoder_depth", (whole(1, 5), "a whole number from 1 to 5"), "5"),  # the encoder's
    ),
    *rules(
        teacher_used,
        ("teacher.trainer.max_epochs", COUNT),
        ("teacher.trainer.limit_train_batches", BATCHES),
        ("teacher.batch_size", POSITIVE),
        ("teacher.params.net.num_steps", (whole(3), "a whole number >= 3")),
        ("teacher.params.net.base_channels", POSITIVE),
        ("teacher.params.net.num_res_blocks", POSITIVE),
        ("teacher.params.net.norm_groups", POSITIVE),
        (
            "teacher.params.net.smoothing_kernel",
            (lambda v: whole(1)(v) and v % 2 == 1, "an odd whole number"),
        ),
        ("teacher.params.net.map_weight", FRACTION),
        ("teacher.params.net.dropout", (number(0.0, 1.0, open_hi=True), "a number in [0, 1)")),
        ("teacher.params.anomalies.kind", choice(*KINDS)),
        ("teacher.params.anomalies.foreground_threshold", FRACTION),
        ("teacher.params.anomalies.anomaly_fraction", FRACTION),
        ("teacher.params.anomalies.rotation_probability", FRACTION),
        ("teacher.params.anomalies.rotation_degrees", NON_NEGATIVE),
        ("teacher.params.optimizer.lr", RATE),
        ("teacher.params.loss.focal_weight", NON_NEGATIVE),
    ),
    *rules(
        pseudo,
        ("mask.threshold.quantile", FRACTION),
        ("mask.threshold.low_quantile", FRACTION),
        ("mask.threshold.fixed", FRACTION),
        ("mask.gate.quantile", optional(FRACTION, "off")),
        ("mask.evidence", optional(FRACTION, "off")),
        *((f"mask.{k}", COUNT) for k in ("regions.min_area", "regions.fill_holes", "rounds")),
        ("mask.normal_empty", BOOL),
        ("mask.image_labels", BOOL),
        ("mask.distill.weight", NON_NEGATIVE),
        ("mask.threshold.mebin.sample_rate", POSITIVE),
        ("mask.threshold.mebin.min_interval", POSITIVE),
        ("mask.threshold.mebin.erode", COUNT),
    ),
    *rules(fit, ("mask.synthetic_fraction", optional(FRACTION, "off"))),
    *rules(labels_budget, ("mask.gt_images", GT_IMAGES, "5")),
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
        ("synthetic_val.enabled", (one_of("auto", True, False), "auto, true or false")),
        ("synthetic_val.per_image", POSITIVE),
        ("synthetic_val.texture_probability", FRACTION),
    ),
)


def shown(key: str, value: Any) -> str:
    env = ENV_OF.get(key)
    source = (
        f" (from {env})" if env and os.environ.get(env) and str(value).startswith(os.environ[env]) else ""
    )
    return f"{key}={value!r}{source}"
