"""Atomic writes, content keys and build-once across processes: what every shared artefact relies on."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mvtec_seg import io_utils
from mvtec_seg.io_utils import build_once, content_key


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def test_content_key_is_stable_and_order_free() -> None:
    a = content_key({"b": [1, 2], "a": {"x": 0.5}})
    assert a == content_key({"a": {"x": 0.5}, "b": [1, 2]}) and len(a) == 12
    assert a != content_key({"a": {"x": 0.25}, "b": [1, 2]})


_BUILD = """
import sys, time
from pathlib import Path
from mvtec_seg.io_utils import build_once
target, log = Path(sys.argv[1]), Path(sys.argv[2])
def build(tmp):
    with log.open("a") as fh:
        fh.write("built\\n")
    tmp.mkdir()
    for i in range(5):
        (tmp / f"{i}.txt").write_text(str(i))
        time.sleep(0.1)
build_once(target, build)
print(len([p for p in target.iterdir() if p.name != "proof.json"]))
"""


def test_build_once_across_processes_never_shows_a_partial_folder(tmp_path: Path) -> None:
    target, log = tmp_path / "artefact", tmp_path / "log.txt"
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUILD, str(target), str(log)], stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    seen: set[int] = set()
    while any(p.poll() is None for p in procs):
        if target.exists():
            seen.add(len([p for p in target.iterdir() if p.name != "proof.json"]))
        time.sleep(0.01)
    outputs = [p.communicate()[0].decode().strip() for p in procs]
    assert outputs == ["5", "5"]
    assert log.read_text() == "built\n", "exactly one process builds"
    assert seen <= {5}, "a reader only ever sees the complete folder"


def test_build_once_cleans_up_after_a_failed_build(tmp_path: Path) -> None:
    target = tmp_path / "x.bin"

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")

    (tmp_path / ".x.bin.tmp-123-dead").mkdir()  # left behind by a killed job
    with pytest.raises(RuntimeError, match="boom"):
        build_once(target, broken)
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin.lock"]
    assert build_once(target, lambda tmp: tmp.write_bytes(b"ok")).read_bytes() == b"ok"


def test_atomic_writers(tmp_path: Path) -> None:
    io_utils.atomic_write_json(tmp_path / "a" / "x.json", {"v": np.float32(0.5), "n": np.int64(3)})
    assert (tmp_path / "a" / "x.json").read_text() == '{\n  "v": 0.5,\n  "n": 3\n}\n'
    io_utils.atomic_write_text(tmp_path / "t.txt", "hé")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "hé"
    io_utils.atomic_save_npz(tmp_path / "p.npz", a=np.arange(3), b=np.ones((2, 2), np.float16))
    with np.load(tmp_path / "p.npz") as z:
        assert z["a"].tolist() == [0, 1, 2] and z["b"].dtype == np.float16
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    io_utils.atomic_save_png(tmp_path / "i.png", rgb)
    assert np.array_equal(_load(tmp_path / "i.png"), rgb)
    io_utils.atomic_save_png(tmp_path / "m.png", np.eye(4, dtype=bool))
    assert _load(tmp_path / "m.png").max() == 255
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "i.png", "m.png", "p.npz", "t.txt"]
