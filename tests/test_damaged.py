"""Nothing damaged is read as if whole: cut cache artefacts are named and rebuilt, a cut run checkpoint stops
with one line, names that are not UTF-8 are refused with one line, one process writes a run folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PSEUDO_FAST, SEGMENTER_RUN, compose_cfg, make_fake_mvtec, with_teacher

from mvtec_seg.builders import build_datamodule
from mvtec_seg.data.cache import decoded_arrays, manifest_files
from mvtec_seg.data.mvtec import scan_category
from mvtec_seg.data.split import load_or_create_manifest
from mvtec_seg.errors import UserError
from mvtec_seg.io_utils import LockHeld, build_once, damage, folder_lock, format_problem, proofs
from mvtec_seg.io_utils.locks import holder
from mvtec_seg.predict import input_files
from mvtec_seg.teacher import ensure_teacher, maps_dir, teacher_maps
from mvtec_seg.train import train


def _cut(path: Path, keep: float = 0.5) -> None:
    """Cut a file short, as an interrupted copy or a full disk leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _state(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --- the verifier ------------------------------------------------------------------------------------------------


def test_a_proof_fails_on_a_cut_grown_or_rewritten_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(proofs, "FULL_DIGEST_BYTES", 1000)  # the big file below is digested by samples
    folder = tmp_path / "artefact"
    folder.mkdir()
    np.save(folder / "small.npy", np.arange(10))
    big = np.random.default_rng(0).integers(0, 255, 200_000, dtype=np.uint8)
    np.save(folder / "big.npy", big)
    proofs.write_proof(folder)
    assert damage(folder) is None
    raw = (folder / "big.npy").read_bytes()
    (folder / "big.npy").write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))  # the last byte rewritten
    assert "does not have the bytes" in damage(folder)
    (folder / "big.npy").write_bytes(raw + b"\0")
    assert "200129 bytes, 200128 when written" in damage(folder)
    (folder / "big.npy").write_bytes(raw)
    _cut(folder / "small.npy")
    assert damage(folder).startswith("small.npy is ")
    (folder / "small.npy").unlink()
    assert damage(folder) == "small.npy is missing"
    (folder / proofs.PROOF_FILE).write_text('{"files": ')
    assert "proof.json is unreadable" in damage(folder)


def test_without_a_proof_the_format_decides_and_a_whole_artefact_is_adopted(tmp_path: Path) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    np.save(folder / "a.npy", np.ones((4, 4), np.float16))
    (folder / "info.json").write_text('{"n": 1}')
    assert damage(folder) is None and (folder / proofs.PROOF_FILE).is_file(), "a whole one is adopted"
    (folder / proofs.PROOF_FILE).unlink()
    _cut(folder / "a.npy", 0.9)
    assert "a.npy: " in damage(folder) and "header says" in damage(folder)


@pytest.mark.parametrize("kind", ["npy", "ckpt", "json", "png"])
def test_format_checks_fail_on_a_cut_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"x.{kind}"
    if kind == "npy":
        np.save(path, np.zeros((64, 64), np.float32))
    elif kind == "ckpt":
        torch.save({"state_dict": {"w": torch.zeros(256, 256)}}, path)
    elif kind == "json":
        path.write_text(json.dumps({"samples": list(range(100))}))
    else:
        from mvtec_seg.io_utils import atomic_save_png

        atomic_save_png(path, np.zeros((8, 8), np.uint8))
    assert format_problem(path) is None
    _cut(path, 0.8)
    assert format_problem(path), kind


def test_build_once_rebuilds_a_damaged_file_artefact(tmp_path: Path, caplog) -> None:
    target, builds = tmp_path / "maps.npy", []

    def build(tmp: Path) -> None:
        builds.append(1)
        with open(tmp, "wb") as fh:
            np.save(fh, np.arange(1000))

    build_once(target, build)
    _cut(target)
    with caplog.at_level(logging.WARNING):
        build_once(target, build)
    assert len(builds) == 2 and np.load(target).tolist() == list(range(1000))
    lines = [r.getMessage() for r in caplog.records if "damaged cache artefact" in r.getMessage()]
    assert len(lines) == 1 and str(target) in lines[0]


# --- cache artefacts of each kind are rebuilt -----------------------------------------------------------------


