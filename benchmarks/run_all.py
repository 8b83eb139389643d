"""`make bench`: run every benchmark script and assemble benchmarks/RESULTS.md from their sections.

A benchmark is any ``benchmarks/<name>.py`` with a ``__main__`` guard, except this runner and names starting
with ``_`` (helper modules such as common.py have no ``__main__`` guard). Each is run as
``python benchmarks/<name>.py --out benchmarks/results [--tiny]`` and writes ``benchmarks/results/<name>.md``.
RESULTS.md = a header (machine, date) + every ``results/*.md`` in name order + every ``results/archive/*.md``
(hand-written figures kept from before the runner), so a script that was not re-run keeps its last section.

    .venv/bin/python benchmarks/run_all.py [--only NAME ...] [--tiny] [--out DIR] [--results FILE] [--assemble-only]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NOT_BENCHMARKS = {"run_all"}


def discover(folder: Path = HERE) -> list[str]:
    """Names of the benchmark scripts in ``folder``, sorted (the order of RESULTS.md)."""
    names = []
    for path in sorted(folder.glob("*.py")):
        if path.stem in NOT_BENCHMARKS or path.stem.startswith("_"):
            continue
        if "__main__" in path.read_text():
            names.append(path.stem)
    return names


def run(name: str, out: Path, tiny: bool = False, timeout: float | None = None) -> int:
    """Run one script with ``--out out``; its exit code (124 on timeout)."""
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--out", str(out), *(["--tiny"] if tiny else [])]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    print(f"== {name}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
    return rc


def assemble(out: Path, results: Path) -> str:
    """Write RESULTS.md: header + the sections of ``out`` (name order) + those of ``out/archive``."""
    sys.path.insert(0, str(HERE))
    from common import machine

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = (
        "# Measured results\n\n"
        "Assembled by `make bench` (`benchmarks/run_all.py`) on "
        f"{when}, on {machine()}. Every section below was written by its benchmark script and states its "
        "own exact command, machine and date (a section not re-run this time keeps its earlier figures); "
        "every ratio says what it is a ratio to. The last sections are hand-written figures measured before "
        "the runner existed, kept as they were (`benchmarks/results/archive/`). How to add a benchmark: "
        "`benchmarks/README.md`.\n"
    )
    parts = [header]
    for folder in (out, out / "archive"):
        parts += [p.read_text().strip() + "\n" for p in sorted(folder.glob("*.md"))]
    text = "\n".join(parts)
    results.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="benchmark names to run (default: all)")
    ap.add_argument("--tiny", action="store_true", help="pass --tiny to every script (a smoke run)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--timeout", type=float, default=None, help="seconds per script")
    ap.add_argument(
        "--assemble-only", action="store_true", help="run nothing; rebuild RESULTS.md from the sections"
    )
    args = ap.parse_args()
    if args.assemble_only:
        assemble(Path(args.out), Path(args.results))
        print(f"wrote {args.results}")
        return
    names = discover()
    only = [n for n in (args.only or []) if n]
    unknown = sorted(set(only) - set(names))
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; known: {names}")
    failed = [n for n in (only or names) if run(n, Path(args.out), args.tiny, args.timeout) != 0]
    assemble(Path(args.out), Path(args.results))
    print(f"wrote {args.results}")
    if failed:
        sys.exit(f"failed: {failed} (their earlier sections were kept)")


if __name__ == "__main__":
    main()
