"""File names that are not valid UTF-8 are refused before any work, with one line naming them.

Linux allows any bytes but `/` and NUL in a name; Python reads the others as lone surrogates, which JSON,
YAML, CSV and logs cannot write. A run records paths in its manifest, `files.json`, summaries, CSVs and
predictions, so such a name is refused where it is first read, escaped, with the command that renames it.
"""

from __future__ import annotations

import os
from pathlib import Path

from mvtec_seg.errors import UserError


def shown_name(path: Path | str) -> str:
    """The path with each byte that is not UTF-8 escaped (`caf\\xe9.png`): printable anywhere."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_name(path: Path | str, what: str = "file name") -> None:
    """A `UserError` naming `path` (escaped) when its name is not valid UTF-8."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(
            f"{what} {shown_name(path)} is not valid UTF-8 — rename it to UTF-8 (for a folder of Latin-1 "
            f"names: convmv -f latin1 -t utf8 -r --notest <folder>), or remove it"
        ) from None
