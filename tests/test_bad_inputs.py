"""The bad-input battery: each broken dataset or setting stops with one `error:` line that names the path
or setting and the fix, a non-zero exit and no traceback.

Every case runs in-process (`train(cfg)` raising `UserError`, or the CLI wrapper around it); one real process
per class of error proves the same at the command line: `test_cli_exit_code_and_no_traceback` (a Hydra error,
a folder Hydra cannot write) and `test_run_identity.py` (a `UserError` before Hydra writes anything).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import _save, compose_cfg, make_fake_mvtec, run_cli
from PIL import Image

from mvtec_seg import __main__ as cli
from mvtec_seg import io_utils
from mvtec_seg.data.datamodule import MVTecDataModule
from mvtec_seg.data.mvtec import DEFAULT_MAX_IMAGE_PIXELS, scan_category
from mvtec_seg.errors import UserError
from mvtec_seg.train import train

BASE = ["category=custom", "category.name=widget", "debug=fast", "data.image_size=32"]


@pytest.fixture
def widget(tmp_path: Path) -> Path:
    return make_fake_mvtec(tmp_path / "data", name="widget")


def _cfg(tmp_path: Path, root: Path, *extra: str):
    return compose_cfg(tmp_path, [f"data.root={root}", *BASE, *extra])


def _user_error(cfg, *expected: str) -> str:
    """train(cfg) stops with one line holding `expected` and a fix (after the dash), before any training."""
    with pytest.raises(UserError) as err:
        train(cfg)
    msg = str(err.value)
    assert "\n" not in msg and " — " in msg, msg
    for part in expected:
        assert part in msg, msg
    assert not list(Path(cfg.paths.run_dir).rglob("*.ckpt"))
    return msg


def _cli(capsys, run: Callable[[], object]) -> tuple[int, list[str]]:
    """`run` inside the CLI's error handling (`main()` minus Hydra's argv parsing, which needs its own
    process): (exit code, `error:` lines). `test_cli_exit_code_and_no_traceback` runs the real thing."""
    with pytest.raises(SystemExit) as stop, cli.one_line_errors():
        run()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return stop.value.code, [ln for ln in err.splitlines() if ln.startswith("error:")]


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot write to: chmod 555, or (as root, whom modes do not stop) under /sys."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            (candidate / "probe").mkdir()
        except OSError:
            return candidate / "mvtec_seg_readonly"
        (candidate / "probe").rmdir()
    pytest.skip("no folder here is read-only to this process")


# --- broken data trees: train(cfg) stops with the UserError, naming the file -----------------------------------


def _empty_train(cat: Path) -> str:
    for p in (cat / "train" / "good").iterdir():
        p.unlink()
    return "train/good is missing or has no images"


def _no_gt_folder(cat: Path) -> str:
    shutil.rmtree(cat / "ground_truth" / "hole")
    return "test/hole has no ground-truth folder"


def _mask_missing(cat: Path) -> str:
    (cat / "ground_truth" / "hole" / "001_mask.png").unlink()
    return "missing mask"


def _mask_without_image(cat: Path) -> str:
    (cat / "test" / "hole" / "001.png").unlink()
    return "001_mask.png has no test image"


def _mask_other_size(cat: Path) -> str:
    _save(cat / "ground_truth" / "scratch" / "002_mask.png", np.zeros((20, 30), np.uint8))
    return "002_mask.png is 30x20 but its image is 40x40"


def _corrupt_png(cat: Path) -> str:
    png = cat / "train" / "good" / "003.png"
    png.write_bytes(png.read_bytes()[:200])  # truncated
    return "cannot read image"


def _not_an_image(cat: Path) -> str:
    (cat / "test" / "good" / "001.png").write_text("these are notes, not pixels\n")
    return "cannot read image"


def _empty_image(cat: Path) -> str:
    (cat / "test" / "scratch" / "000.png").write_bytes(b"")
    return "000.png is an empty file (0 bytes)"


def _symlink_loop(cat: Path) -> str:
    os.symlink("loop.png", cat / "train" / "good" / "loop.png")
    return "train/good/loop.png is a symlink that leads nowhere"


def _folder_symlink_loop(cat: Path) -> str:
    os.symlink("crack", cat / "test" / "crack")
    return "test/crack is a symlink that leads nowhere"


DATA_CASES: dict[str, Callable[[Path], str]] = {
    "empty_train_good": _empty_train,
    "defect_without_ground_truth_folder": _no_gt_folder,
    "mask_missing_for_one_image": _mask_missing,
    "mask_for_a_missing_image": _mask_without_image,
    "mask_of_another_size": _mask_other_size,
    "corrupt_png": _corrupt_png,
    "non_image_file": _not_an_image,
    "empty_image_file": _empty_image,
    "symlink_loop": _symlink_loop,
    "folder_symlink_loop": _folder_symlink_loop,
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_broken_tree_is_one_line_naming_the_file(tmp_path, widget, case):
    expected = DATA_CASES[case](widget)
    msg = _user_error(_cfg(tmp_path, widget.parent), expected)
    assert str(widget) in msg


def test_missing_root(tmp_path):
    _user_error(_cfg(tmp_path, tmp_path / "nowhere"), f"category folder not found: {tmp_path / 'nowhere'}")


def test_unknown_category(tmp_path, capsys):
    code, lines = _cli(capsys, lambda: compose_cfg(tmp_path, ["category=nope"]))
    assert code == 2 and len(lines) == 1
    assert "Could not find 'category/nope'" in lines[0] and "bottle" in lines[0]  # lists the options


def test_other_files_are_ignored_not_read(widget):
    """Files without an image suffix (notes, `Thumbs.db`) are not part of the data: documented, not an error."""
    before = scan_category(widget)
    (widget / "train" / "good" / "notes.txt").write_text("camera 2\n")
    (widget / "test" / "hole" / "Thumbs.db").write_bytes(b"\0" * 10)
    assert scan_category(widget) == before


def test_non_binary_mask_is_thresholded_with_a_warning(tmp_path, widget, caplog):
    """Decision: a mask with more than two grey levels (anti-aliased, JPEG) is binarised at half its type's
    range, and the decode warns once naming the first such file, and names every file whose binarisation
    dropped more than a few non-zero pixels; it is not refused."""
    soft = np.zeros((40, 40), np.uint8)
    soft[10:20, 10:20] = 200
    soft[20:30, 10:20] = 60  # below half the range: not defect
    _save(widget / "ground_truth" / "hole" / "000_mask.png", soft)
    dm = MVTecDataModule(widget, tmp_path / "cache", "widget", image_size=40)
    with caplog.at_level(logging.WARNING, logger="mvtec_seg.data.cache"):
        dm.prepare()
    lines = [r.getMessage() for r in caplog.records if "not binary" in r.getMessage()]
    assert len(lines) == 1 and "hole/000_mask.png" in lines[0]
    (dropped,) = [r.getMessage() for r in caplog.records if "read as normal" in r.getMessage()]
    assert "hole/000_mask.png (100 px)" in dropped  # the 60-grey square
    row = next(
        i for i, r in enumerate(dm.manifest["samples"]) if r["gt_mask"] == "ground_truth/hole/000_mask.png"
    )
    mask = np.asarray(dm.gt_masks[row])
    assert mask[10:20, 10:20].all() and not mask[20:30].any() and mask.sum() == 100


# --- outputs that cannot be written ----------------------------------------------------------------------------


def test_read_only_output_folder(tmp_path, widget, capsys):
    folder = _unwritable(tmp_path)
    cfg = _cfg(tmp_path, widget.parent, f"paths.run_dir={folder / 'run'}")
    code, lines = _cli(capsys, lambda: train(cfg))
    assert code == 2 and len(lines) == 1, lines
    assert f"cannot access {folder}" in lines[0] and "paths.output_dir" in lines[0]


def test_full_disk_during_a_write(tmp_path, widget, monkeypatch):
    """Simulated: the atomic writer's write raises ENOSPC. One line naming the file; no half-written file."""

    def full(fd: int, data: bytes) -> None:
        os.close(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io_utils.atomic, "_write_file", full)
    cfg = _cfg(tmp_path, widget.parent)
    msg = _user_error(cfg, "cannot write", "No space left on device", "config.yaml")
    assert str(Path(cfg.paths.run_dir)) in msg
    assert not list(Path(cfg.paths.run_dir).glob(".*.tmp"))


