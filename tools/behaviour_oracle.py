"""Behaviour oracle for refactors: run representative jobs with one checkout's code and record everything a
run writes except timings and absolute paths, so two code versions can be compared exactly.

    git worktree add /tmp/base <rev>                                   # the version to compare against
    .venv/bin/python tools/behaviour_oracle.py run /tmp/base /tmp/base.json
    .venv/bin/python tools/behaviour_oracle.py run . /tmp/new.json
    .venv/bin/python tools/behaviour_oracle.py compare /tmp/base.json /tmp/new.json

Recorded per job: every `summary.json` field (timings, folders and the checkpoint path left out), the
files of the run folder, SHA-256 of each array in `test_predictions.npz` and of the pseudo masks. About
a minute on 2 CPU cores for the eleven jobs below.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

FAST_TEACHER = [
    "debug=fast",
    "teacher.trainer.max_epochs=2",
    "teacher.trainer.limit_train_batches=2",
    "data.image_size=32",
]
SMALL_PAPER = [
    "teacher.params.net.base_channels=8",
    "teacher.params.net.num_res_blocks=1",
    "teacher.params.net.norm_groups=4",
    "teacher.params.scheduler.step_size=1",
]
JOBS: dict[str, list[str]] = {
    "unet_gt": ["debug=fast", "trainer.limit_test_batches=null"],
    "deeplab_gt": ["model=deeplab", "debug=fast", "data.image_size=32"],
    "unet_fast_cpu": ["experiment=unet_fast_cpu", "debug=fast", "data.train_crop=32", "trainer.max_epochs=2"],
    "unet_pseudo": ["mask=pseudo", *FAST_TEACHER],
    "unet_pseudo_auto": [
        "mask=pseudo",
        "mask.select=auto",
        "mask.candidates=[{rounds: 0},{rounds: 0, threshold: {strategy: otsu}}]",
        "mask.synthetic_fraction=0.5",
        *FAST_TEACHER,
    ],
    "deeplab_pseudo_otsu": ["mask=pseudo", "model=deeplab", "mask.threshold.strategy=otsu", *FAST_TEACHER],
    "transfusion": ["model=transfusion", *FAST_TEACHER],
    "transfusion_paper_small": ["experiment=transfusion_paper", *FAST_TEACHER, *SMALL_PAPER],
    "dry_unet": ["dry_run=true"],
    "dry_pseudo": ["dry_run=true", "mask=pseudo", "model=deeplab"],
    "dry_transfusion": ["dry_run=true", "model=transfusion"],
}
UNCOMPARED = {"time", "throughput", "run_dir", "checkpoint", "checkpoint_digest"}
"""Wall times and absolute paths (a Lightning checkpoint holds its callbacks' folders: its digest too)."""


def _digest(array) -> str:
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _scrub(value, tmp: str):
    """`value` without folders and with the job's temporary root as `<tmp>` (every run writes elsewhere)."""
    if isinstance(value, dict):
        return {
            k: _scrub(v, tmp) for k, v in value.items() if k not in ("dir", "teacher", "manifest", "train_s")
        }
    if isinstance(value, list):
        return [_scrub(v, tmp) for v in value]
    if isinstance(value, str):
        return value.replace(tmp, "<tmp>")
    return value


def run(repo: Path, out_json: Path, jobs: list[str]) -> None:
    sys.path.insert(0, str(repo.resolve()))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["WANDB_MODE"] = "disabled"
    warnings.filterwarnings("ignore")
    import numpy as np

    import mvtec_seg
    from mvtec_seg.config import compose_config
    from mvtec_seg.train import train

    print("code under test:", Path(mvtec_seg.__file__).parent, flush=True)
    result = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in jobs:
            run_dir = tmp / name
            paths = [f"paths.output_dir={tmp / 'outputs'}", f"paths.cache_dir={tmp / 'cache'}"]
            cfg = compose_config([*paths, "trainer.enable_progress_bar=false", *JOBS[name]], run_dir=run_dir)
            train(cfg)
            summary = json.loads((run_dir / "summary.json").read_text())
            record = {
                "summary": _scrub({k: v for k, v in summary.items() if k not in UNCOMPARED}, str(tmp)),
                "summary_keys": list(summary),
                "has": {k: summary[k] is not None for k in ("checkpoint",)}
                | {k: v is not None for k, v in summary["throughput"].items()},
                "files": sorted(
                    str(p.relative_to(run_dir))
                    for p in run_dir.rglob("*")
                    if p.is_file() and ".hydra" not in str(p)
                ),
            }
            if (run_dir / "test_predictions.npz").exists():
                with np.load(run_dir / "test_predictions.npz") as z:
                    record["test_predictions"] = {k: _digest(z[k]) for k in z.files}
            if summary.get("pseudo"):
                record["pseudo_masks"] = _digest(np.load(Path(summary["pseudo"]["dir"]) / "masks.npy"))
            result[name] = record
            print(name, json.dumps(summary["metrics"]), flush=True)
    out_json.write_text(json.dumps(result, indent=1, sort_keys=True))


def compare(a_path: Path, b_path: Path) -> int:
    a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
    differences: list[str] = []

    def walk(x, y, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                if k not in x or k not in y:
                    differences.append(f"{'added' if k not in x else 'removed'} {path}/{k}")
                else:
                    walk(x[k], y[k], f"{path}/{k}")
        elif x != y:
            differences.append(f"changed {path}: {str(x)[:120]} -> {str(y)[:120]}")

    walk(a, b, "")
    print("\n".join(differences) or f"identical: {len(a)} jobs")
    return 1 if differences else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("repo", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("jobs", nargs="*", help=f"some of {', '.join(JOBS)} (default: all)")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args()
    if args.cmd == "run":
        unknown = sorted(set(args.jobs) - set(JOBS))
        if unknown:
            ap.error(f"unknown job(s) {', '.join(unknown)}: choose from {', '.join(JOBS)}")
        run(args.repo, args.out, args.jobs or list(JOBS))
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
