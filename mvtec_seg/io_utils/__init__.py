"""Files every stage shares: atomic writes (`atomic`), the one inter-process lock (`locks`), the proofs
that artefacts are whole (`proofs`), build-once with rebuild of damaged artefacts (`build`), file names
(`names`)."""

from mvtec_seg.io_utils.atomic import (
    WRITE_ERRNOS,
    atomic_save_npz,
    atomic_save_png,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    content_key,
    file_digest,
    flat_name,
    png_bytes,
    write_error,
)
from mvtec_seg.io_utils.build import build_once, discard
from mvtec_seg.io_utils.locks import LockHeld, file_lock, folder_lock, hold_folder
from mvtec_seg.io_utils.names import check_name, shown_name
from mvtec_seg.io_utils.proofs import damage, format_problem, proof_path, write_proof

__all__ = [
    "WRITE_ERRNOS",
    "LockHeld",
    "atomic_save_npz",
    "atomic_save_png",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "build_once",
    "check_name",
    "content_key",
    "damage",
    "discard",
    "file_digest",
    "file_lock",
    "flat_name",
    "folder_lock",
    "format_problem",
    "hold_folder",
    "png_bytes",
    "proof_path",
    "shown_name",
    "write_error",
    "write_proof",
]
