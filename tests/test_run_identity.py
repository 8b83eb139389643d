"""A run folder holds one run: its identity is recorded, a new run refuses a taken folder, `resume=true`
continues only the same run (settings up to the resume-mutable ones, and data), a failure never damages a
finished run, nothing is tested untrained, and `predict`/`export` load exactly the checkpoint the summary
names. One tiny run is trained for the module; each test works on a copy of its folder."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SEGMENTER_RUN, _save, compose_cfg, run_cli

import mvtec_seg.train
from mvtec_seg import sweep
from mvtec_seg.errors import UserError
from mvtec_seg.identity import RESUME_MUTABLE
from mvtec_seg.inference import load_trained
from mvtec_seg.io_utils import file_digest
from mvtec_seg.preflight import preflight
from mvtec_seg.train import train

TINY = SEGMENTER_RUN  # the session's run (conftest.segmenter_run) is one of these runs


def _overrides(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", *TINY, f"paths.run_dir={run_dir}", *extra]


def _state(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file below `folder` with its mtime and bytes: what 'untouched' compares."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(segmenter_run: dict) -> dict:
    """The session's finished U-Net run (1 epoch) on the fake `widget` category; the cache is shared by the
    copies."""
    return segmenter_run


@pytest.fixture
def run(trained: dict, tmp_path: Path) -> Path:
    """A copy of the finished run folder (the summary's paths still name the original)."""
    copy = tmp_path / "run"
    shutil.copytree(trained["run"], copy)
    return copy


def _cfg(trained: dict, run_dir: Path, *extra: str, data: Path | None = None):
    return compose_cfg(trained["tmp"], _overrides(data or trained["data"], run_dir, *extra))


def _refused(cfg, *expected: str) -> str:
    """train(cfg) stops with one line holding `expected`, and the run folder is exactly as it was."""
    folder = Path(cfg.paths.run_dir)
    before = _state(folder) if folder.exists() else None
    with pytest.raises(UserError) as err:
        train(cfg)
    msg = str(err.value)
    assert "\n" not in msg and " — " in msg, msg
    for part in expected:
        assert part in msg, msg
    assert (_state(folder) if folder.exists() else None) == before
    return msg


# --- identity --------------------------------------------------------------------------------------------------


def test_summary_records_identity_and_the_tested_checkpoint(trained: dict) -> None:
    summary = json.loads((trained["run"] / "summary.json").read_text())
    ident = summary["identity"]
    assert len(ident["config"]) == 12 and len(ident["data"]) == 12
    assert ident["resume_mutable"] == list(RESUME_MUTABLE)
    ckpt = Path(summary["checkpoint"])
    assert ckpt.parent == trained["run"] / "checkpoints" and ckpt.is_file()
    assert summary["checkpoint_digest"] == file_digest(ckpt)
    record = json.loads((trained["run"] / "files.json").read_text())
    assert "ground_truth/hole/000_mask.png" in record["files"]


# --- a run folder holds one run --------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [["seed=1"], []], ids=["another_seed", "same_settings"])
def test_new_run_refuses_a_folder_holding_a_run(trained: dict, run: Path, extra: list[str]) -> None:
    _refused(_cfg(trained, run, *extra), f"run folder {run} already holds a run", "resume=true")


def test_failed_attempt_of_the_same_settings_may_be_redone(trained: dict, tmp_path: Path) -> None:
    """A run that failed before training (a wrong data.root) left no result: the same settings may run there."""
    run_dir = tmp_path / "redo"
    with pytest.raises(UserError, match="category folder not found"):
        train(_cfg(trained, run_dir, data=tmp_path / "nowhere"))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    _refused(
        _cfg(trained, run_dir, "model.params.optimizer.lr=0.01"), "already holds a run"
    )  # other settings
    assert train(_cfg(trained, run_dir))["status"] == "ok"


# --- resume continues the same run or nothing -----------------------------------------------------------------


def test_resume_needs_an_existing_run(trained: dict, tmp_path: Path) -> None:
    _refused(_cfg(trained, tmp_path / "none", "resume=true"), "does not exist")
    assert not (tmp_path / "none").exists()
    (tmp_path / "empty").mkdir()
    _refused(_cfg(trained, tmp_path / "empty", "resume=true"), "holds no run")


@pytest.mark.parametrize(
    "extra, named",
    [
        (["model=deeplab"], 'model.name: "unet" -> "deeplab"'),
        (["data.split_ratios=[0.6,0.2,0.2]"], "data.split_ratios: [0.7, 0.1, 0.2] -> [0.6, 0.2, 0.2]"),
        (["model.params.optimizer.lr=0.01"], "model.params.optimizer.lr: 0.0001 -> 0.01"),
        (["trainer.precision=bf16-mixed"], "trainer.precision"),
    ],
)
def test_resume_with_other_settings_is_refused(
    trained: dict, run: Path, extra: list[str], named: str
) -> None:
    _refused(_cfg(trained, run, "resume=true", *extra), "holds a run with other settings", named)


def test_resume_with_other_data_is_refused(trained: dict, run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(trained["data"], other)
    mask = other / "widget" / "ground_truth" / "hole" / "000_mask.png"
    edited = np.zeros((40, 40), np.uint8)
    edited[5:15, 5:15] = 255
    _save(mask, edited)
    _refused(
        _cfg(trained, run, "resume=true", data=other),
        "the data differs",
        "changed: ground_truth/hole/000_mask.png",
    )
    _refused(_cfg(trained, run, "resume=true", data=tmp_path / "typo"), "category folder not found")


def test_an_identical_copy_of_the_data_is_the_same_data(trained: dict, run: Path, tmp_path: Path) -> None:
    """`data.root` is where the data lies; the files' bytes are its identity. Resume-mutable settings
    (more epochs, another progress bar) may change; training continues from the last epoch."""
    copy = tmp_path / "copy"
    shutil.copytree(trained["data"], copy)
    cfg = _cfg(
        trained, run, "resume=true", "trainer.max_epochs=2", "trainer.enable_progress_bar=true", data=copy
    )
    summary = train(cfg)
    assert summary["status"] == "ok"
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1  # the second epoch, after the first one of the original run
    assert summary["identity"] == {**trained["summary"]["identity"], "resume_mutable": list(RESUME_MUTABLE)}
    assert list((run / "csv").glob("metrics.before_resume_1.csv"))  # the first epoch's log is kept


def test_failure_of_a_resumed_finished_run_keeps_its_files(trained: dict, run: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("threshold broke")

    monkeypatch.setattr(mvtec_seg.train, "choose_threshold", broken)
    kept = {name: (run / name).read_bytes() for name in ("summary.json", "config.yaml", "files.json")}
    with pytest.raises(RuntimeError, match="threshold broke"):
        train(_cfg(trained, run, "resume=true", "trainer.max_epochs=2"))
    assert {name: (run / name).read_bytes() for name in kept} == kept
    (failure,) = run.glob("failed/*/summary.json")
    record = json.loads(failure.read_text())
    assert record["status"] == "failed" and "threshold broke" in record["error"]


# --- no metrics without training -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, named",
    [
        (["trainer.max_epochs=null", "model.max_epochs=0"], "model.max_epochs=0"),  # debug=fast sets 1
        (["trainer.max_epochs=0"], "trainer.max_epochs=0"),
        (["trainer.limit_train_batches=0"], "trainer.limit_train_batches=0"),
        (["+trainer.max_steps=0"], "trainer.max_steps=0"),
        (["mask=pseudo", "teacher.trainer.max_epochs=0"], "teacher.trainer.max_epochs=0"),
        (["model=transfusion", "teacher.trainer.limit_train_batches=0"], "teacher would be used untrained"),
    ],
)
def test_zero_training_is_an_error(trained: dict, tmp_path: Path, extra: list[str], named: str) -> None:
    msg = _refused(_cfg(trained, tmp_path / "run", *extra), named, "untrained")
    assert "ckpt_path" in msg or "teacher.checkpoint" in msg
    assert not (tmp_path / "run").exists()


def test_zero_epochs_test_a_given_checkpoint(trained: dict, tmp_path: Path) -> None:
    best = trained["summary"]["checkpoint"]
    summary = train(_cfg(trained, tmp_path / "run", "trainer.max_epochs=0", f"ckpt_path={best}"))
    assert summary["status"] == "ok" and summary["checkpoint"] == str(Path(best).resolve())
    assert summary["metrics"] == pytest.approx(trained["summary"]["metrics"], abs=1e-6, nan_ok=True)


# --- predict and export load exactly the summary's checkpoint --------------------------------------------------


def test_predict_loads_the_checkpoint_the_summary_names(trained: dict, run: Path, tmp_path: Path) -> None:
    ckpt = run / "checkpoints" / "best.ckpt"
    other = ckpt.with_name("best-v1.ckpt")
    shutil.copy(ckpt, other)
    summary = json.loads((run / "summary.json").read_text())
    summary["checkpoint"] = str(
        trained["run"] / "checkpoints" / "best-v1.ckpt"
    )  # as written, before the move
    (run / "summary.json").write_text(json.dumps(summary))
    assert load_trained(run).checkpoint == other  # found inside the moved folder, not best.ckpt
    torch.save({"hyper_parameters": {}, "state_dict": {}}, other)  # other bytes than the tested ones
    with pytest.raises(UserError, match="is not the one run .* tested"):
        load_trained(run)
    summary["status"], summary["error"] = "interrupted", "interrupted by SIGTERM during testing"
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(UserError, match="did not finish \\(status interrupted: interrupted by SIGTERM"):
        load_trained(run)


# --- the CLI checks before Hydra writes into the folder --------------------------------------------------------


@pytest.mark.slow
def test_cli_refuses_a_finished_folder_before_hydra_writes(trained: dict, run: Path, tmp_path: Path) -> None:
    """A new run, and a resume with a typo in data.root: one line, exit 2, `.hydra/` and the log untouched."""
    (run / ".hydra").mkdir(exist_ok=True)
    (run / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    (run / "__main__.log").write_text("the finished run's log\n")
    before = _state(run)
    base = [a for a in _overrides(trained["data"], run) if not a.startswith(("paths.run_dir", "data.root"))]
    base += [f"hydra.run.dir={run}", f"paths.cache_dir={trained['tmp'] / 'cache'}"]
    proc = run_cli([*base, f"data.root={trained['data']}", "seed=1"], run.parent)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "already holds a run" in lines[0], proc.stderr[-2000:]
    assert _state(run) == before
    # a resume with a typo in data.root: the same check before Hydra writes (`preflight`), in-process
    typo = _cfg(trained, run, "resume=true", data=tmp_path / "typo")
    with pytest.raises(UserError, match="category folder not found"):
        preflight(typo)
    assert _state(run) == before


# --- a sweep counts only what it wrote -------------------------------------------------------------------------


def test_failed_jobs_reads_only_what_this_sweep_wrote(tmp_path: Path) -> None:
    job = tmp_path / "0_unet_gt_widget"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    (job / "summary.json").write_text(json.dumps({"status": "ok"}))
    since = time.time() + 5  # the summary is older than the sweep: an earlier run's
    assert "earlier run" in sweep._reason(job, since)
    (job / "__main__.log").write_text(
        "[..][mvtec_seg][ERROR] - job unet_gt_widget failed: run folder x already holds a run\n"
    )
    assert sweep._reason(job, since) == "run folder x already holds a run"
    assert sweep._reason(job, None) is None
    failure = job / "failed" / "t" / "summary.json"
    failure.parent.mkdir(parents=True)
    failure.write_text(json.dumps({"status": "failed", "error": "NaN loss"}))
    assert sweep._reason(job, None) == "NaN loss"


def test_a_sweep_into_a_folder_holding_runs_is_refused(tmp_path: Path, capsys) -> None:
    """Before any job: Hydra would rewrite each job's .hydra/ otherwise. With resume=true it goes on."""
    from omegaconf import OmegaConf

    (tmp_path / "0_unet_gt_widget").mkdir()
    (tmp_path / "0_unet_gt_widget" / "summary.json").write_text("{}")
    config = OmegaConf.create(
        {"resume": False, "hydra": {"sweep": {"dir": str(tmp_path)}, "overrides": {"task": []}}}
    )
    with pytest.raises(SystemExit) as stop:
        sweep.RunFolderGuard().on_multirun_start(config)
    assert stop.value.code == 2 and "already holds 1 run folder" in capsys.readouterr().err
    config.hydra.overrides.task = ["resume=true"]
    sweep.RunFolderGuard().on_multirun_start(config)  # each job is checked on its own
