"""One command-line style for every command: Hydra `key=value` overrides, `--help`, one `error:` line.

`python -m mvtec_seg` is a Hydra application (sweeps, launchers, run folders); `compare` composes the same run
config. The other commands (`predict`, `export`, `report`) compose their own config
(`mvtec_seg/conf/commands/<name>.yaml`) with the same override grammar through Hydra's Compose API, so they
write no run folder of their own; `--help` prints the command's purpose and its settings with their
defaults. Every command says a user's mistake in one `error:` line and
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
from typing import Any

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mvtec_seg.errors import UserError
from mvtec_seg.interrupt import Interrupted, install_handlers, stage
from mvtec_seg.io_utils import WRITE_ERRNOS, write_error


def config_error(
    err: Exception, names: Sequence[str] = (), help_hint: str = "--help lists the settings"
) -> str:
    """A Hydra or OmegaConf composition error (typo, unknown option, bad value) as one line with the fix;
    `names` are the settings a typo is matched against, `help_hint` where the user finds them."""
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
        return f"unknown setting '{typo.group(1)}' — {hint} ({help_hint})"
    parse = re.match(r"Error parsing override '([^']*)'", text)
    if parse and "=" not in parse.group(1):
        return f"{parse.group(1)!r} is not key=value — pass settings as key=value ({help_hint})"
    if parse:
        return f"cannot read the override {parse.group(1)!r} — quote a value with brackets, commas or spaces"
    if "Could not find" in text:
        return f"{text} — pick one of those options"
    return f"{text} — fix that override ({help_hint})"


FOLDER_ERRNOS: frozenset[int] = frozenset({errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP})
"""A folder that cannot be made where it was asked for (below a file, under a system folder)."""


@contextlib.contextmanager
def one_line_errors(
    names: Callable[[], Sequence[str]] | None = None, help_hint: str = "--help lists the settings"
) -> Iterator[None]:
    """Say a user's mistake in one `error:` line and exit 2: bad input (`UserError`), a config typo or unknown
    option (Hydra), an interpolation that cannot be resolved, a folder that cannot be made or written (full
    disk, read-only). Anything else is a bug: traceback. Every command of the package runs inside it."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except HydraException as err:  # config typos and unknown options, before any job starts
        print(f"error: {config_error(err, names() if names else (), help_hint)}", file=sys.stderr)
        sys.exit(2)
    except OmegaConfBaseException as err:  # an interpolation that cannot be resolved, a value left unset
        key = getattr(err, "full_key", None) or "a setting"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(
            f"error: {key}: {first} — fix that setting (or the environment variable it reads)",
            file=sys.stderr,
        )
        sys.exit(2)
    except OSError as err:  # e.g. writing into a read-only or full output folder
        if err.errno in FOLDER_ERRNOS:
            print(
                f"error: cannot make the folder {err.filename or ''}: {err.strerror} — point the output "
                f"(hydra.run.dir / hydra.sweep.dir, paths.output_dir, MVTEC_SEG_OUTPUTS, or output=) at a "
                f"folder you can write",
                file=sys.stderr,
            )
            sys.exit(2)
        if err.errno not in WRITE_ERRNOS:
            raise
        verb = "access" if err.errno in (errno.EACCES, errno.EPERM) else "write"  # may have been a read
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
                shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
                lines.append(f"  {prefix}{key}={shown}")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return "\n".join(lines)


def command_args(cfg: DictConfig, fn: Callable[..., Any], required: Sequence[str] = ()) -> dict[str, Any]:
    """A composed command config as keyword arguments, each checked against its type (`arg_types`): Hydra's
    grammar reads `run=123` as a number and `format=null` as None; a path stays a string, a whole number
    is a valid float, and anything else out of type is one line naming the setting."""
    what = {str: "a text", int: "a whole number", float: "a number", bool: "true or false"}
    out: dict[str, Any] = {}
    for key, kind in arg_types(cfg, fn).items():
        value = cfg.get(key)
        if value is None:
            if key in required:
                raise UserError(f"{key}= is required (--help lists the settings)")
        elif kind is str and isinstance(value, str | int | float) and not isinstance(value, bool):
            value = str(value)
        elif kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"{key}={value!r} is not {what.get(kind, kind.__name__)}")
        out[key] = value
    return out


def arg_types(cfg: DictConfig, fn: Callable[..., Any]) -> dict[str, type]:
    """The type of each setting of a command's config, declared once: the annotation of the parameter of
    `fn` it is passed to (`threshold: float | None` -> float; a path is text), else its YAML default's type."""
    import typing

    hints = typing.get_type_hints(fn)
    types: dict[str, type] = {}
    for key in cfg:
        hint = hints.get(str(key))
        options = typing.get_args(hint) or (hint,)
        kind = next((k for k in (bool, int, float, str) if k in options), None)
        if hint is not None and kind is None:
            kind = str  # a path
        if kind is None:
            default = cfg.get(key)
            if default is None:
                raise TypeError(f"{key} is no parameter of {fn.__name__} and has no default to type it by")
            kind = type(default)
        types[str(key)] = kind
    return types


def compose_command(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """The command's config (`mvtec_seg/conf/commands/<config_name>.yaml`) with `overrides` (Hydra's grammar).
    A folder of its own: beside the run config's groups, `trainer=cpu` would select the group `trainer`."""
    from hydra import compose, initialize_config_dir

    from mvtec_seg.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR / "commands"), version_base="1.3"):
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
