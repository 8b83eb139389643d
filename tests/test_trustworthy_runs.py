"""Trustworthy runs: resume after SIGKILL equals an uninterrupted run (segmenter and teacher), a
non-finite segmenter loss stops cleanly, same seed = same manifest and metrics, dry runs count the teacher,
SIGTERM/SIGINT end the CLI at once with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_cfg, make_fake_mvtec
from torch.utils.data import DataLoader, TensorDataset

import mvtec_seg.builders
import mvtec_seg.teacher
import mvtec_seg.train
from mvtec_seg.builders import build_datamodule
from mvtec_seg.callbacks import ResumeCheckpoint
from mvtec_seg.errors import UserError
from mvtec_seg.models.segmenter.loss import SegmentationLoss
from mvtec_seg.teacher import teacher_dir
from mvtec_seg.train import train

TINY = ["debug=fast", "data.image_size=32", "trainer.limit_val_batches=1", "evaluation.max_overlays=0"]
EVERY_EPOCH = "checkpoint.last_every_s=0"  # these tests kill or fail mid-run and need last.ckpt of each epoch
TOLERANCE = 1e-6  # resumed vs uninterrupted, and run vs rerun, on CPU

# Runs `train` in a child process that SIGKILLs itself at the start of epoch KILL_AT, i.e. right after
# the checkpoints of the epoch before were written: a real kill, with no cleanup of any kind.
KILLED_CHILD = """
import os, signal, sys
import pytorch_lightning as pl
import mvtec_seg.builders, mvtec_seg.teacher, mvtec_seg.train
from conftest import compose_cfg, make_fake_mvtec
from pathlib import Path

class Kill(pl.Callback):
    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)

