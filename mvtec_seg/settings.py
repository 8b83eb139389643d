"""Every user-facing setting checked before any work, by one table: a bad value is one line naming the
setting, what it must be and an example, never a traceback halfway through a run.

`resolved_settings` turns the composed config into `{dotted key: value}` (an interpolation that cannot be
resolved, a mandatory value left unset, are one line too); `check_paths` makes sure the folders a run
writes can be folders; `check_settings` applies `RULES` and the few checks that relate two settings.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from mvtec_seg.data.split import PROTOCOLS
from mvtec_seg.errors import UserError
from mvtec_seg.identity import flat_settings

Flat = Mapping[str, Any]
ENV_OF: dict[str, str] = {
    "data.root": "MVTEC_ROOT",
    "paths.output_dir": "MVTEC_SEG_OUTPUTS",
    "paths.cache_dir": "MVTEC_SEG_CACHE",
}
KINDS = ("object", "texture")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
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


# ------------------------------------------------------------------------------------------- checks
def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def whole(lo: int | None = None, hi: int | None = None) -> Callable[[Any], bool]:
    return lambda v: _int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)


def number(lo: float, hi: float = math.inf, open_lo: bool = False, open_hi: bool = False) -> Callable:
    return lambda v: _num(v) and (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)


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


def _fit(s: Flat) -> bool:
    return s.get("model.source") == "fit"


def _teacher_used(s: Flat) -> bool:
    return s.get("model.source") == "teacher" or s.get("mask.name") == "pseudo"


def _pseudo(s: Flat) -> bool:
    return s.get("mask.name") == "pseudo"


def _generated(s: Flat) -> bool:
    return any(k.startswith("category.generate.") for k in s)


def _rules(when: Callable[[Flat], bool], *rows: tuple[str, Spec, str]) -> tuple[Rule, ...]:
    return tuple(Rule(key, spec, example, when) for key, spec, example in rows)


def _always(s: Flat) -> bool:
    return True


FOLDER_NAME: Spec = (lambda v: isinstance(v, str) and v.strip() not in ("", ".", ".."), "a folder name")
DEVICES: Spec = (
    lambda v: v == "auto" or whole(1)(v) or (isinstance(v, list) and v and all(whole(0)(d) for d in v)),
    "auto, a whole number >= 1 or a list of device indices",
)
RULES: tuple[Rule, ...] = (
    *_rules(
        _always,
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
        ("data.train_crop", optional(POSITIVE, "whole images"), "128"),
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
    *_rules(
        _generated,
        ("category.generate.kind", choice(*KINDS), "object"),
        ("category.generate.image_size", (whole(16), "a whole number >= 16"), "128"),
        ("category.generate.n_train", POSITIVE, "60"),
        ("category.generate.n_test_good", COUNT, "12"),
        ("category.generate.n_test_per_defect", POSITIVE, "10"),
    ),
    *_rules(
        _fit,
        ("model.params.optimizer.lr", RATE, "1e-4"),
        ("model.params.loss.bce_weight", NON_NEGATIVE, "1.0"),
        ("model.params.loss.dice_weight", NON_NEGATIVE, "1.0"),
        ("model.params.net.encoder_depth", (whole(1, 5), "a whole number from 1 to 5"), "5"),
    ),
    *_rules(
        _teacher_used,
        ("teacher.trainer.max_epochs", COUNT, "60"),
        ("teacher.trainer.limit_train_batches", BATCHES, "null"),
        ("teacher.batch_size", POSITIVE, "8"),
        ("teacher.params.net.num_steps", (whole(2), "a whole number >= 2"), "20"),
        *(
            (f"teacher.params.net.{k}", POSITIVE, ex)
            for k, ex in (("base_channels", "16"), ("num_res_blocks", "1"))
        ),
        *(
            (f"teacher.params.net.{k}", POSITIVE, ex)
            for k, ex in (("norm_groups", "8"), ("smoothing_kernel", "7"))
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
    *_rules(
        _pseudo,
        ("mask.threshold.quantile", FRACTION, "0.995"),
        ("mask.threshold.low_quantile", FRACTION, "0.98"),
        ("mask.threshold.fixed", FRACTION, "0.5"),
        ("mask.gate.quantile", (nullable(FRACTION[0]), f"{FRACTION[1]} (or null: off)"), "0.95"),
        *((f"mask.{k}", COUNT, "0") for k in ("regions.min_area", "regions.fill_holes", "rounds")),
    ),
)


def _shown(key: str, value: Any) -> str:
    env = ENV_OF.get(key)
    source = (
        f" (from {env})" if env and os.environ.get(env) and str(value).startswith(os.environ[env]) else ""
    )
    return f"{key}={value!r}{source}"


# ---------------------------------------------------------------------------------------------- API
def resolved_settings(cfg: DictConfig) -> dict[str, Any]:
    """The config resolved and flattened; an unresolvable or unset value is one line naming it."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        text = " ".join(str(err).split())
        missing = re.search(r"Missing mandatory value: ?([\w.]+)", text)
        key = missing.group(1) if missing else (err.full_key or "a setting")
        if missing or isinstance(err, MissingMandatoryValue):
            if key == "category.name":
                raise UserError(
                    "category.name is not set — category=custom reads <data.root>/<category.name>: pass "
                    "category.name=<the folder's name>"
                ) from None
            raise UserError(f"{key} is not set — pass {key}=<value>") from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"{key} cannot be resolved ({first}) — fix that setting or the environment variable it reads"
        ) from None
    return flat_settings(container)