def test_cut_decoded_arrays_are_named_and_rebuilt(tmp_path: Path, caplog) -> None:
    root = make_fake_mvtec(tmp_path / "data", name="widget")
    _, manifest = load_or_create_manifest(root, tmp_path / "cache", "widget", 0)
    images, masks = decoded_arrays(manifest, root, tmp_path / "cache", 32)
    expected = np.array(images)
    folder = next(p for p in (tmp_path / "cache" / "decoded" / "widget").iterdir() if p.is_dir())
    _cut(folder / "images.npy")
    with caplog.at_level(logging.WARNING):
        images, _ = decoded_arrays(manifest, root, tmp_path / "cache", 32)
    assert np.array_equal(images, expected)
    assert any(
        "damaged cache artefact" in r.getMessage() and "images.npy" in r.getMessage() for r in caplog.records
    )
    assert manifest_files(manifest)  # the manifest the arrays follow


def test_a_cut_split_manifest_is_made_again_the_same(tmp_path: Path, caplog) -> None:
    root = make_fake_mvtec(tmp_path / "data", name="widget")
    path, manifest = load_or_create_manifest(root, tmp_path / "cache", "widget", 0)
    _cut(path)
    with caplog.at_level(logging.WARNING):
        _, again = load_or_create_manifest(root, tmp_path / "cache", "widget", 0)
    assert again == manifest and json.loads(path.read_text()) == manifest
    assert any("damaged split manifest" in r.getMessage() for r in caplog.records)


def test_cut_teacher_maps_are_named_and_rebuilt(teacher_cache: Path, tmp_path: Path, caplog) -> None:
    cfg = compose_cfg(with_teacher(teacher_cache, tmp_path), PSEUDO_FAST)
    dm = build_datamodule(cfg)
    dm.prepare()
    teacher = ensure_teacher(cfg, dm)
    expected = np.array(teacher_maps(cfg, dm, teacher))
    _cut(maps_dir(dm, teacher) / "maps.npy")
    with caplog.at_level(logging.WARNING):
        maps = teacher_maps(cfg, dm, teacher)
    assert maps.shape == expected.shape and np.allclose(maps, expected, atol=1e-3)
    assert any(
        "damaged cache artefact" in r.getMessage() and "maps.npy" in r.getMessage() for r in caplog.records
    )


def test_a_cut_teacher_checkpoint_is_named_and_trained_again(
    teacher_cache: Path, tmp_path: Path, caplog
) -> None:
    cfg = compose_cfg(with_teacher(teacher_cache, tmp_path), PSEUDO_FAST)
    dm = build_datamodule(cfg)
    dm.prepare()
    folder = ensure_teacher(cfg, dm).dir
    _cut(folder / "model.ckpt")
    with caplog.at_level(logging.WARNING):
        teacher = ensure_teacher(cfg, dm)
    assert damage(folder, ("model.ckpt", "info.json")) is None and teacher.info["params"] > 0
    assert any(
        "damaged cache artefact" in r.getMessage() and "model.ckpt" in r.getMessage() for r in caplog.records
    )


# --- a damaged run checkpoint ----------------------------------------------------------------------------------


