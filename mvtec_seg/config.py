"""Compose the project's Hydra config from Python (notebooks, benchmarks, tests) without the CLI."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str] | None = None, run_dir: str | Path | None = None) -> DictConfig:
    """The composed config for these overrides; `run_dir` replaces the Hydra-only `paths.run_dir`."""
    extra = [f"paths.run_dir={run_dir}"] if run_dir is not None else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []) + extra)
