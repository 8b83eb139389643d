"""`python -m mvtec_seg.predict run=<run folder or .ckpt> input=<folder, file or glob> [output=<folder>]`:
a trained model on new images.

Other settings (key=value like the rest of the CLI): `threshold=` (default: the run's
`decision_threshold` from `summary.json`), `trainer=auto|cpu|gpu` (auto: the GPU when present),
`batch_size=` (default: the run's `data.eval_batch_size`), `image_size=` (only for a checkpoint outside a
run folder whose input size is not recorded), `overwrite=true` (replace a non-empty output folder; without
it such a folder is refused), `max_image_pixels=` (Pillow's decompression-bomb limit; default Pillow's).

Every argument, the model and every input's header are checked before anything is written; the files are
written into a temporary sibling folder that becomes `output` only when every image went through.

Images are read and resized exactly as in training (`data.mvtec.load_rgb`: grey, RGBA and 16-bit become
RGB; bilinear to `data.image_size`); maps are computed in fp32 and resized back to each input's size.
Per image, in `output` (default `<run>/predictions/`), named after the input's path below the input folder
(`test/crack/000.png` -> `test_crack_000`):

- `<name>_map.npy`: the anomaly map, float32 `[H,W]` at the input's size (exact values, any range; for
  segmenters probabilities);
- `<name>_overlay.png`: the map in 'jet' over the image on the fixed scale [0, 1] (`viz.heat_overlay`);
- `<name>_mask.png`: 8-bit, 255 where `map >= threshold`;
- a row of `predictions.csv`: `path, name, image_score` (max of the map at the model's size, the score
  the run's metrics use), `decision` (`anomalous` when `image_score >= threshold`, else `normal`),
  `defect_area_px` (mask pixels at the input's size).

`format=mvtec_ad2` (input: an MVTec AD 2 category folder) writes what its evaluation server takes instead:
`anomaly_images/<category>/<split>/<stem>.tiff` (float16 maps at the input's size) and
`anomaly_images_thresholded/<category>/<split>/<stem>.png` (0/255) for `test_private` and
`test_private_mixed`, and nothing else (the server refuses other files); the default threshold is the one the
run chose on normal images alone (`mvtec_ad2.json`; `threshold=` overrides it); `output` defaults to
`<run>/submission/`: point every category's run at one `output=` folder to build the whole submission. The
files are named after the run's category (`category.name`), not the input folder's name.

`check=true` (with `format=mvtec_ad2`) then checks the whole submission folder as MVTec's upload checker does
(the eight categories, both private splits, one file per private image, named after it and at its size, and
nothing else; 2-D float16 TIFFs, 0/255 PNGs), against the categories beside `input`: one line per problem
and exit code 1, or one line saying it is complete. Without `run=`, `check=true output=<submission folder>
[input=<the folder holding the eight categories>]` only checks.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from mvtec_seg.cli import command_args, run_command
from mvtec_seg.data.mvtec import IMAGE_SUFFIXES, image_hw, load_rgb, pixel_limit, resize_rgb
from mvtec_seg.data.mvtec_ad2 import (
    SUBMISSION_MAPS,
    check_submission,
    private_test_images,
    submission_categories,
    write_submission_files,
)
from mvtec_seg.errors import UserError
from mvtec_seg.inference import Trained, load_trained, pick_device, resize_map
from mvtec_seg.io_utils import atomic_save_png, atomic_write_bytes, atomic_write_text, check_name, flat_name
from mvtec_seg.layout_metrics import MVTEC_AD2_RECORD, recorded_threshold
from mvtec_seg.models.base import anomaly_maps
from mvtec_seg.settings import folder_problem

log = logging.getLogger(__name__)

PREDICTIONS_CSV = "predictions.csv"
CSV_COLUMNS: tuple[str, ...] = ("path", "name", "image_score", "decision", "defect_area_px")
OVERLAY_RANGE: tuple[float, float] = (0.0, 1.0)  # segmenter probabilities; TransFusion's map is in [0,1] too
FORMATS: tuple[str, ...] = ("default", "mvtec_ad2")


# ------------------------------------------------------------------------------------------------ inputs
def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _flat_name(rel: Path) -> str:
    """'test/crack/000.png' -> 'test_crack_000': one flat output folder."""
    return flat_name(rel.with_suffix("").as_posix(), "image")


def input_files(spec: str) -> list[tuple[Path, str]]:
    """(file, output name) for a folder (its images, recursively), one file, or a glob pattern."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if _is_image(p))
        if not files:
            raise UserError(f"input folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        root = path
    elif path.is_file():
        files, root = [path], path.parent
    elif glob.has_magic(spec):
        files = sorted(p for p in map(Path, glob.glob(str(path), recursive=True)) if _is_image(p))
        if not files:
            raise UserError(f"input pattern {spec!r} matches no image files")
        root = Path(_common_parent(files))
    else:
        raise UserError(f"input not found: {path} — pass input=<image folder, image file or glob pattern>")
    named, seen = [], set()
    for f in files:
        check_name(f)
        name = _flat_name(f.relative_to(root))
        base, k = name, 2
        while name in seen:  # 'a_b/c' and 'a/b_c' flatten alike
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        named.append((f, name))
    return named


def _common_parent(files: list[Path]) -> str:
    return os.path.commonpath([str(f.parent.resolve()) for f in files]) if files else "."


# ---------------------------------------------------------------------------------------------- predict
@dataclass
class Prediction:
    path: str
    name: str
    image_score: float
    decision: str
    defect_area_px: int


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def _write_outputs(out: Path, name: str, image: np.ndarray, amap: np.ndarray, threshold: float) -> int:
    """The three files of one image (map, overlay, mask) at its own size; returns the defect area."""
    from mvtec_seg.viz import heat_overlay

    full = resize_map(amap, image.shape[:2])
    mask = full >= threshold
    _save_npy(out / f"{name}_map.npy", full.astype(np.float32))
    atomic_save_png(out / f"{name}_overlay.png", heat_overlay(image, full, *OVERLAY_RANGE))
    atomic_save_png(out / f"{name}_mask.png", mask)
    return int(mask.sum())


def _write_submission(out: Path, name: str, image: np.ndarray, amap: np.ndarray, threshold: float) -> int:
    """`format=mvtec_ad2`: the map (TIFF) and its mask (PNG) at the input's size, as the server takes them."""
    full = resize_map(amap, image.shape[:2])
    mask = full >= threshold
    write_submission_files(out, name, full, mask)
    return int(mask.sum())


def _server_threshold(trained: Trained) -> float:
    """`format=mvtec_ad2`: the threshold the run chose on normal images alone, as the benchmark wants."""
    value = recorded_threshold(trained.run_dir)
    if value is None:
        raise UserError(
            f"{trained.run_dir or trained.checkpoint} records no threshold chosen on normal images "
            f"({MVTEC_AD2_RECORD}: runs with data.layout=mvtec_ad2 write it) — pass threshold=<map value>"
        )
    return value


def _server_category(trained: Trained, category_dir: Path) -> str:
    """`format=mvtec_ad2`: the category the files are named after. The run's own (`category.name` of a run
    with `data.layout=mvtec_ad2`), so a renamed input folder still gives the name the server knows; the
    input folder's name only for a bare checkpoint or a run of another layout."""
    names = submission_categories()
    folder = category_dir.name
    if trained.layout == "mvtec_ad2" and trained.category:
        if folder in names and folder != trained.category:
            raise UserError(
                f"input={category_dir} is MVTec AD 2's {folder}, but the run was trained on {trained.category} "
                f"— pass the run of {folder}, or input=<the {trained.category} folder>"
            )
        name = trained.category
    else:
        name = folder
    if name not in names:
        raise UserError(
            f"the server scores only the categories {', '.join(names)}; {name!r} (from "
            f"{'the run' if name != folder else 'the input folder'}) is none of them — pass input=<an MVTec AD 2 "
            f"category folder> and the run of that category"
        )
    return name


def _progress(total: int, batch_size: int):
    from tqdm.auto import tqdm

    # a bar only for inputs of several batches, and only on a terminal (None: tqdm checks)
    return tqdm(total=total, unit="img", desc="predict", disable=True if total <= batch_size else None)


def check_output(out: Path, overwrite: bool) -> None:
    """The output folder must be new or empty, or `overwrite=true`; it must be able to be a folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output={out} is a file — pass output=<a new folder>")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"output folder {out} is not empty — pass output=<a new folder>, or overwrite=true to replace it"
        )
    problem = folder_problem(out)
    if problem:
        raise UserError(f"output={out} cannot be a folder: {problem} — pass output=<a folder you can write>")


def _check_args(
    threshold: float | None, trainer: str, batch_size: int | None, image_size: int | None
) -> None:
    if threshold is not None and not math.isfinite(threshold):
        raise UserError(f"threshold={threshold} must be a finite number — pass a map value, e.g. 0.5")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be at least 1")
    if image_size is not None and image_size < 1:
        raise UserError(f"image_size={image_size} must be a positive whole number of pixels")
    pick_device(str(trainer))  # an unknown device, or a GPU that is not there


def predict(
    run: str | Path,
    input: str,
    output: str | Path | None = None,
    threshold: float | None = None,
    trainer: str = "auto",
    batch_size: int | None = None,
    image_size: int | None = None,
    format: str = "default",
    overwrite: bool = False,
    max_image_pixels: int | None = None,
    check: bool = False,
) -> dict[str, Any]:
    """Predict every input image; returns `{csv, output, rows, threshold, trained}` (`csv` is None for
    `format=mvtec_ad2`; with `check`, also `problems`: the whole submission folder checked as the server's
    upload checker does, against the categories beside `input`).

    Everything is checked before anything is written: the arguments, the model, every input's header and
    the output folder (new or empty, or `overwrite`). The files are written into a temporary sibling that
    replaces the output folder only when every image went through, so a failure leaves no partial output
    and a second call never leaves the first call's files beside its own. `format=mvtec_ad2` writes into
    one submission folder that collects every category (each call adds its category's files)."""
    if format not in FORMATS:
        raise UserError(f"format={format!r} is not one of {list(FORMATS)}")
    _check_args(threshold, trainer, batch_size, image_size)
    if max_image_pixels is not None and max_image_pixels < 1:
        raise UserError(f"max_image_pixels={max_image_pixels} must be at least 1 (null: Pillow's limit)")
    if check and format != "mvtec_ad2":
        raise UserError("check=true checks an MVTec AD 2 submission: pass format=mvtec_ad2 with it")
    with pixel_limit(max_image_pixels):
        result = _predict(run, input, output, threshold, trainer, batch_size, image_size, format, overwrite)
    if check:
        category_dir = Path(input).expanduser().absolute()
        category = _server_category(result["trained"], category_dir)
        result["problems"] = check_submission(result["output"], category_dir.parent, {category: category_dir})
    return result


def _predict(
    run: str | Path,
    input: str,
    output: str | Path | None,
    threshold: float | None,
    trainer: str,
    batch_size: int | None,
    image_size: int | None,
    format: str,
    overwrite: bool,
) -> dict[str, Any]:
    server = format == "mvtec_ad2"
    trained: Trained = load_trained(run, image_size)
    if threshold is None and server:
        threshold = _server_threshold(trained)
    if threshold is None:
        if trained.threshold is None:
            where = trained.run_dir or trained.checkpoint
            raise UserError(
                f"{where} records no decision threshold (summary.json decision_threshold; runs before it was "
                f"added, or a bare checkpoint) — pass threshold=<map value>"
            )
        threshold = trained.threshold
    threshold = float(threshold)
    if output is None:
        output = (trained.run_dir or trained.checkpoint.parent) / "predictions"
        if server:  # one submission folder takes every category: pass output= to collect them
            output = Path(output).with_name("submission")
    out = Path(output).expanduser().absolute()
    if server:
        category_dir = Path(input).expanduser()
        files = private_test_images(category_dir)  # a folder without private images: that first
        files = private_test_images(category_dir, _server_category(trained, category_dir.absolute()))
    else:
        files = [(f, n) for f, n in input_files(str(input)) if not f.absolute().is_relative_to(out)]
    if not files:
        raise UserError(f"input {input} holds no images outside the output folder {out}")
    for f, _ in files:  # an unreadable header stops here, before anything is written
        image_hw(f)
    if not server:
        check_output(out, overwrite)
    device = pick_device(str(trainer))
    trained.module.to(device)
    bs = int(batch_size or trained.batch_size)
    result = {"csv": None, "output": out, "threshold": threshold, "trained": trained}
    if server:  # the submission folder collects categories: written in place, file by file
        out.mkdir(parents=True, exist_ok=True)
        return result | {"rows": _predict_into(out, files, trained, threshold, bs, _write_submission)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}-{os.urandom(3).hex()}")
    tmp.mkdir()
    try:
        rows = _predict_into(tmp, files, trained, threshold, bs, _write_outputs)
        _write_csv(tmp / PREDICTIONS_CSV, rows)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result | {"csv": out / PREDICTIONS_CSV, "rows": rows}


def _predict_into(
    folder: Path,
    files: list[tuple[Path, str]],
    trained: Trained,
    threshold: float,
    bs: int,
    write: Callable[[Path, str, np.ndarray, np.ndarray, float], int],
) -> list[Prediction]:
    rows: list[Prediction] = []
    with ThreadPoolExecutor(max(1, min(4, bs))) as pool, _progress(len(files), bs) as bar:
        for start in range(0, len(files), bs):
            chunk = files[start : start + bs]
            images = list(pool.map(lambda item: load_rgb(item[0], None), chunk))
            batch = torch.from_numpy(np.stack([resize_rgb(im, trained.image_size) for im in images]))
            maps = anomaly_maps(trained.module, batch.permute(0, 3, 1, 2).float().div_(255.0)).numpy()
            for (f, name), image, amap in zip(chunk, images, maps, strict=True):
                score = float(amap.max())
                area = write(folder, name, image, amap, threshold)
                decision = "anomalous" if score >= threshold else "normal"
                rows.append(Prediction(str(f), name, score, decision, area))
            bar.update(len(chunk))
    return rows


def _replace(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` folder at `out`; an earlier `out` (empty, or `overwrite=true`) goes."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{os.urandom(3).hex()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_csv(path: Path, rows: list[Prediction]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([r.path, r.name, repr(r.image_score), r.decision, r.defect_area_px])
    return atomic_write_text(path, buf.getvalue())


def check_only(output: str | None, input: str | None) -> list[str]:
    """`check=true output=<submission> [input=<folder of the eight categories>]` (no `run=`): what the server's
    upload checker would refuse in the folder (`data.mvtec_ad2.check_submission`), one line each."""
    if output is None:
        raise UserError("check=true without run= checks a submission: pass output=<the submission folder>")
    root = Path(input).expanduser() if input is not None else None
    if root is not None and not root.is_dir():
        raise UserError(
            f"input={input} is not a folder — pass the folder holding the eight MVTec AD 2 categories"
        )
    return check_submission(Path(output).expanduser(), root)


def _report_check(out: Path, problems: list[str], against: str | None) -> int:
    for line in problems:
        print(line)
    if problems:
        print(f"submission {out}: {len(problems)} problem(s); the server would refuse it", file=sys.stderr)
        return 1
    print(f"submission {out}: complete{f' against {against}' if against else ''}, as the server takes it")
    return 0


def _main(cfg: DictConfig) -> int:
    if cfg.get("check") and cfg.get("run") is None:
        args = command_args(cfg, predict)
        return _report_check(
            Path(str(args["output"])), check_only(args.get("output"), args.get("input")), args.get("input")
        )
    result = predict(**command_args(cfg, predict, required=("run", "input")))
    n_anom = sum(r.decision == "anomalous" for r in result["rows"])
    print(
        f"predictions: {len(result['rows'])} images, {n_anom} anomalous at threshold "
        f"{result['threshold']:.6g} -> {result['csv'] or result['output']}"
    )
    if result.get("problems") is not None:
        return _report_check(result["output"], result["problems"], str(Path(cfg.input).expanduser().parent))
    if result["csv"] is None:  # a submission: say how far it is, and how to check it whole
        out = result["output"]
        have = [c for c in submission_categories() if (out / SUBMISSION_MAPS / c).is_dir()]
        print(
            f"submission: {len(have)} of {len(submission_categories())} categories in {out}; check it whole "
            f"with check=true (python -m mvtec_seg.predict check=true output={out} "
            f"input={Path(cfg.input).expanduser().parent})"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: returns 0, or 2 with a one-line message on bad input (no traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command("mvtec_seg.predict", __doc__, argv, _main, config_name="predict")


if __name__ == "__main__":
    sys.exit(main())
