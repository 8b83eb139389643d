"""Command line: `python -m mvtec_seg [overrides]` (Hydra). A thin wrapper around `mvtec_seg.train.train`."""

from __future__ import annotations

import contextlib
import difflib
import errno
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from mvtec_seg.errors import UserError
from mvtec_seg.interrupt import Interrupted, install_handlers
from mvtec_seg.io_utils import WRITE_ERRNOS, write_error

log = logging.getLogger("mvtec_seg")
FOLDER_ERRNOS: frozenset[int] = frozenset({errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP})
"""A folder that cannot be made where it was asked for (below a file, under a system folder)."""


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from mvtec_seg.train import train

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun and cfg.get("group") is None:  # W&B groups a sweep's runs by its folder
        with open_dict(cfg):
            cfg.group = Path(hc.sweep.dir).name
    try:
        summary = train(cfg)
    except UserError as err:
        if multirun:  # one bad job must not stop the sweep; `sweep.FailedJobs` lists it at the end
            log.error("job %s failed: %s", cfg.task_name, err)
            return None
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        if multirun:
            log.exception("job %s failed; the sweep goes on", cfg.task_name)
            return None
        raise
    value = summary.get("metrics", {}).get("test/pixel_AUPRO")
    return float(value) if value is not None else None


def _config_error(err: HydraException) -> str:
    """A Hydra composition error (typo, unknown option) as one line with the likely fix."""
    text = " ".join(
        line.strip() for line in str(err).split("Config search path")[0].splitlines() if line.strip()
    )
    typo = re.match(r"Could not override '([^']+)'", text)
    if typo:
        from mvtec_seg.config import setting_names

        close = difflib.get_close_matches(typo.group(1), setting_names(), n=1)
        value = re.search(r"use \+[^=\s]+=(\S+)", text)
        hint = (
            f"did you mean {close[0]}={value.group(1) if value else '...'}?"
            if close
            else "check its spelling"
        )
        return f"unknown setting '{typo.group(1)}' — {hint} (`python -m mvtec_seg --help` lists the settings)"
    if "Could not find" in text:
        return f"{text} — pick one of those options"
    return f"{text} — fix that override (`python -m mvtec_seg --help` lists the groups and settings)"


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Say a user's mistake in one `error:` line and exit 2: bad input (`UserError`), a config typo or unknown
    option (Hydra), a folder that cannot be written (full disk, read-only). Anything else is a bug: traceback."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except HydraException as err:  # config typos and unknown options, before any job starts
        print(f"error: {_config_error(err)}", file=sys.stderr)
        sys.exit(2)
    except OmegaConfBaseException as err:  # an interpolation that cannot be resolved, a value left unset
        key = getattr(err, "full_key", None) or "a setting"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(
            f"error: {key}: {first} — fix that setting (or the environment variable it reads)",
            file=sys.stderr,
        )
        sys.exit(2)
    except OSError as err:  # e.g. Hydra writing .hydra/ into a read-only or full output folder
        if err.errno in FOLDER_ERRNOS:
            print(
                f"error: cannot make the folder {err.filename or ''}: {err.strerror} — point hydra.run.dir / "
                f"hydra.sweep.dir (paths.output_dir, MVTEC_SEG_OUTPUTS) at a folder you can write",
                file=sys.stderr,
            )
            sys.exit(2)
        if err.errno not in WRITE_ERRNOS:
            raise
        verb = "access" if err.errno in (errno.EACCES, errno.EPERM) else "write"  # may have been a read
        print(f"error: {write_error(err.filename or '', err, verb)}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time unless the user asks
    # Hydra prints its own errors over several lines; let them through to be said here in one.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    install_handlers()
    try:
        with one_line_errors():
            _main()
    except Interrupted as err:  # SIGTERM/SIGINT at any stage: one line, exit 143/130
        print(f"error: {err.message()}", file=sys.stderr)
        exit_now(err.exit_code)


def exit_now(code: int) -> None:
    """Exit at once: every `finally` has run (summary written, W&B finished, Lightning torn down) and
    every artefact is renamed into place or not at all; what is left, the interpreter's teardown of torch
    and friends, takes seconds on a busy machine, longer than a scheduler's grace period."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