def _run_copy(segmenter_run: dict, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(segmenter_run["run"], copy)
    return copy


def _resume_cfg(segmenter_run: dict, run: Path, *extra: str):
    return compose_cfg(
        segmenter_run["tmp"],
        [f"data.root={segmenter_run['data']}", *SEGMENTER_RUN, f"paths.run_dir={run}", "resume=true", *extra],
    )


def test_a_cut_last_checkpoint_stops_a_resume_with_one_line(segmenter_run: dict, tmp_path: Path) -> None:
    run = _run_copy(segmenter_run, tmp_path)
    _cut(run / "checkpoints" / "last.ckpt")
    before = _state(run)
    with pytest.raises(UserError) as err:
        train(_resume_cfg(segmenter_run, run))
    msg = str(err.value)
    assert "\n" not in msg and str(run / "checkpoints" / "last.ckpt") in msg and "is damaged" in msg, msg
    assert "best.ckpt" in msg and "new run" in msg, msg  # the choices: an earlier checkpoint, or a new run
    assert _state(run) == before


@pytest.mark.slow
def test_the_cli_exits_2_on_a_cut_checkpoint(segmenter_run: dict, tmp_path: Path) -> None:
    """`ckpt_path` cut short: one `error:` line and exit 2 from the real command line."""
    ckpt = tmp_path / "cut.ckpt"
    shutil.copy(segmenter_run["run"] / "checkpoints" / "best.ckpt", ckpt)
    _cut(ckpt)
    from conftest import run_cli

    proc = run_cli(
        [
            f"data.root={segmenter_run['data']}",
            *SEGMENTER_RUN,
            f"paths.cache_dir={segmenter_run['tmp'] / 'cache'}",
            f"hydra.run.dir={tmp_path / 'new'}",
            f"ckpt_path={ckpt}",
            "trainer.max_epochs=0",
        ],
        tmp_path,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and "is damaged" in lines[0] and str(ckpt) in lines[0], proc.stderr[-2000:]


# --- file names that are not UTF-8 -----------------------------------------------------------------------------


def test_a_name_that_is_not_utf8_is_refused_with_one_line(tmp_path: Path) -> None:
    root = make_fake_mvtec(tmp_path / "data", name="widget")
    good = os.fsencode(root / "train" / "good")
    shutil.copy(os.path.join(good, b"000.png"), os.path.join(good, b"caf\xe9.png"))
    with pytest.raises(UserError) as err:
        scan_category(root)
    msg = str(err.value)
    assert "caf\\xe9.png" in msg and "not valid UTF-8" in msg and "\n" not in msg, msg
    msg.encode("utf-8")  # printable and writable anywhere
    with pytest.raises(UserError, match=r"caf\\xe9\.png"):
        input_files(str(root / "train" / "good"))


def test_a_run_on_a_name_that_is_not_utf8_records_the_refusal(tmp_path: Path) -> None:
    root = make_fake_mvtec(tmp_path / "data", name="widget")
    bad = os.path.join(os.fsencode(root / "test" / "scratch"), b"\xff\xfe.png")
    shutil.copy(os.fsencode(root / "test" / "scratch" / "000.png"), bad)
    cfg = compose_cfg(tmp_path, [f"data.root={tmp_path / 'data'}", *SEGMENTER_RUN])
    with pytest.raises(UserError, match="not valid UTF-8"):
        train(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "failed" and "\\xff\\xfe.png" in summary["error"]


# --- one writer per folder ---------------------------------------------------------------------------------------

HOLD = """
import sys, time
from mvtec_seg.io_utils import folder_lock
with folder_lock(sys.argv[1], "run folder " + sys.argv[1], "wait"):
    print("held", flush=True)
    time.sleep(120)
"""


def _holding(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_naming_the_holder_and_takes_over_once_it_is_killed(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "run"
    proc = _holding(folder)
    try:
        with pytest.raises(LockHeld) as err, folder_lock(folder, f"run folder {folder}", "wait for it"):
            pass
        msg = str(err.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in msg and str(folder) in msg, msg
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with folder_lock(folder, "run folder", "wait") as lock:  # the kernel freed the killed holder's lock
        assert holder(lock)["pid"] == os.getpid()


def test_a_stale_holder_record_is_taken_over(tmp_path: Path, caplog) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "run"
    folder.mkdir()
    record = {"pid": dead.pid, "host": socket.gethostname(), "since": time.time(), "what": "run folder"}
    (folder / ".lock").write_text(json.dumps(record))
    with caplog.at_level(logging.INFO), folder_lock(folder, "run folder", "wait") as lock:
        assert holder(lock)["pid"] == os.getpid()
    assert any(
        "no longer running" in r.getMessage() and str(dead.pid) in r.getMessage() for r in caplog.records
    )


def test_a_resume_of_a_run_in_use_stops_with_one_line(segmenter_run: dict, tmp_path: Path) -> None:
    run = _run_copy(segmenter_run, tmp_path)
    proc = _holding(run)
    try:
        before = _state(run)
        with pytest.raises(UserError) as err:
            train(_resume_cfg(segmenter_run, run))
        msg = str(err.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in msg and "\n" not in msg, msg
        assert _state(run) == before
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_sweep_folder_in_use_is_refused_naming_the_holder(tmp_path: Path, capsys) -> None:
    from omegaconf import OmegaConf

    from mvtec_seg import sweep

    config = OmegaConf.create(
        {"resume": True, "hydra": {"sweep": {"dir": str(tmp_path / "sweep")}, "overrides": {"task": []}}}
    )
    proc = _holding(tmp_path / "sweep")
    try:
        with pytest.raises(SystemExit) as stop:
            sweep.RunFolderGuard().on_multirun_start(config)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"pid {proc.pid} on host {socket.gethostname()}" in err, err
        assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_cache_stage_waits_for_its_builder_and_names_it(tmp_path: Path, caplog) -> None:
    """Cache stages share the lock but wait for it: the waiting job names the process that builds."""
    from mvtec_seg.io_utils import file_lock

    script = HOLD.replace(
        'folder_lock(sys.argv[1], "run folder " + sys.argv[1], "wait")', "file_lock(sys.argv[1])"
    )
    script = script.replace("import folder_lock", "import file_lock").replace(
        "time.sleep(120)", "time.sleep(1)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "stage")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO), file_lock(tmp_path / "stage") as lock:
        assert time.monotonic() - t0 > 0.5, "the lock is ours only once the builder let go"
        assert holder(lock)["pid"] == os.getpid()
    proc.wait()
    assert any(
        f"pid {proc.pid} on host" in r.getMessage() and "waiting" in r.getMessage() for r in caplog.records
    )