original = mvtec_seg.builders.resume_callbacks
patched = lambda *args: [*original(*args), Kill()]
mvtec_seg.train.resume_callbacks = patched
mvtec_seg.teacher.resume_callbacks = patched
mvtec_seg.train.train(compose_cfg(Path(sys.argv[1]), sys.argv[2:]))
"""


def _killed_run(tmp: Path, overrides: list[str], kill_at: int) -> None:
    env = {**os.environ, "KILL_AT": str(kill_at), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, str(tmp), *overrides],
        cwd=Path(__file__).parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def _close(a: dict, b: dict) -> None:
    assert set(a) == set(b) and a
    print("max |difference| of the test metrics:", max(abs(a[k] - b[k]) for k in a))
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=TOLERANCE, nan_ok=True), k


@pytest.mark.slow
def test_segmenter_resume_after_sigkill_equals_uninterrupted(tmp_path, caplog):
    overrides = [*TINY, "trainer.max_epochs=4", EVERY_EPOCH]
    straight = train(compose_cfg(tmp_path / "straight", overrides))
    _killed_run(tmp_path / "killed", overrides, kill_at=2)
    last = tmp_path / "killed" / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and "optimizer_states" in ckpt  # two epochs done, then killed
    assert any("RngState" in key for key in ckpt["callbacks"])
    with caplog.at_level("WARNING", logger="mvtec_seg.train"):
        resumed = train(compose_cfg(tmp_path / "killed", [*overrides, "resume=true"]))
    assert resumed["status"] == "ok" and f"resuming training from {last}" in caplog.text
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 3
    _close(resumed["metrics"], straight["metrics"])


@pytest.mark.slow
def test_teacher_resume_after_sigkill_equals_uninterrupted(tmp_path):
    overrides = [
        *TINY,
        EVERY_EPOCH,
        "model=transfusion",
        "teacher.trainer.max_epochs=4",
        "teacher.trainer.limit_train_batches=2",
        "teacher.params.net.num_steps=5",  # a short reverse process: cheaper test maps
    ]
    straight = train(compose_cfg(tmp_path / "straight", overrides))
    _killed_run(tmp_path / "killed", overrides, kill_at=2)
    cfg = compose_cfg(tmp_path / "killed", overrides)
    dm = build_datamodule(cfg)
    dm.prepare()
    final = teacher_dir(cfg, dm)
    partial = final.with_name(final.name + ".partial")
    assert not final.exists()
    assert torch.load(partial / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 1
    resumed = train(cfg)
    assert json.loads((final / "info.json").read_text())["epochs"] == 4
    _close(resumed["metrics"], straight["metrics"])


@pytest.mark.slow
def test_non_finite_segmenter_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    original = SegmentationLoss.forward
    calls = {"n": 0}

    def flaky(self, logits, target, *weight):
        calls["n"] += 1
        terms = original(self, logits, target, *weight)
        if calls["n"] == 3:  # first batch of epoch 2 (2 batches per epoch)
            terms["loss"] = terms["loss"] * float("inf")
        return terms

    monkeypatch.setattr(SegmentationLoss, "forward", flaky)
    cfg = compose_cfg(tmp_path, [*TINY, "trainer.max_epochs=3", EVERY_EPOCH])
    with pytest.raises(UserError, match=r"Segmenter loss became non-finite at epoch 1.*last\.ckpt"):
        train(cfg)
    run = Path(cfg.paths.run_dir)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["error"]
    monkeypatch.setattr(SegmentationLoss, "forward", original)
    again = train(compose_cfg(tmp_path, [*TINY, "trainer.max_epochs=3", "resume=true"]))
    assert again["status"] == "ok" and again["error"] is None


@pytest.mark.slow
def test_same_seed_same_manifest_and_metrics(tmp_path):
    runs = [train(compose_cfg(tmp_path / name, TINY)) for name in "ab"]
    manifests = [Path(r["split"]["manifest"]) for r in runs]
    assert manifests[0] != manifests[1]  # separate caches: each run made its own
    samples = [json.loads(m.read_text())["samples"] for m in manifests]
    assert samples[0] == samples[1]  # image, mask, defect type and part of every row
    _close(runs[0]["metrics"], runs[1]["metrics"])


def test_another_seed_gives_another_split_of_the_same_files(tmp_path):
    root = make_fake_mvtec(tmp_path / "mvtec", n_train=12, n_good=4, defects={"scratch": 6, "hole": 6})
    data = ["category=custom", f"category.name={root.name}", f"data.root={root.parent}", "data.image_size=32"]
    rows = []
    for seed in (0, 1):
        dm = build_datamodule(compose_cfg(tmp_path / f"s{seed}", [*data, f"seed={seed}"]))
        dm.prepare()
        rows.append({r["image"]: r["part"] for r in dm.manifest["samples"]})
    assert set(rows[0]) == set(rows[1])  # the same images
    assert rows[0] != rows[1]  # cut differently
    assert sorted(rows[0].values()) == sorted(rows[1].values())  # into parts of the same sizes


def test_dry_run_builds_and_counts_the_teacher(tmp_path):
    cfg = compose_cfg(tmp_path, ["dry_run=true", "model=unet", "mask=pseudo"])
    summary = train(cfg)
    assert summary["status"] == "dry_run" and summary["params"] > 10_000_000
    assert 1_000_000 < summary["teacher_params"] < 5_000_000
    assert not (Path(cfg.paths.cache_dir) / "transfusion").exists()  # built, not trained
    on_disk = json.loads((Path(cfg.paths.run_dir) / "summary.json").read_text())
    assert on_disk["teacher_params"] == summary["teacher_params"]
    gt = train(compose_cfg(tmp_path / "gt", ["dry_run=true", "model=unet", "mask=gt"]))
    assert gt["teacher_params"] is None


def test_dry_run_paper_teacher_parameter_count(tmp_path):
    summary = train(compose_cfg(tmp_path, ["experiment=transfusion_paper", "dry_run=true"]))
    assert summary["params"] == summary["teacher_params"] == 54_559_431


def _start_cli(tmp: Path, args: list[str]) -> tuple[subprocess.Popen, Path]:
    log = tmp / "cli.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mvtec_seg", *args], cwd=tmp, env=env, stdout=fh, stderr=fh, text=True
        )
    return proc, log


def _signal_when(proc: subprocess.Popen, log: Path, marker: str, sig: int) -> float:
    """Send `sig` once `marker` shows in the log; seconds from the signal to the process's end."""
    deadline = time.monotonic() + 900
    while marker not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{marker!r} never appeared: {log.read_text()[-3000:]}")
        time.sleep(0.05)
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=60)
    finally:
        proc.kill()  # a no-op once it has ended
    return time.monotonic() - t0


