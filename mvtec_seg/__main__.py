"""Command line: `python -m mvtec_seg [overrides]` (Hydra). A thin wrapper around `mvtec_seg.train.train`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from mvtec_seg.errors import UserError

log = logging.getLogger("mvtec_seg")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from mvtec_seg.train import train

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun and cfg.get("group") is None:  # W&B groups a sweep's runs by its folder
        with open_dict(cfg):
            cfg.group = Path(hc.sweep.dir).name
    try:
        summary = train(cfg)
    except UserError as err:
        if multirun:  # one bad job must not stop the sweep
            log.error("job %s failed: %s", cfg.task_name, err)
            return None
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        if multirun:
            log.exception("job %s failed; the sweep goes on", cfg.task_name)
            return None
        raise
    value = summary.get("metrics", {}).get("test/pixel_AUPRO")
    return float(value) if value is not None else None


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time unless the user asks
    _main()


if __name__ == "__main__":
    main()