def test_full_disk_through_the_cli(tmp_path, widget, monkeypatch, capsys):
    def full(fd: int, data: bytes) -> None:
        os.close(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io_utils.atomic, "_write_file", full)
    code, lines = _cli(capsys, lambda: train(_cfg(tmp_path, widget.parent)))
    assert code == 2 and len(lines) == 1 and "No space left on device" in lines[0]


# --- settings --------------------------------------------------------------------------------------------------


def test_config_typo(tmp_path, capsys):
    code, lines = _cli(capsys, lambda: compose_cfg(tmp_path, ["modle=unet"]))
    assert code == 2 and len(lines) == 1
    assert "unknown setting 'modle'" in lines[0] and "did you mean model=unet?" in lines[0]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.image_size=-1", "data.image_size=-1 must be a positive"),
        ("data.split_ratios=[0.7,0.1,0.1]", "data.split_ratios=[0.7, 0.1, 0.1] must be"),
        ("mask.threshold.quantile=2", "mask.threshold.quantile=2 must be a fraction between 0 and 1"),
        ("mask.gate.quantile=-0.1", "mask.gate.quantile=-0.1 must be a fraction between 0 and 1"),
        ("mask.target=hardest", "mask.target='hardest' is not one of ['hard', 'ignore', 'soft']"),
        ("mask.regions.min_area=-5", "mask.regions.min_area=-5 must be a whole number >= 0"),
        (
            "mask.threshold.strategy=hysteresis mask.threshold.low_quantile=0.999",
            "mask.threshold.low_quantile=0.999 is above mask.threshold.quantile=0.995",
        ),
    ],
)
def test_out_of_range_settings(tmp_path, widget, override, expected):
    extra = ["mask=pseudo"] if override.startswith("mask.") else []
    _user_error(_cfg(tmp_path, widget.parent, *extra, *override.split()), expected)
    assert not (Path(tmp_path) / "cache").exists()  # stopped before reading anything


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, override, expected",
    [  # a Hydra error and a write Hydra makes; a UserError before Hydra writes: test_run_identity.py
        ("typo", "modle=unet", "unknown setting 'modle'"),
        ("read_only_output", "hydra.run.dir={ro}/run", "cannot access {ro}"),
    ],
)
def test_cli_exit_code_and_no_traceback(tmp_path, widget, case, override, expected):
    ro = _unwritable(tmp_path) if "{ro}" in override else None
    args = [
        f"data.root={widget.parent}",
        *BASE,
        f"paths.output_dir={tmp_path / 'out'}",
        override.format(ro=ro),
    ]
    proc = run_cli(args, tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expected.format(ro=ro) in lines[0], proc.stderr[-2000:]


# --- every setting and path, validated before any work ---------------------------------------------------------


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return path


SETTING_CASES: dict[str, tuple[list[str], list[str]]] = {  # overrides -> what the line names
    "iou_threshold": (["evaluation.iou_threshold=5"], ["evaluation.iou_threshold=5", "between 0 and 1"]),
    "fpr_limit": (["evaluation.fpr_limit=0"], ["evaluation.fpr_limit=0", "(0, 1]"]),
    "kind": (["category.kind=textur"], ["category.kind='textur'", "['object', 'texture']"]),
    "batch_size": (["data.batch_size=0"], ["data.batch_size=0", ">= 1"]),
    "eval_batch_size": (["data.eval_batch_size=-2"], ["data.eval_batch_size=-2"]),
    "seed_text": (["seed=abc"], ["seed='abc'", "whole number"]),
    "seed_negative": (["seed=-1"], ["seed=-1", "whole number from 0"]),
    "seed_float": (["seed=1.5"], ["seed=1.5"]),
    "workers": (["data.num_workers=-1"], ["data.num_workers=-1"]),
    "protocol": (["data.protocol=mine"], ["data.protocol='mine'", "['split', 'official']"]),
    "crop": (["data.train_crop=0"], ["data.train_crop=0 must be a whole number >= 1"]),
    "deeplab_crop": (["model=deeplab", "data.train_crop=24"], ["data.train_crop=24 is not a multiple of 16"]),
    "accelerator": (["trainer.accelerator=tpu"], ["trainer.accelerator='tpu'"]),
    "precision": (["trainer.precision=8-bit"], ["trainer.precision='8-bit'"]),
    "epochs_text": (["model.max_epochs=many"], ["model.max_epochs='many'"]),
    "lr": (["model.params.optimizer.lr=-1"], ["model.params.optimizer.lr=-1", "positive"]),
    "deeplab_size": (["model=deeplab", "data.image_size=24"], ["data.image_size=24 is not a multiple of 16"]),
    "ckpt_missing": (["ckpt_path=/no/such.ckpt"], ["ckpt_path=/no/such.ckpt not found (no such file)"]),
    "unset_env": (["data.root=${oc.env:MVTEC_SEG_NO_SUCH_VARIABLE}"], ["data.root cannot be resolved"]),
    "custom_without_name": (["category=custom", "category.name=???"], ["category.name is not set"]),
    "teacher_texture_dir": (
        ["mask=pseudo", "teacher.params.anomalies.texture_dir=/no/dtd"],
        ["texture_dir=/no/dtd not found (no such folder)"],
    ),
    "monitor": (["checkpoint.monitor=val/acc"], ["checkpoint.monitor='val/acc'", "val/pixel_AP"]),
    "trainer_key": (["+trainer.max_epoch=3"], ["trainer.max_epoch is not a setting", "trainer.max_epochs?"]),
    "net_key": (["+model.params.net.encdr=1"], ["model.params.net.encdr is not a setting", "encoder_name"]),
    "encoder": (["model.params.net.encoder_name=resnet17"], ["encoder_name='resnet17'", "resnet18"]),
    "optimizer": (["model.params.optimizer._target_=torch.optim.Adamm"], ["cannot be imported"]),
    "smoothing": (["mask=pseudo", "teacher.params.net.smoothing_kernel=4"], ["smoothing_kernel=4", "odd"]),
    "select_auto_without_candidates": (
        ["mask=pseudo", "mask.select=auto"],
        ["mask.candidates=[] must be a non-empty list of mask settings"],
    ),
    "run_dir_below_a_file": (["paths.run_dir={file}/run"], ["paths.run_dir=", "{file} is a file"]),
    "cache_is_a_file": (["paths.cache_dir={file}"], ["paths.cache_dir=", "is a file, not a folder"]),
    "root_is_a_file": (["data.root={file}"], ["data.root=", "is a file"]),
}


@pytest.mark.parametrize("case", SETTING_CASES)
def test_every_setting_is_checked_before_any_work(tmp_path, widget, case):
    overrides, expected = SETTING_CASES[case]
    file = _a_file(tmp_path)
    cfg = _cfg(tmp_path, widget.parent, *(o.replace("{file}", str(file)) for o in overrides))
    _user_error(cfg, *(e.replace("{file}", str(file)) for e in expected))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # nothing made or read


def test_a_system_folder_is_refused(tmp_path, widget):
    for folder in (Path("/proc/mvtec_seg_run"), Path("/sys/mvtec_seg_run")):
        cfg = _cfg(tmp_path, widget.parent, f"paths.run_dir={folder}")
        _user_error(cfg, f"paths.run_dir='{folder}' cannot be a folder")


def test_an_image_above_the_decompression_bomb_limit(tmp_path, widget):
    msg = _user_error(_cfg(tmp_path, widget.parent, "data.max_image_pixels=100"), "decompression bomb")
    assert "data.max_image_pixels" in msg and str(widget) in msg
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS  # the limit was the job's, not the process's
