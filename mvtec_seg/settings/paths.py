"""The folders a run writes can be folders: checked (by probing, creating nothing) before any work."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mvtec_seg.errors import UserError
from mvtec_seg.io_utils import check_name
from mvtec_seg.settings.rules import Flat, generated, shown


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
        ["data.root"] if generated(settings) else []
    )
    for key in ("paths.run_dir", "paths.cache_dir", "paths.output_dir", "data.root"):
        if settings.get(key) is not None:  # written into every record of the run: UTF-8 only
            check_name(str(settings[key]), f"{'hydra.run.dir' if key == 'paths.run_dir' else key}=")
    for key in keys:
        value = settings.get(key)
        if value is None:
            continue
        problem = folder_problem(Path(str(value)))
        if problem:
            name = "hydra.run.dir" if key == "paths.run_dir" else key
            raise UserError(
                f"{shown(key, value)} cannot be a folder: {problem} — point {name} at a folder you can write "
                f"(or set paths.output_dir / paths.cache_dir; MVTEC_SEG_OUTPUTS, MVTEC_SEG_CACHE)"
            )
    root = settings.get("data.root")
    if root is not None and not generated(settings) and Path(str(root)).is_file():
        name = settings.get("category.name")
        raise UserError(
            f"{shown('data.root', root)} is a file — set data.root to the folder that holds {name}/"
        )
