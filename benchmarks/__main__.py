"""`python -m benchmarks <quality|labels|demo|speed|metrics|all|results> [key=value ...]`.

Overrides go to the suite's grid (`benchmarks/suites/<suite>.yaml`), e.g. `select.categories=[bottle]`,
`select.rows=[unet_gt]`, `select.seeds=[0]`, `tiny=true` (a smoke run of seconds), `out=<folder for the
CSV>`, `runs=<folder for the run folders>`, `cache=<paths.cache_dir>`. Exit code 1 when a case failed.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from benchmarks import demo, labels, metrics, quality, report, speed
from benchmarks.runner import RESULTS_DIR, ROOT, SUITES, load_suite, write_rows
from mvtec_seg.errors import UserError

RUNNERS = {"quality": quality, "labels": labels, "demo": demo, "speed": speed, "metrics": metrics}


def run_suite(name: str, overrides: list[str]) -> list[dict]:
    """Run one suite, merge its rows into `<out>/<name>.csv` and regenerate RESULTS.md beside it."""
    cfg = load_suite(name, overrides)
    out = Path(cfg.get("out") or RESULTS_DIR)
    runs = Path(cfg.get("runs") or ROOT / "outputs" / "benchmarks" / name)
    cache = Path(cfg.get("cache") or os.environ.get("MVTEC_SEG_CACHE") or ROOT / "outputs" / "_cache")
    runs.mkdir(parents=True, exist_ok=True)
    module = RUNNERS[name]
    rows: list[dict] = []

    def emit(row: dict) -> None:  # each case lands in the CSV as it finishes: a long grid cut short keeps it
        rows.append(row)
        write_rows(out / f"{name}.csv", [row], module.KEY)
        report.build(out)

    module.run(cfg, runs.resolve(), cache.resolve(), emit)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    name, overrides = argv[0], argv[1:]
    try:
        if name == "results":
            print(f"wrote {report.build()}")
            return 0
        names = list(SUITES) if name == "all" else [name]
        failed = []
        for n in names:
            rows = run_suite(n, overrides)
            failed += [r for r in rows if r.get("status") == "failed"]
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for r in failed:
        print(
            f"failed: {r.get('category')} / {r.get('row')} / seed {r.get('seed')}: {r['error']}",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
