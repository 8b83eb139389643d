"""A regular install runs: the wheel, installed into a fresh environment without an index (the
dependencies come from this environment), composes its configs and dry-runs from an empty folder."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _sources(dest: Path) -> Path:
    """The repository's tracked files (a build writes into its source tree: never into the checkout)."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.slow
def test_the_wheel_runs_from_an_empty_folder(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to build from")
    src = _sources(tmp_path / "src")
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("mvtec_seg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mvtec_seg/conf/config.yaml" in names and "mvtec_seg/conf/mask/pseudo.yaml" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [*pip, "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    new_site = next((venv / "lib").glob("python*/site-packages"))
    # the dependencies from this environment, after the new site (its mvtec_seg wins)
    (new_site / "dev_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": ""}
    run = subprocess.run(
        [str(python), "-m", "mvtec_seg", "dry_run=true", "data.image_size=32", "hydra.run.dir=run"],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((empty / "run" / "summary.json").read_text())
    assert summary["status"] == "dry_run" and summary["params"] > 0
    where = subprocess.run(
        [str(python), "-c", "import mvtec_seg; print(mvtec_seg.__file__)"],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    assert str(new_site) in where  # the installed copy ran, not the checkout
    assert not (ROOT / "build").exists()
