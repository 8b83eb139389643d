"""The one inter-process lock: shared cache stages wait for it, run and sweep folders refuse to share it.

An exclusive `flock` on a lock file, with its holder (pid, host, start time, what) written into the file
once held. The kernel releases a flock when its holder dies, however it dies (SIGKILL included), so a lock
left by a killed process is simply taken over by the next one (its old holder line is named in a log line
when that pid is gone from this host). A process that finds the lock held is told who holds it.

Locks on a network file system are only as good as its `flock` (NFSv4 and Lustre with `flock` mount options
honour it across hosts; some do not): point `paths.cache_dir` and the outputs at a local or a locking one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mvtec_seg.errors import UserError

log = logging.getLogger(__name__)
FOLDER_LOCK = ".lock"
"""The lock file inside a run or sweep folder."""

_HELD: dict[str, list[int]] = {}  # lock file -> [fd, depth]: folder locks this process holds
_GUARD = threading.Lock()


class LockHeld(UserError):
    """Another live process holds the lock (the message names it: pid and host)."""


def holder(lock_path: Path | str) -> dict | None:
    """The holder recorded in a lock file (`pid`, `host`, `since`, `what`), None if none is readable."""
    try:
        info = json.loads(Path(lock_path).read_text() or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def describe(info: dict | None) -> str:
    """'pid 123 on host gpu7 (since 2026-01-01 12:00:00)' or 'another process' when nothing is recorded."""
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"])) if info.get("since") else "?"
    return f"pid {info.get('pid')} on host {info.get('host')} (since {since})"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(info: dict | None) -> bool:
    """A recorded holder on this host whose process is gone."""
    return bool(
        info
        and info.get("host") == socket.gethostname()
        and isinstance(info.get("pid"), int)
        and info["pid"] != os.getpid()
        and not pid_alive(info["pid"])
    )


def _try(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _record(fd: int, lock_path: Path, what: str) -> None:
    """Write this process as the holder (after taking the lock: only the holder writes)."""
    before = holder(lock_path)
    if _stale(before):
        log.info("taking over %s: its holder, %s, is no longer running", lock_path, describe(before))
    line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "what": what})
    os.ftruncate(fd, 0)
    os.pwrite(fd, line.encode() + b"\n", 0)


def acquire(lock_path: Path, what: str, wait: bool, refuse: str = "") -> int:
    """Take the lock and return its file descriptor. Held by another process: wait (`wait`, naming the
    holder in a log line), else raise `LockHeld` naming `what`, the holder and `refuse` (what to do)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if not _try(fd):
            if not wait:
                # the holder may have died a moment ago: the kernel frees its lock as its files close
                deadline = time.monotonic() + (2.0 if _stale(holder(lock_path)) else 0.0)
                while not _try(fd):
                    if time.monotonic() >= deadline:
                        raise LockHeld(f"{what} is in use by {describe(holder(lock_path))} — {refuse}")
                    time.sleep(0.05)
            else:
                log.info("waiting for %s: held by %s", what, describe(holder(lock_path)))
                fcntl.flock(fd, fcntl.LOCK_EX)
        _record(fd, lock_path, what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def release(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path | str, what: str | None = None) -> Iterator[Path]:
    """Exclusive lock on ``<path>.lock`` for a shared cache stage: waits while another process builds
    (naming it in a log line), taken over at once from a killed one."""
    path = Path(path)
    lock_path = path.with_name(path.name + ".lock")
    fd = acquire(lock_path, what or str(path), wait=True)
    try:
        yield lock_path
    finally:
        release(fd)


@contextlib.contextmanager
def folder_lock(folder: Path | str, what: str, refuse: str) -> Iterator[Path]:
    """Hold ``<folder>/.lock`` while a run or sweep writes the folder; another process that asks for it
    gets a `LockHeld` (one line: `what`, its holder's pid and host, then `refuse`). Re-entrant within
    the process (the folder check and the run take it in turn)."""
    lock_path = (Path(folder) / FOLDER_LOCK).absolute()
    key = str(lock_path)
    with _GUARD:
        held = _HELD.get(key)
        if held is None:
            held = _HELD[key] = [acquire(lock_path, what, wait=False, refuse=refuse), 0]
        held[1] += 1
    try:
        yield lock_path
    finally:
        with _GUARD:
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                release(held[0])


def hold_folder(folder: Path | str, what: str, refuse: str) -> None:
    """Take the folder lock for the rest of this process (released when it exits, however it exits)."""
    folder_lock(folder, what, refuse).__enter__()
