"""Compose the project's Hydra config from Python (notebooks, benchmarks, tests) without the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent / "conf"


def compose_config(overrides: list[str] | None = None, run_dir: str | Path | None = None) -> DictConfig:
    """The composed config for these overrides; `run_dir` replaces the Hydra-only `paths.run_dir`."""
    extra = [f"paths.run_dir={run_dir}"] if run_dir is not None else []
    with _own_hydra(), initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []) + extra)


@contextmanager
def _own_hydra() -> Iterator[None]:
    """Compose beside a running Hydra app (the settings check composes the defaults inside a run): its
    global state is set aside for the compose and put back after."""
    gh = GlobalHydra.instance()
    running = gh.hydra if gh.is_initialized() else None
    gh.clear()
    try:
        yield
    finally:
        GlobalHydra.instance().clear()
        if running is not None:
            GlobalHydra.instance().initialize(running)


def category_options() -> dict[str, dict[str, Any]]:
    """Every option of the `category` group (`bottle`, `visa/pcb1`, ...) and its file's settings, unresolved:
    the YAML files are the one list of category names."""
    root = CONF_DIR / "category"
    return {
        path.relative_to(root).with_suffix("").as_posix(): OmegaConf.to_container(OmegaConf.load(path))
        for path in sorted(root.rglob("*.yaml"))
    }


def setting_names() -> list[str]:
    """The config groups and the dotted keys of `config.yaml` (for 'did you mean' on a typo)."""
    groups = [p.name for p in CONF_DIR.iterdir() if p.is_dir()]
    keys: list[str] = []

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            keys.append(name)
            if isinstance(value, dict) and key != "hydra":
                walk(value, f"{name}.")

    walk(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"), resolve=False), "")
    return sorted(set(groups) | set(keys) - {"defaults"})
