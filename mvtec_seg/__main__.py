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

from mvtec_seg import cli
from mvtec_seg.errors import UserError
from mvtec_seg.interrupt import Interrupted, install_handlers

log = logging.getLogger("mvtec_seg")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
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
        if multirun:  # one bad job must not stop the sweep; `sweep.FailedJobs` lists it at the end
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


def _setting_names() -> list[str]:
    from mvtec_seg.config import setting_names

    return setting_names()


def one_line_errors():
    """The shared one-line error wrapper, with the run config's settings for typo hints."""
    return cli.one_line_errors(_setting_names, "`python -m mvtec_seg --help` lists the groups and settings")


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time unless the user asks
    # Hydra prints its own errors over several lines; let them through to be said here in one.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    install_handlers()
    try:
        with one_line_errors():
            _main()
    except Interrupted as err:  # SIGTERM/SIGINT at any stage: one line, exit 143/130
        print(f"error: {err.message()}", file=sys.stderr)
        exit_now(err.exit_code)


def exit_now(code: int) -> None:
    """Exit at once: every `finally` has run (summary written, W&B finished, Lightning torn down) and
    every artefact is renamed into place or not at all; what is left, the interpreter's teardown of torch
    and friends, takes seconds on a busy machine, longer than a scheduler's grace period."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