@pytest.mark.slow
def test_sigterm_during_teacher_maps_exits_at_once_leaving_no_partial_maps(tmp_path):
    args = [
        "model=unet",
        "mask=pseudo",
        *TINY,  # 112 images x 20 reverse steps: the maps stage lasts long enough to be caught in the act
        "teacher.trainer.max_epochs=1",
        f"paths.output_dir={tmp_path / 'out'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc, log = _start_cli(tmp_path, args)
    seconds = _signal_when(proc, log, "computing teacher maps", signal.SIGTERM)
    text = log.read_text()
    assert proc.returncode == 143 and seconds < 10, (proc.returncode, seconds)
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "interrupted by SIGTERM during teacher maps" in lines[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["error"]
    cache = tmp_path / "out" / "_cache" / "transfusion"
    assert not list(cache.rglob("maps.npy"))  # no maps ...
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name or "partial" in p.name]  # ... nor temporaries


@pytest.mark.slow
def test_sigint_during_segmenter_training_exits_at_once(tmp_path):
    args = [
        *TINY,
        "trainer.max_epochs=1000",
        f"paths.output_dir={tmp_path / 'out'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc, log = _start_cli(tmp_path, args)
    seconds = _signal_when(proc, log, "Total Flops", signal.SIGINT)  # the model summary: fit has begun
    assert proc.returncode == 130 and seconds < 10, (proc.returncode, seconds)
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "interrupted by SIGINT during segmenter training" in lines[0]
    assert "Traceback" not in text
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "interrupted"


class _Tiny(pl.LightningModule):
    """Four batches an epoch of a one-weight regression: the cheapest fit that writes checkpoints."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.w(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=1)


def _epoch_writes(tmp_path: Path, every_s: float, epochs: int, seconds_per_epoch: float) -> tuple[list, int]:
    """(epochs whose end wrote last.ckpt, the epoch saved in the final file) under a fake clock."""
    now = {"t": 0.0}
    written: list[int] = []

    class Clock(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            now["t"] += seconds_per_epoch

    ckpt = ResumeCheckpoint(tmp_path, every_s, clock=lambda: now["t"])
    original = ckpt._save_checkpoint

    def save(trainer, filepath):
        written.append(trainer.current_epoch)
        original(trainer, filepath)

    ckpt._save_checkpoint = save
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[Clock(), ckpt],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(_Tiny())
    assert ckpt.writes == len(written)
    return written, torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["epoch"]


def test_resume_checkpoint_waits_for_its_interval_and_always_writes_the_last_epoch(tmp_path):
    assert _epoch_writes(tmp_path / "every", 0, 5, 25.0) == ([0, 1, 2, 3, 4], 4)
    # 25 s epochs, 60 s apart at least: after epochs 2 (75 s) and 5 (150 s), then the last one
    assert _epoch_writes(tmp_path / "60s", 60, 7, 25.0) == ([2, 5, 6], 6)
    assert _epoch_writes(tmp_path / "never", 1e9, 3, 25.0) == ([2], 2)  # the last epoch still
    with pytest.raises(UserError, match="checkpoint.last_every_s=-1"):
        ResumeCheckpoint(tmp_path, -1)


@pytest.mark.slow
def test_runs_write_last_checkpoint_by_the_configured_interval(tmp_path):
    """The default config's interval reaches the segmenter's and the teacher's resume checkpoints."""
    cfg = compose_cfg(tmp_path, [*TINY, "trainer.max_epochs=3", "checkpoint.last_every_s=3600"])
    train(cfg)
    run = Path(cfg.paths.run_dir)
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 2
    seen: list[float] = []
    real = mvtec_seg.builders.resume_callbacks

    def spy(dirpath, every_s=0.0):
        seen.append(every_s)
        return real(dirpath, every_s)

    teacher_cfg = compose_cfg(
        tmp_path / "t",
        [
            *TINY,
            "model=transfusion",
            "teacher.trainer.max_epochs=1",
            "teacher.trainer.limit_train_batches=1",
            "teacher.params.net.num_steps=3",
        ],
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mvtec_seg.teacher, "resume_callbacks", spy)
        mp.setattr(mvtec_seg.train, "resume_callbacks", spy)
        train(teacher_cfg)
    assert compose_cfg(tmp_path, []).checkpoint.last_every_s == 60
    assert seen == [60, 60]  # the teacher's training, then the run's own trainer
    dm = build_datamodule(teacher_cfg)
    dm.prepare()
    info = json.loads((teacher_dir(teacher_cfg, dm) / "info.json").read_text())
    assert info["images_seen"] == teacher_cfg.teacher.batch_size == 8  # one batch of one epoch
