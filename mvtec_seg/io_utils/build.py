"""Build a shared artefact once across processes, and rebuild it when it is damaged.

Sweeps start many jobs at once on a shared file system: a shared artefact (synthetic data, decoded arrays,
teacher maps, pseudo masks) must be computed by one job only, and no reader may see half of it or use a
damaged one (a copy cut short, a full disk, a sync tool): each is published with its proof (`proofs`) and
verified before every use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from mvtec_seg.io_utils.atomic import _fsync_dir
from mvtec_seg.io_utils.locks import file_lock
from mvtec_seg.io_utils.proofs import damage, proof_path, write_proof

log = logging.getLogger(__name__)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def build_once(target: Path | str, build: Callable[[Path], None], verify: bool = True) -> Path:
    """Return ``target``, building it first if needed (or if it is damaged), exactly once across processes.

    ``build(tmp)`` must create ``tmp`` (a file or a directory; ``tmp`` does not exist yet, its parent does).
    Its proof (`write_proof`) is recorded and it is renamed onto ``target`` in one step, so readers see
    either nothing or the complete artefact. If ``build`` raises, the temporary is removed and nothing is
    published. An existing ``target`` is verified (`damage`) on every call: a damaged one is named in one
    log line and rebuilt (everything built here can be remade from its inputs). `verify=False`: built once,
    never checked or replaced (generated data, which a user may edit like any data).
    """
    target = Path(target)
    if target.exists() and (not verify or damage(target) is None):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target):
        if target.exists():  # another job built it while we waited, or it is damaged
            problem = damage(target) if verify else None
            if problem is None:
                return target
            log.warning("damaged cache artefact %s (%s): rebuilding it", target, problem)
            discard(target)
        # Only the lock holder builds, so any temporary left here is from a killed job: remove it.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            _remove(stale)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            build(tmp)
            if not tmp.exists():
                raise RuntimeError(f"build_once: the build function did not create {tmp}")
            if verify:
                write_proof(tmp, proof_at=None if tmp.is_dir() else proof_path(target))
            os.replace(tmp, target)
        except BaseException:
            _remove(tmp)
            raise
        _fsync_dir(target.parent)
    return target


def discard(path: Path) -> None:
    """Remove a damaged artefact: renamed aside first, so a reader that has it open (memory-mapped) keeps
    its bytes and no reader finds half of it."""
    aside = path.with_name(f".{path.name}.damaged-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.replace(path, aside)
    except OSError:
        aside = path
    _remove(aside)
    if not path.is_dir():
        with contextlib.suppress(OSError):
            proof_path(path).unlink()