def folder_problem(path: Path) -> str | None:
    """Why `path` cannot be (or become) a folder this process writes in; None if it can. Only probes: a
    temporary folder is made and removed beside what is missing, nothing else is created."""
    path = Path(path).absolute()
    if path.exists():
        if not path.is_dir():
            return f"{path} is a file, not a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"cannot access {path}: Permission denied"
        return None
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, so {path} cannot be a folder"
    first_missing = ancestor / path.relative_to(ancestor).parts[0]
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".mvtec_seg-probe-"))
    except OSError as err:
        return f"cannot access {first_missing}: {err.strerror or err}"
    return None


def check_paths(settings: Flat) -> None:
    """The folders a run writes (its run folder, the shared cache, a generated category's data) can be made."""
    keys = ["paths.run_dir", "paths.cache_dir", "paths.output_dir"] + (
        ["data.root"] if _generated(settings) else []
    )
    for key in keys:
        value = settings.get(key)
        if value is None:
            continue
        problem = folder_problem(Path(str(value)))
        if problem:
            name = "hydra.run.dir" if key == "paths.run_dir" else key
            raise UserError(
                f"{_shown(key, value)} cannot be a folder: {problem} — point {name} at a folder you can write "
                f"(or set paths.output_dir / paths.cache_dir; MVTEC_SEG_OUTPUTS, MVTEC_SEG_CACHE)"
            )
    root = settings.get("data.root")
    if root is not None and not _generated(settings) and Path(str(root)).is_file():
        name = settings.get("category.name")
        raise UserError(
            f"{_shown('data.root', root)} is a file — set data.root to the folder that holds {name}/"
        )


def check_settings(settings: Flat, choices: Mapping[str, tuple[Any, ...]] = {}) -> None:  # noqa: B006
    """Every rule of `RULES` (for the keys present), the `choices` lists given by the layers above, and the
    checks that relate settings: training happens, sizes fit the networks, files and folders exist."""
    for rule in RULES:
        check, must = rule.spec
        if rule.key in settings and rule.when(settings) and not check(settings[rule.key]):
            raise UserError(
                f"{_shown(rule.key, settings[rule.key])} must be {must} — set it to e.g. {rule.example}"
            )
    for key, allowed in choices.items():
        if key in settings and settings[key] is not None and settings[key] not in allowed:
            raise UserError(f"{key}={settings[key]!r} is not one of {list(allowed)} — pick one of those")
    _check_split_ratios(settings.get("data.split_ratios"))
    _check_relations(settings)


def _check_split_ratios(ratios: Any) -> None:
    if ratios is None:
        return
    ok = isinstance(ratios, list) and len(ratios) == 3 and all(_num(r) and r >= 0 for r in ratios)
    if not ok or ratios[0] <= 0 or abs(sum(ratios) - 1.0) > 1e-6:
        raise UserError(
            f"data.split_ratios={list(ratios) if isinstance(ratios, list) else ratios!r} must be three "
            f"non-negative fractions (train, val, test) with train > 0 that sum to 1 — set it to e.g. "
            f"[0.7,0.1,0.2]"
        )


