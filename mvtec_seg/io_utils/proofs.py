"""What proves an artefact whole: written with it, checked before it is used.

A proof (`proof.json` in an artefact folder, `<name>.proof.json` beside a file artefact) records each file's
size and a digest: of every byte up to `FULL_DIGEST_BYTES`, else of the size and `SAMPLES` blocks of
`BLOCK` bytes spread from the first to the last byte. A file cut short, grown, or with a rewritten head or
tail fails it; reading a sampled proof costs about the same for a 100 MB or a 10 GB map file
(`docs/design.md`, "Verified artefacts"). An artefact written before proofs existed is checked by its
format instead (`format_problem`: a cut `.npy`, zip (`.ckpt`, `.npz`), JSON or PNG cannot pass) and, if
whole, adopted: its proof is written then.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mvtec_seg.errors import UserError
from mvtec_seg.io_utils.atomic import atomic_write_json

PROOF_FILE = "proof.json"
FULL_DIGEST_BYTES = 16 << 20
SAMPLES, BLOCK = 16, 64 << 10
VERSION = 1


def quick_digest(path: Path | str, size: int | None = None) -> str:
    """`full:<blake2b>` of a small file, `sampled:<blake2b>` of the size and `SAMPLES` blocks of a big one."""
    size = os.path.getsize(path) if size is None else size
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        if size <= FULL_DIGEST_BYTES:
            h.update(fh.read())
            return f"full:{h.hexdigest()}"
        h.update(str(size).encode())
        for k in range(SAMPLES):
            fh.seek((size - BLOCK) * k // (SAMPLES - 1))
            h.update(fh.read(BLOCK))
    return f"sampled:{h.hexdigest()}"


def proof_path(file: Path | str) -> Path:
    """The proof beside a file artefact."""
    file = Path(file)
    return file.with_name(f"{file.name}.proof.json")


def _entry(path: Path) -> dict:
    size = path.stat().st_size
    return {"size": size, "digest": quick_digest(path, size)}


def write_proof(artefact: Path, files: Iterable[str] | None = None, proof_at: Path | None = None) -> Path:
    """Record the proof of `artefact`: a folder's `files` (relative names; default every file in it, at any
    depth), or one file (its proof beside it, or at `proof_at`). Later additions to a folder (another
    artefact nested in it) are not part of its proof."""
    artefact = Path(artefact)
    if artefact.is_dir():
        names = (
            sorted(p.relative_to(artefact).as_posix() for p in artefact.rglob("*") if p.is_file())
            if files is None
            else sorted(files)
        )
        names = [n for n in names if n != PROOF_FILE]
        record = {n: _entry(artefact / n) for n in names}
        target = artefact / PROOF_FILE
    else:
        record = {".": _entry(artefact)}
        target = proof_at or proof_path(artefact)
    return atomic_write_json(target, {"version": VERSION, "files": record})


def _npy_problem(path: Path, size: int) -> str | None:
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(fh)
        except (ValueError, OSError, struct.error) as err:
            return f"its .npy header is unreadable ({err})"
        expected = fh.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if dtype.hasobject or size == expected:
        return None
    return f"{size} bytes where its header says {expected}"


def _zip_problem(path: Path, size: int) -> str | None:
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"member {info.filename} runs past the end"
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        return f"not a whole zip archive ({err})"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_bytes())
    except (ValueError, OSError) as err:
        return f"not whole JSON ({err})"
    return None


PNG_END = b"IEND\xaeB`\x82"


def _png_problem(path: Path, size: int) -> str | None:
    with open(path, "rb") as fh:
        fh.seek(max(0, size - len(PNG_END)))
        return None if fh.read() == PNG_END else "a PNG cut short (no end chunk)"


def format_problem(path: Path | str) -> str | None:
    """Why a file cannot be whole by its format (`.npy`, `.ckpt`/`.npz`/`.pt`/`.pth`, `.json`, `.png`),
    None if its format does not say it is damaged (other formats are not checked)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        suffix = path.suffix.lower()
        if suffix == ".npy":
            return _npy_problem(path, size)
        if suffix in (".ckpt", ".npz", ".pt", ".pth"):
            return _zip_problem(path, size)
        if suffix == ".json":
            return _json_problem(path)
        if suffix == ".png":
            return _png_problem(path, size)
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    return None


def _proof_problem(base: Path, record: dict, is_dir: bool) -> str | None:
    for name, want in record.items():
        path = base / name if is_dir else base
        shown = name if is_dir else path.name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{shown} is missing"
        if size != want.get("size"):
            return f"{shown} is {size} bytes, {want.get('size')} when written"
        if quick_digest(path, size) != want.get("digest"):
            return f"{shown} does not have the bytes it was written with"
    return None


NESTED_MARKS: tuple[str, ...] = (PROOF_FILE, "files.json")
"""A subfolder holding one of these is another artefact built inside this one (pseudo masks beside their
maps), not part of it."""


def _own_files(folder: Path) -> list[Path]:
    """The files of an artefact folder, without those of artefacts nested in its subfolders."""
    own: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file():
            own.append(entry)
        elif entry.is_dir() and not any((entry / m).exists() for m in NESTED_MARKS):
            own += _own_files(entry)
    return own


def damage(artefact: Path | str, files: Iterable[str] | None = None) -> str | None:
    """None when `artefact` (a folder or a file) is whole by its proof, else one phrase saying what is
    wrong. Without a proof (written before proofs), its files (`files`, default all) are checked by
    their format and, if whole, the proof is written now."""
    artefact = Path(artefact)
    is_dir = artefact.is_dir()
    proof = artefact / PROOF_FILE if is_dir else proof_path(artefact)
    if proof.exists():
        try:
            record = json.loads(proof.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"its proof {proof.name} is unreadable"
        return _proof_problem(artefact, record, is_dir)
    if not artefact.exists():
        return "it is missing"
    if not is_dir:
        paths = [artefact]
    else:
        paths = [artefact / n for n in files] if files is not None else _own_files(artefact)
        files = [p.relative_to(artefact).as_posix() for p in paths]
    for path in paths:
        shown = path.relative_to(artefact) if is_dir else path.name
        if not path.is_file():
            return f"{shown} is missing"
        problem = format_problem(path)
        if problem:
            return f"{shown}: {problem}"
    with contextlib.suppress(OSError, UserError):  # a read-only cache: checked by format next time
        write_proof(artefact, files)
    return None
