"""User-facing errors: one clear line naming the path or setting and the fix, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration. The CLI prints the message alone and exits with code 2."""
