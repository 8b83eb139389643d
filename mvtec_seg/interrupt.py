"""Clean interruption: SIGTERM/SIGINT end the job at once with one line and exit code 128 + signal.

Why our own handler: Lightning's signal connector only *notes* a SIGTERM (and checks the flag between
training batches), so a stage outside a training loop (decoding, teacher maps, pseudo masks, testing) ran
on for minutes. `install_handlers` makes both signals raise `Interrupted` in the main thread wherever it is;
Lightning keeps any handler that was installed before it and calls it, so ours still fires inside a Trainer.
`Interrupted` derives from BaseException, so no `except Exception` (ours, Hydra's, Lightning's) swallows it;
every artefact is written to a temporary and renamed, so nothing half-written is ever read later.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Interrupted", "current_stage", "install_handlers", "stage"]

_STAGES: list[str] = []
_MAIN_PID: int | None = None


class Interrupted(BaseException):  # noqa: N818 (a signal, like KeyboardInterrupt, not an error)
    """The job received SIGTERM or SIGINT; `exit_code` is 128 + the signal number (143, 130)."""

    def __init__(self, signum: int, stage: str | None) -> None:
        self.signum, self.stage = int(signum), stage
        super().__init__(self.message())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def message(self) -> str:
        where = f" during {self.stage}" if self.stage else ""
        return (
            f"interrupted by {signal.Signals(self.signum).name}{where}; no partial artefact is kept — "
            f"run the same command again to continue (add resume=true to continue a run's training)"
        )


def current_stage() -> str | None:
    """The innermost stage running now (e.g. "teacher maps"), for the interruption message."""
    return _STAGES[-1] if _STAGES else None


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Name a stage for the interruption message: `with stage("decoding"):` or `@stage("teacher maps")`."""
    _STAGES.append(name)
    try:
        yield
    finally:
        _STAGES.pop()


def _raise(signum: int, frame: Any) -> None:
    if os.getpid() != _MAIN_PID:  # a forked data-loader worker: end quietly, as torch expects
        raise KeyboardInterrupt
    # a second signal while unwinding (Ctrl+C twice) must not cut short the cleanup of the first
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum, current_stage())


def install_handlers() -> None:
    """SIGTERM and SIGINT raise `Interrupted` (main thread only; elsewhere Python cannot set handlers)."""
    global _MAIN_PID
    if threading.current_thread() is not threading.main_thread():
        return
    _MAIN_PID = os.getpid()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise)