def _trains(settings: Flat, epochs_key: str, limit_key: str) -> bool:
    return settings.get(epochs_key) != 0 and settings.get(limit_key) not in (0, 0.0)


def _multiple(s: Flat, key: str, factor: int, why: str) -> None:
    value = s.get(key)
    if _int(value) and value % factor:
        nearest = max(factor, round(value / factor) * factor)
        raise UserError(f"{key}={value} is not a multiple of {factor}, which {why} — use e.g. {nearest}")


def _check_relations(s: Flat) -> None:
    """Training happens, sizes fit the networks, named files and folders exist, a GPU is there."""
    if _fit(s) and s.get("ckpt_path") is None:
        epochs = "trainer.max_epochs" if s.get("trainer.max_epochs") is not None else "model.max_epochs"
        if not _trains(s, epochs, "trainer.limit_train_batches"):
            raise UserError(
                f"{epochs}={s.get(epochs)} with trainer.limit_train_batches="
                f"{s.get('trainer.limit_train_batches')}: the model would be tested untrained — train at "
                f"least one epoch and batch, or pass ckpt_path=<checkpoint> to test a trained one"
            )
    teacher_epochs = s.get("teacher.trainer.max_epochs")
    if s.get("model.source") == "teacher" and s.get("model.max_epochs") != teacher_epochs:
        raise UserError(
            f"model.max_epochs={s.get('model.max_epochs')} has no effect with model=transfusion — its epochs "
            f"are teacher.trainer.max_epochs (now {teacher_epochs}): set that"
        )
    untrained = not _trains(s, "teacher.trainer.max_epochs", "teacher.trainer.limit_train_batches")
    if _teacher_used(s) and s.get("teacher.checkpoint") is None and untrained:
        raise UserError(
            f"teacher.trainer.max_epochs={teacher_epochs} with teacher.trainer.limit_train_batches="
            f"{s.get('teacher.trainer.limit_train_batches')}: the TransFusion teacher would be used "
            f"untrained — train it at least one epoch and batch, or pass teacher.checkpoint=<file>"
        )
    files = [("ckpt_path", Path.is_file, "file")]
    if _teacher_used(s):
        files += [("teacher.checkpoint", Path.is_file, "file")]
        files += [
            (f"teacher.params.anomalies.{k}", Path.is_dir, "folder")
            for k in ("texture_dir", "foreground_dir")
        ]
    for key, exists, what in files:
        if s.get(key) is not None and not exists(Path(str(s[key]))):
            raise UserError(f"{key}={s[key]!r} is not a {what} — pass an existing {what}, or null")
    crop, size = s.get("data.train_crop"), s["data.image_size"]
    if crop is not None and crop > size:
        raise UserError(f"data.train_crop={crop} is larger than data.image_size={size} — crop at most that")
    if _fit(s) and str(s.get("model.params.net.arch", "")).lower().startswith("deeplab"):
        for key in ("data.image_size", "data.train_crop"):
            _multiple(s, key, 16, "DeepLabv3+ needs (its encoder's output stride)")
    mult = s.get("teacher.params.net.channel_mult")
    if _teacher_used(s) and isinstance(mult, list) and mult:
        why = "the TransFusion teacher needs (2**(len(channel_mult)-1)); it is data.image_size"
        _multiple(s, "teacher.params.net.image_size", 2 ** (len(mult) - 1), why)
    _check_hysteresis(s)
    accelerators = {s.get("trainer.accelerator"), s.get("teacher.trainer.accelerator")}
    if accelerators & {"gpu", "cuda"}:
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                f"trainer.accelerator={s.get('trainer.accelerator')} but no CUDA GPU is visible — use "
                f"trainer=cpu"
            )


def _check_hysteresis(s: Flat) -> None:
    low, high = s.get("mask.threshold.low_quantile"), s.get("mask.threshold.quantile")
    hysteresis = _pseudo(s) and s.get("mask.threshold.strategy") == "hysteresis"
    if hysteresis and None not in (low, high) and low > high:
        raise UserError(
            f"mask.threshold.low_quantile={low} is above mask.threshold.quantile={high} — the low threshold "
            "of the hysteresis must not exceed the high one"
        )
