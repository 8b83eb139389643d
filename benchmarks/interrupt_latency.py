"""Seconds from a signal to the end of the CLI, sent when a stage starts (issue #7).

    python benchmarks/interrupt_latency.py --marker "computing teacher maps" -- \
        model=unet mask=pseudo debug=fast teacher.max_epochs=1 paths.output_dir=/tmp/il hydra.run.dir=/tmp/il/run

Starts `python -m mvtec_seg <overrides>`, waits for `--marker` in its output, sends `--signal`, and prints
the exit code, when the one `error:` line appeared and when the process ended.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--marker", required=True, help="log text that says the stage has started")
    parser.add_argument("--signal", default="SIGTERM", choices=["SIGTERM", "SIGINT"])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    log = Path(tempfile.mkdtemp()) / "cli.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "mvtec_seg", *args.overrides], stdout=fh, stderr=fh)
    start = time.monotonic()
    while args.marker not in log.read_text():
        if proc.poll() is not None:
            sys.exit(f"the run ended before {args.marker!r} appeared; see {log}")
        time.sleep(0.05)
    t0 = time.monotonic()
    proc.send_signal(getattr(signal, args.signal))
    line_s = None
    while proc.poll() is None:
        if line_s is None and "error: interrupted" in log.read_text():
            line_s = time.monotonic() - t0
        time.sleep(0.05)
    end_s = time.monotonic() - t0
    last = [x for x in log.read_text().splitlines() if x.startswith("error:")]
    print(
        f"marker after {t0 - start:.1f} s; rc {proc.returncode}; error line after {line_s} s; exit after {end_s:.2f} s"
    )
    print(last[-1] if last else "(no error line)")
    print(f"log: {log} (cpu count {os.cpu_count()})")


if __name__ == "__main__":
    main()
