"""Scale-out paths testable on CPU: DDP on gloo with 2 processes, W&B offline files, the SLURM launcher config."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF_DIR, compose_cfg, run_cli
from hydra import compose, initialize_config_dir
from wandb_records import read_offline_run

from mvtec_seg.metrics import compute_all
from mvtec_seg.train import train

FIVE_METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AP", "pixel_AUPRO", "IoU")


@pytest.mark.slow
def test_ddp_two_cpu_processes_one_folder_exact_metrics(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "trainer=ddp_cpu",
        "debug=fast",
        "trainer.limit_test_batches=null",
        f"hydra.run.dir={run_dir}",
        f"paths.output_dir={tmp_path / 'out'}",
    ]
    proc = run_cli(args, tmp_path, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train_ddp_process_1" in proc.stderr or (run_dir / "train_ddp_process_1.log").exists()
    summaries = list(tmp_path.rglob("summary.json"))
    assert summaries == [run_dir / "summary.json"]  # no duplicate output folders from rank 1
    summary = json.loads(summaries[0].read_text())
    pred = np.load(run_dir / "test_predictions.npz")
    # every test image scored exactly once (no DistributedSampler padding), from both ranks
    assert sorted(pred["index"].tolist()) == sorted(set(pred["index"].tolist()))
    assert len(pred["index"]) == summary["split"]["n_test"]
    again = compute_all(
        torch.from_numpy(pred["anomaly_map"].astype(np.float32)),
        torch.from_numpy(pred["gt_mask"]),
        torch.from_numpy(pred["gt_label"]),
    )
    for name, value in again.items():
        assert value == pytest.approx(summary["metrics"][f"test/{name}"], abs=1e-6), name


@pytest.mark.slow
def test_wandb_offline_writes_run_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg(tmp_path, ["debug=fast", "logger=wandb", "group=test_sweep"])
    summary = train(cfg)
    assert summary["status"] == "ok"
    runs = list((Path(cfg.paths.run_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb")), "offline run file missing"
    assert list((runs[0] / "files" / "media" / "images").rglob("*.png")), "overlay panels were not logged"
    import wandb

    assert wandb.run is None  # the run was finished
    # read back what a user compares in W&B, from the run's own log
    logged = read_offline_run(runs[0])
    assert logged.group == "test_sweep"
    assert logged.tags == ["synthetic", "unet", "gt"]
    assert logged.name == cfg.task_name == "unet_gt_synthetic"
    assert logged.config["category"]["name"] == "synthetic"
    assert logged.config["task_name"] == "unet_gt_synthetic"  # resolved, not `${model.name}_...`
    assert logged.config["data"]["image_size"] == cfg.data.image_size
    assert logged.exit_code == 0
    metrics = {k: v for k, v in summary["metrics"].items() if k.startswith("test/")}
    assert sorted(metrics) == sorted(f"test/{n}" for n in (*FIVE_METRICS, "IoU_at_threshold"))
    for key, value in metrics.items():
        assert logged.summary[key] == pytest.approx(value, abs=1e-9), key
    assert logged.summary["status"] == "ok" and logged.summary["category"] == "synthetic"


def test_wandb_run_finished_when_job_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    garbage = tmp_path / "garbage.ckpt"  # a whole zip archive (the checks before the job pass), no checkpoint
    with zipfile.ZipFile(garbage, "w") as archive:
        archive.writestr("garbage/data.pkl", b"not a pickle")
    cfg = compose_cfg(tmp_path, ["debug=fast", "logger=wandb", f"ckpt_path={garbage}"])
    with pytest.raises(Exception):  # noqa: B017 - any failure inside the job
        train(cfg)
    import wandb

    assert wandb.run is None
    assert json.loads((Path(cfg.paths.run_dir) / "summary.json").read_text())["status"] == "failed"


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_
    assert launcher.gpus_per_node == 1 and launcher.timeout_min > 0


@pytest.mark.slow
def test_submitit_sweep_two_jobs_then_the_report_a_failed_job_listed(tmp_path):
    """Through submitit's local executor (the pickling and job folders of its SLURM executor): a multirun on
    the synthetic category, W&B offline, two jobs that run and one refused by the settings check. The refused
    job is listed as under the basic launcher and the sweep exits 1; both runs' W&B runs share the sweep's
    group; the report reads the sweep."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from mvtec_seg.report import build_report

    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "debug=fast",
        "logger=wandb",
        "seed=0,1,-1",
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = run_cli(args, tmp_path, timeout=600, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 3, (
        "the jobs did not go through submitit"
    )
    table = proc.stderr[proc.stderr.index("1 of 3 sweep jobs failed:") :].splitlines()
    row = next(line for line in table if "seed=-1" in line)
    overrides, reason, log = (cell.strip() for cell in row.split(" | "))
    assert "seed=-1" in overrides.split() and reason.startswith("seed=-1") and Path(log).is_file()
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert sorted((s["seed"], s["status"]) for s in summaries) == [(0, "ok"), (1, "ok")]
    runs = [read_offline_run(p) for p in sweep.glob("*/wandb/offline-run-*")]
    assert len(runs) == 2 and {r.group for r in runs} == {sweep.name}
    assert sorted(r.config["seed"] for r in runs) == [0, 1] and {r.exit_code for r in runs} == {0}
    for s in summaries:  # each W&B run holds its own job's metrics
        logged = next(r for r in runs if r.config["seed"] == s["seed"])
        assert logged.summary["test/pixel_AUROC"] == pytest.approx(s["metrics"]["test/pixel_AUROC"], abs=1e-9)
    result = build_report(sweep)
    with open(result["report_csv"]) as fh:
        rows = {r["category"]: r for r in csv.DictReader(fh)}
    mean = sum(s["metrics"]["test/pixel_AUROC"] for s in summaries) / 2
    assert float(rows["synthetic"]["unet/gt/pixel_AUROC.mean"]) == pytest.approx(mean, rel=1e-9)
