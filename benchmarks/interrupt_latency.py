"""Seconds from a signal to the end of the CLI, sent when a stage starts (issue #7).

    python benchmarks/interrupt_latency.py --marker "computing teacher maps" -- \
        model=unet mask=pseudo debug=fast teacher.trainer.max_epochs=1 paths.output_dir=/tmp/il hydra.run.dir=/tmp/il/run

Starts `python -m mvtec_seg <overrides>`, waits for `--marker` in its output, sends `--signal`, and prints
the exit code, when the one `error:` line appeared and when the process ended. `--tiny`: a 32 px U-Net on the
synthetic category, interrupted once its training has begun (the model summary's "Total Flops").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import bench_parser, md_table, write_section


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--marker", default=None, help="log text that says the stage has started")
    parser.add_argument("--signal", default="SIGTERM", choices=["SIGTERM", "SIGINT"])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.tiny:
        work = Path(tempfile.mkdtemp())
        args.marker = args.marker or "Total Flops"
        args.overrides = args.overrides or [
            "debug=fast",
            "data.image_size=32",
            "trainer.max_epochs=1000",
            f"paths.output_dir={work / 'out'}",
            f"hydra.run.dir={work / 'run'}",
        ]
    if not args.marker:
        parser.error("--marker is required (the log text that says the stage has started)")
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
    error = last[-1] if last else "(no error line)"
    print(
        f"marker after {t0 - start:.1f} s; rc {proc.returncode}; error line after {line_s} s; exit after {end_s:.2f} s"
    )
    print(error)
    print(f"log: {log} (cpu count {os.cpu_count()})")
    line = f"{line_s:.2f}" if line_s is not None else "none"
    table = md_table(
        ["stage marker", "signal", "exit code", "error line after (s)", "process gone after (s)", "the line"],
        [[f"`{args.marker}`", args.signal, proc.returncode, line, f"{end_s:.2f}", f"`{error[:120]}`"]],
    )
    write_section(args, "interrupt_latency", "Interruption latency (issue #7)", table)


if __name__ == "__main__":
    main()
