"""Atomic writes, digests and content keys, shared by every stage.

Sweeps start many jobs at once on a shared file system: a reader must never see a half-written file or folder.
Everything is written to a temporary sibling and moved into place with ``os.replace``/``rename`` (`build`
makes a shared artefact once across jobs).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mvtec_seg.errors import UserError

WRITE_ERRNOS: frozenset[int] = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}
)
"""Errors of the place written to (full, read-only, not ours), not of the program: a user fixes them."""


def write_error(path: Path | str, err: OSError, verb: str = "write") -> UserError:
    """The one line for a write that the file system refused (full disk, read-only folder)."""
    return UserError(
        f"cannot {verb} {path}: {err.strerror or err} — free space or make the folder writable, or point "
        f"paths.output_dir / paths.cache_dir (MVTEC_SEG_OUTPUTS, MVTEC_SEG_CACHE) at another folder"
    )


def _fsync_dir(folder: Path) -> None:
    """Persist a rename: without it the new directory entry can be lost on a crash."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(fd: int, data: bytes) -> None:
    """Write all of `data` to a new file and flush it to the disk (a full disk raises here)."""
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write bytes so that ``path`` holds either the old content or all of the new, never a prefix.

    A full disk or a read-only folder is a `UserError` naming the file (nothing half-written is left).
    """
    path = Path(path)
    try:
        return _atomic_write_bytes(path, data)
    except OSError as err:
        if err.errno in WRITE_ERRNOS:
            raise write_error(path, err) from None
        raise


def _atomic_write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _write_file(fd, data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path | str, text: str, encoding: str = "utf-8") -> Path:
    """Atomic text write (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: Path | str, obj: Any, indent: int = 2) -> Path:
    """Atomic JSON write, indented for humans, with a trailing newline; numpy values become plain JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    """Let numpy scalars/arrays and paths pass through json.dumps (metrics are often numpy floats)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def file_digest(path: Path | str) -> str:
    """The BLAKE2b digest (128 bits, hex) of a file's bytes (raises OSError)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "blake2b").hexdigest()[:32]


def content_key(obj: Any) -> str:
    """A short, stable key for a JSON-able description of an artefact's inputs (its folder name)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def png_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 (or bool / [0,1] float) image array as PNG bytes, deterministically."""
    from PIL import Image

    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = np.clip(arr, 0.0, 1.0) * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def atomic_save_png(path: Path | str, array: np.ndarray) -> Path:
    """Save an image array ([H,W] grey or [H,W,3|4] colour) as PNG atomically."""
    return atomic_write_bytes(path, png_bytes(array))


def atomic_save_npz(path: Path | str, /, **arrays: Any) -> Path:
    """Save compressed arrays atomically (the name is kept as given: no ``.npz`` is appended)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def flat_name(text: str, fallback: str = "file") -> str:
    """'test/crack/000' -> 'test_crack_000': a name for one flat folder (letters, digits, `._-` only)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.") or fallback
