"""Every benchmark script runs in its tiny mode and writes its markdown section; the runner assembles them;
the GPU script (`gpu_transfusion.sh`) names only flags and settings that exist.

Benchmarks are not tests (no timing is asserted here): this only keeps the scripts and `make bench` working.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mvtec_seg.config import compose_config

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _runner():
    spec = importlib.util.spec_from_file_location("run_all", BENCH / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_all = _runner()
SCRIPTS = run_all.discover()


def test_discovery_finds_the_scripts_and_not_the_helpers(tmp_path: Path) -> None:
    assert {"metrics_scale", "unet_bottle", "lightning_overhead", "transfusion_inference"} <= set(SCRIPTS)
    assert "common" not in SCRIPTS and "run_all" not in SCRIPTS
    (tmp_path / "new_bench.py").write_text("if __name__ == '__main__':\n    pass\n")
    (tmp_path / "helper.py").write_text("X = 1\n")
    (tmp_path / "_private.py").write_text("if __name__ == '__main__':\n    pass\n")
    assert run_all.discover(tmp_path) == ["new_bench"]


def test_assemble_keeps_sections_in_name_order_then_the_archive(tmp_path: Path) -> None:
    out = tmp_path / "results"
    (out / "archive").mkdir(parents=True)
    (out / "zeta.md").write_text("## Zeta\n\nz\n")
    (out / "alpha.md").write_text("## Alpha\n\na\n")
    (out / "archive" / "old.md").write_text("## Old hand-written\n\no\n")
    text = run_all.assemble(out, tmp_path / "RESULTS.md")
    assert (tmp_path / "RESULTS.md").read_text() == text
    assert text.startswith("# Measured results") and "cores" in text.splitlines()[2]
    assert text.index("## Alpha") < text.index("## Zeta") < text.index("## Old hand-written")


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_runs_in_tiny_mode(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    section = (tmp_path / f"{name}.md").read_text()
    assert section.startswith("## ")
    assert f"benchmarks/{name}.py --tiny" in section  # the exact command
    assert "Tiny mode" in section and "|" in section  # flagged, and a table


def test_pseudo_strategies_reuse_is_keyed_by_the_settings(tmp_path: Path, monkeypatch) -> None:
    """--reuse must not return a run made with other teacher / U-Net epochs; where outputs go is no setting."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("pseudo_strategies", BENCH / "pseudo_strategies.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def parse(*argv: str):
        return bench.parser().parse_args(["--root", "/data/mvtec", *argv])

    def folders(args, out_root: Path) -> list[Path]:
        return [bench.run_dir(tmp_path, stem, o) for _, stem, o in bench.plan(args, "bottle", out_root)]

    base = folders(parse(), tmp_path / "a")
    assert len(set(base)) == len(bench.STRATEGIES) + 2  # every row its own folder
    assert folders(parse(), tmp_path / "b") == base  # the output root is not a setting
    longer = folders(parse("--teacher-epochs", "60"), tmp_path / "a")
    assert longer[1] == base[1]  # U-Net(GT) does not depend on the teacher
    assert not {longer[0], *longer[2:]} & set(base)  # the teacher and every pseudo row run again
    unet = folders(parse("--unet-epochs", "30"), tmp_path / "a")
    assert unet[0] == base[0] and not set(unet[1:]) & set(base[1:])  # the teacher row is reused


def test_full_collections_are_counted_only_while_the_timed_loop_runs(monkeypatch) -> None:
    """transfusion_speed's loop reports the full GCs inside its timed steps (a compile's heap makes each one
    long): a full collection counts only while active, and a young-generation one never."""
    import gc

    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("transfusion_speed", BENCH / "transfusion_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with bench.FullCollections() as full:
        gc.collect()
        full.active = True
        gc.collect(0)
        gc.collect()
        gc.collect()
        full.active = False
        gc.collect()
    assert full not in gc.callbacks
    assert full.count == 2 and full.seconds > 0 and full.summary()["count"] == 2


def _gpu_script_runs() -> list[tuple[int, str, list[str]]]:
    """(step, benchmark, arguments) of every `want N && run LOG SECONDS benchmarks/X.py ...` line of
    gpu_transfusion.sh, continuation lines joined and its `STAGE=(...)` array expanded."""
    text = (BENCH / "gpu_transfusion.sh").read_text().replace("\\\n", " ")
    stage = re.search(r"^STAGE=\((.*?)\)", text, flags=re.M | re.S)
    stage_args = shlex.split(stage.group(1)) if stage else []
    runs = []
    for line in text.splitlines():
        m = re.match(r"want (\d+) && run \S+ \d+ benchmarks/(\w+)\.py (.*)", line)
        if m:
            args = shlex.split(m.group(3).replace('"${STAGE[@]}"', shlex.join(stage_args)))
            runs.append((int(m.group(1)), m.group(2), args))
    return runs


def test_gpu_script_names_only_flags_and_settings_that_exist() -> None:
    """A device call is scarce (minutes a session, when lent at all): a renamed flag or setting in the GPU
    script would spend one on an argparse error. Every `--flag` must be one its benchmark declares, every
    Hydra override must compose, and the script must parse."""
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_transfusion.sh")]).returncode == 0
    runs = _gpu_script_runs()
    assert sorted({step for step, _, _ in runs}) == list(range(1, 14))  # the thirteen steps the header names
    flag = re.compile(r"add_argument\(\s*\"(--[\w-]+)\"")
    shared = set(flag.findall((BENCH / "common.py").read_text()))  # bench_parser's --out, --tiny
    for step, name, args in runs:
        source = (BENCH / f"{name}.py").read_text()
        declared = set(flag.findall(source)) | (shared if "bench_parser(" in source else set())
        flags = {a for a in args if a.startswith("--")}
        assert flags <= declared, f"step {step}: {name}.py does not declare {sorted(flags - declared)}"
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        if overrides:
            compose_config(overrides)  # raises on an unknown setting or option
