"""Every user-facing setting checked before any work, by one table: a bad value is one line naming the
setting, what it must be and an example, never a traceback halfway through a run.

`resolved_settings` turns the composed config into `{dotted key: value}` (an interpolation that cannot be
resolved, a mandatory value left unset, are one line too); `check_paths` (`paths`) makes sure the folders a
run writes can be folders; `check_settings` applies `rules.RULES`, the lists of names the layers above pass
in, and the checks that relate settings; `check_keys` refuses a key no constructor takes (`+trainer.foo=1`).
"""

from __future__ import annotations

import difflib
import inspect
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from mvtec_seg.data.layouts import DEFAULT_LAYOUT, check_visa_split_applies
from mvtec_seg.data.sources import mask_source
from mvtec_seg.errors import UserError
from mvtec_seg.identity import flat_settings
from mvtec_seg.metrics import SYNTHETIC_PREFIX
from mvtec_seg.settings.paths import check_paths, folder_problem
from mvtec_seg.settings.rules import (
    RULES,
    TARGETS,
    Flat,
    example,
    fit,
    is_int,
    is_number,
    pseudo,
    shown,
    teacher_used,
)

log = logging.getLogger(__name__)

__all__ = ["check_keys", "check_paths", "check_settings", "folder_problem", "resolved_settings"]


