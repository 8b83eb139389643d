"""One command-line style for every command: Hydra `key=value` overrides, `--help`, one `error:` line.

`python -m mvtec_seg` is a Hydra application (sweeps, launchers, run folders). The other commands (`predict`,
`export`, `report`, `compare`) compose their own config (`mvtec_seg/conf/<name>.yaml`) with the same override
grammar through Hydra's Compose API, so they write no run folder of their own; `--help` prints the command's
purpose and its settings with their defaults. Every command says a user's mistake in one `error:` line and
exits 2 (`one_line_errors`), and ends at once on SIGTERM/SIGINT with 128 + the signal.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from mvtec_seg.errors import UserError
from mvtec_seg.interrupt import Interrupted, install_handlers, stage
from mvtec_seg.io_utils import WRITE_ERRNOS, write_error


def config_error(err: Exception, names: Sequence[str] = ()) -> str:
    """A Hydra or OmegaConf composition error (typo, unknown option, bad value) as one line with the fix;
    `names` are the settings a typo is matched against."""
    text = " ".join(
        line.strip() for line in str(err).split("Config search path")[0].splitlines() if line.strip()
    )
    typo = re.match(r"Could not override '([^']+)'", text) or re.search(
        r"Key '([^']+)' is not in struct", text
    )
    if typo:
        close = difflib.get_close_matches(typo.group(1), list(names), n=1)
        value = re.search(r"use \+[^=\s]+=(\S+)", text)
        hint = (
            f"did you mean {close[0]}={value.group(1) if value else '...'}?"
            if close
            else "check its spelling"
        )
        return f"unknown setting '{typo.group(1)}' — {hint} (--help lists the settings)"
    if "Could not find" in text:
        return f"{text} — pick one of those options"
    return f"{text} — fix that override (--help lists the settings)"


@contextlib.contextmanager
def one_line_errors(names: Callable[[], Sequence[str]] | None = None) -> Iterator[None]:
    """Say a user's mistake in one `error:` line and exit 2: bad input (`UserError`), a config typo or unknown
    option (Hydra), a folder that cannot be written (full disk, read-only). Anything else is a bug: traceback."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except HydraException as err:
        print(f"error: {config_error(err, names() if names else ())}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # e.g. writing into a read-only or full output folder
        if err.errno not in WRITE_ERRNOS:
            raise
        verb = "access" if err.errno in (errno.EACCES, errno.EPERM) else "write"
        print(f"error: {write_error(err.filename or '', err, verb)}", file=sys.stderr)
        sys.exit(2)


def settings_help(cfg: DictConfig) -> str:
    """Every setting of a command's config with its default, one per line."""
    lines: list[str] = []

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                lines.append(f"  {prefix}{key}={'null' if value is None else value}")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return "\n".join(lines)


def compose_command(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """The command's config (`mvtec_seg/conf/<config_name>.yaml`) with `overrides` (Hydra's grammar)."""
    from hydra import compose, initialize_config_dir

    from mvtec_seg.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def run_command(
    prog: str,
    doc: str | None,
    argv: Sequence[str],
    fn: Callable,
    config_name: str | None = None,
) -> int:
    """The shared main of the commands: `--help`, logging, signal handling and one-line errors around
    `fn(cfg)` (with `config_name`: the composed command config) or `fn(argv)` (without: the overrides of
    the run config, composed by `fn`). Returns the exit code."""
    argv = list(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mvtec_seg").setLevel(logging.INFO)  # the plan and the progress lines
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if any(a in ("-h", "--help") for a in argv):
        print(f"python -m {prog} [key=value ...]\n\n{(doc or '').strip()}")
        if config_name:
            print("\nSettings (defaults):\n" + settings_help(compose_command(config_name, [])))
        return 0
    install_handlers()

    def names() -> list[str]:
        if config_name is None:
            from mvtec_seg.config import setting_names

            return setting_names()
        return [
            line.strip().split("=")[0]
            for line in settings_help(compose_command(config_name, [])).splitlines()
        ]

    try:
        with one_line_errors(names), stage(prog.rsplit(".", 1)[-1]):
            return int(fn(compose_command(config_name, argv) if config_name else argv) or 0)
    except SystemExit as stop:
        return int(stop.code or 0)
    except Interrupted as err:  # everything is written atomically: nothing half-written stays
        print(f"error: {err.message()}", file=sys.stderr)
        return err.exit_code
