"""`mask.select=auto`: among a declared grid of mask settings, the one whose student finds the synthetic
validation set's defects best, chosen without GT.

Each candidate overrides some `mask.*` settings (`mask.candidates`, a list of dicts); its targets are built
as a fixed run would build them (cached, shared), one student is trained on them, and the student's tested
checkpoint is scored on the synthetic validation set (`synthetic_val.synthetic_scores`). The best
`pixel_AUPRO` wins (then `pixel_AP`, then the earlier candidate). Every candidate's settings, scores and
checkpoint are recorded; so are its test metrics, for the benchmarks' analysis of the criterion: they are
computed after the choice and never enter it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from mvtec_seg.pseudo.rules import strategy_label

CRITERION = ("pixel_AUPRO", "pixel_AP")
MODES: tuple[str, ...] = ("fixed", "auto")
"""`mask.select`: the mask settings as given, or the best of `mask.candidates`."""


def candidate_configs(cfg: DictConfig) -> list[DictConfig]:
    """The run config of every candidate: `cfg.mask` with the candidate's settings merged in, fixed.
    `mask.candidates` is a non-empty list of dicts (checked with every setting, `settings.rules`)."""
    out = []
    for cand in OmegaConf.to_container(cfg.mask.candidates, resolve=True):
        c = copy.deepcopy(cfg)
        with open_dict(c):
            c.mask = OmegaConf.merge(c.mask, cand, {"select": "fixed", "candidates": []})
        out.append(c)
    return out


def _key(scores: dict | None) -> tuple[float, ...]:
    values = [float((scores or {}).get(k, math.nan)) for k in CRITERION]
    return tuple(v if math.isfinite(v) else -math.inf for v in values)


def choose(records: list[dict]) -> int:
    """The index of the best candidate by `CRITERION` on its synthetic-val scores (the first on a tie)."""
    best = 0
    for i, r in enumerate(records):
        if _key(r["synthetic_val"]) > _key(records[best]["synthetic_val"]):
            best = i
    return best


def select(
    cfg: DictConfig, fit: Callable[[DictConfig, int], dict]
) -> tuple[int, list[dict], list[DictConfig]]:
    """Fit every candidate (`fit(candidate_cfg, index)` returns its record: `synthetic_val`, `checkpoint`,
    `pseudo`, `test_metrics`, ...) and return the chosen index, the records, labelled, and the candidates'
    run configs."""
    records = []
    configs = candidate_configs(cfg)
    for i, c in enumerate(configs):
        record = fit(c, i)
        settings = OmegaConf.to_container(c.mask, resolve=True)
        label = strategy_label(settings, int(settings.get("rounds") or 0))
        records.append({"index": i, "label": label, "settings": settings, **record})
    return choose(records), records, configs