def resolved_settings(cfg: DictConfig) -> dict[str, Any]:
    """The config resolved and flattened; an unresolvable or unset value is one line naming it."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        text = " ".join(str(err).split())
        missing = re.search(r"Missing mandatory value: ?([\w.]+)", text)
        key = missing.group(1) if missing else (err.full_key or "a setting")
        if missing and err.full_key and err.full_key.endswith(f".{key}"):  # a nested value: its dotted name
            key = err.full_key
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


def check_keys(settings: Flat, takers: Mapping[str, Callable[..., Any]]) -> None:
    """A key under a node whose values become a constructor's arguments (`trainer` -> `pl.Trainer`,
    `model.params.net` -> the network) must be one of that constructor's parameters: `+trainer.foo=1` is one
    line here, not a TypeError once the run has read its data."""
    for prefix, taker in takers.items():
        params = inspect.signature(taker).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        names = sorted({k[len(prefix) + 1 :].split(".")[0] for k in settings if k.startswith(prefix + ".")})
        unknown = [n for n in names if n not in params]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(params), n=1)
            known = (
                f"known: {', '.join(params)}" if len(params) <= 12 else f"see {taker.__name__}'s arguments"
            )
            hint = f"did you mean {prefix}.{close[0]}?" if close else known
            raise UserError(f"{prefix}.{unknown[0]} is not a setting of {prefix} — {hint}")


def check_settings(settings: Flat, choices: Mapping[str, tuple[Any, ...]] = {}) -> None:  # noqa: B006
    """Every rule of `RULES` (for the keys present), the `choices` lists given by the layers above, and the
    checks that relate settings: training happens, sizes fit the networks, files and folders exist."""
    for rule in RULES:
        check, must = rule.spec
        if rule.key in settings and rule.when(settings) and not check(settings[rule.key]):
            raise UserError(
                f"{shown(rule.key, settings[rule.key])} must be {must} — set it to e.g. {example(rule)}"
            )
    for key, allowed in choices.items():
        if key in settings and settings[key] is not None and settings[key] not in allowed:
            if len(allowed) <= 12:
                raise UserError(f"{key}={settings[key]!r} is not one of {list(allowed)} — pick one of those")
            close = difflib.get_close_matches(str(settings[key]), [str(a) for a in allowed], n=3)
            raise UserError(
                f"{key}={settings[key]!r} is not one of the {len(allowed)} known names — pick one"
                + (f", e.g. {', '.join(close)}" if close else f", e.g. {', '.join(map(str, allowed[:3]))}")
            )
    _check_split_ratios(settings.get("data.split_ratios"))
    _check_relations(settings)


def _check_split_ratios(ratios: Any) -> None:
    if ratios is None:
        return
    ok = isinstance(ratios, list) and len(ratios) == 3 and all(is_number(r) and r >= 0 for r in ratios)
    if not ok or ratios[0] <= 0 or abs(sum(ratios) - 1.0) > 1e-6:
        raise UserError(
            f"data.split_ratios={list(ratios) if isinstance(ratios, list) else ratios!r} must be three "
            f"non-negative fractions (train, val, test) with train > 0 that sum to 1 — set it to e.g. "
            f"[0.7,0.1,0.2]"
        )


def _trains(settings: Flat, epochs_key: str, limit_key: str) -> bool:
    steps = settings.get(epochs_key.rsplit(".", 1)[0] + ".max_steps") if "trainer." in epochs_key else None
    return settings.get(epochs_key) != 0 and settings.get(limit_key) not in (0, 0.0) and steps != 0


def _importable(key: str, value: Any) -> None:
    """An optimizer or scheduler `_target_` names something that imports (else it fails mid-training)."""
    from hydra.utils import get_method

    try:
        get_method(str(value))
    except Exception:
        raise UserError(
            f"{key}={value!r} cannot be imported — name a class such as torch.optim.AdamW"
        ) from None


def _multiple(s: Flat, key: str, factor: int, why: str) -> None:
    value = s.get(key)
    if is_int(value) and value % factor:
        nearest = max(factor, round(value / factor) * factor)
        raise UserError(f"{key}={value} is not a multiple of {factor}, which {why} — use e.g. {nearest}")


def _check_relations(s: Flat) -> None:
    """Training happens, sizes fit the networks, named files and folders exist, a GPU is there."""
    if fit(s) and s.get("ckpt_path") is None:
        epochs = "trainer.max_epochs" if s.get("trainer.max_epochs") is not None else "model.max_epochs"
        if not _trains(s, epochs, "trainer.limit_train_batches"):
            steps = f", trainer.max_steps={s['trainer.max_steps']}" if "trainer.max_steps" in s else ""
            raise UserError(
                f"{epochs}={s.get(epochs)} with trainer.limit_train_batches="
                f"{s.get('trainer.limit_train_batches')}{steps}: the model would be tested untrained — train at "
                f"least one epoch and batch, or pass ckpt_path=<checkpoint> to test a trained one"
            )
    teacher_epochs = s.get("teacher.trainer.max_epochs")
    if s.get("model.source") == "teacher" and s.get("model.max_epochs") != teacher_epochs:
        # a warning, not an error: one experiment file may set the students' epochs for every job of a comparison
        log.warning(
            "model.max_epochs=%s is not used with model=transfusion: its epochs are teacher.trainer.max_epochs "
            "(now %s)",
            s.get("model.max_epochs"),
            teacher_epochs,
        )
    untrained = not _trains(s, "teacher.trainer.max_epochs", "teacher.trainer.limit_train_batches")
    if teacher_used(s) and s.get("teacher.checkpoint") is None and untrained:
        raise UserError(
            f"teacher.trainer.max_epochs={teacher_epochs} with teacher.trainer.limit_train_batches="
            f"{s.get('teacher.trainer.limit_train_batches')}: the TransFusion teacher would be used "
            f"untrained — train it at least one epoch and batch, or pass teacher.checkpoint=<file>"
        )
    files = [("ckpt_path", Path.is_file, "file")]
    if teacher_used(s):
        files += [("teacher.checkpoint", Path.is_file, "file")]
        files += [
            (f"teacher.params.anomalies.{k}", Path.is_dir, "folder")
            for k in ("texture_dir", "foreground_dir")
        ]
    for key, exists, what in files:
        if s.get(key) is not None and not exists(Path(str(s[key]))):
            raise UserError(f"{key}={s[key]} not found (no such {what}) — pass an existing {what}, or null")
    for key in TARGETS:
        if s.get(key) is not None and (fit(s) if key.startswith("model.") else teacher_used(s)):
            _importable(key, s[key])
    crop, size = s.get("data.train_crop"), s["data.image_size"]
    cropped = crop is not None and crop < size  # a crop of the whole image or more is no crop
    if fit(s) and str(s.get("model.params.net.arch", "")).lower().startswith("deeplab"):
        for key in ("data.image_size", *(["data.train_crop"] if cropped else [])):
            _multiple(s, key, 16, "DeepLabv3+ needs (its encoder's output stride)")
    mult = s.get("teacher.params.net.channel_mult")
    if teacher_used(s) and isinstance(mult, list) and mult:
        why = "the TransFusion teacher needs (2**(len(channel_mult)-1)); it is data.image_size"
        _multiple(s, "teacher.params.net.image_size", 2 ** (len(mult) - 1), why)
    if "data.visa_split" in s:
        check_visa_split_applies(
            s.get("data.layout", DEFAULT_LAYOUT), s.get("data.protocol", "split"), s["data.visa_split"]
        )
    _check_hysteresis(s)
    _check_synthetic_monitor(s)
    _check_synthetic_only(s)
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
    hysteresis = pseudo(s) and s.get("mask.threshold.strategy") == "hysteresis"
    if hysteresis and None not in (low, high) and low > high:
        raise UserError(
            f"mask.threshold.low_quantile={low} is above mask.threshold.quantile={high} — the low threshold "
            "of the hysteresis must not exceed the high one"
        )


def _check_synthetic_only(s: Flat) -> None:
    """`mask=synthetic_only` trains on synthetic defects alone: without them it would have no target."""
    fraction = s.get("mask.synthetic_fraction")
    if fit(s) and s.get("mask.name") == "synthetic_only" and not (is_number(fraction) and fraction > 0):
        raise UserError(
            f"mask.synthetic_fraction={fraction} leaves mask=synthetic_only without any target — set "
            "mask.synthetic_fraction=0.5 (a number in (0, 1])"
        )


def _check_synthetic_monitor(s: Flat) -> None:
    """`val/synthetic_*` is logged only where the synthetic validation set is built: a fitted model with
    `synthetic_val.enabled=true`, or `auto` with `mask=pseudo`."""
    monitor = s.get("checkpoint.monitor")
    if not (fit(s) and isinstance(monitor, str) and monitor.startswith(f"val/{SYNTHETIC_PREFIX}")):
        return
    enabled = s.get("synthetic_val.enabled", "auto")
    if enabled is False or (enabled == "auto" and not mask_source(s).synthetic_val):
        raise UserError(
            f"checkpoint.monitor={monitor} needs the synthetic validation set, which this run does not build "
            f"(synthetic_val.enabled={enabled!r}, mask={s.get('mask.name')}) — use mask=pseudo or synthetic_only, "
            "synthetic_val.enabled=true, or monitor val/pixel_AP"
        )
