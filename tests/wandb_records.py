"""An offline W&B run read back from its transaction log (`run-<id>.wandb`), through wandb's own record
definitions (`wandb.proto.wandb_internal_pb2.Record`): what `wandb sync` would upload, so what a user sees.

The log is wandb's block format: a 7-byte header (`:W&B`, magic, version), then 32 KiB blocks of records,
each `crc32 (4) | length (2) | type (1) | data`, a record split over blocks as first/middle/last parts."""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = b":W&B"
HEADER_SIZE = 7
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    group: str
    tags: list[str]
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None


def records(path: Path | str) -> list[Any]:
    """Every record of a `.wandb` file, checksums verified."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != HEADER:
        raise ValueError(f"{path} is not a W&B transaction log")
    out, pos, parts = [], HEADER_SIZE, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pos += 7 + length
        parts += chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
            parts = b""
    return out


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_folder: Path | str) -> OfflineRun:
    """The group, tags, config and final summary of the offline run in `run_folder` (`offline-run-*`)."""
    logs = sorted(Path(run_folder).glob("run-*.wandb"))
    if len(logs) != 1:
        raise ValueError(f"{run_folder} holds {len(logs)} run logs, expected 1")
    run: OfflineRun | None = None
    for record in records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run = OfflineRun(group=r.run_group, tags=list(r.tags), name=r.display_name)
            for item in r.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif run is None:
            continue
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
            for item in record.config.remove:
                run.config.pop(_key(item), None)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
            for item in record.summary.remove:
                run.summary.pop(_key(item), None)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    if run is None:
        raise ValueError(f"{logs[0]} holds no run record")
    return run
