"""The five metrics (and AUPRO to more FPR limits) with memory bounded by a chunk size, not by the pixels.

Why: `AnomalyMetrics` keeps the pixels split by the ground truth in memory (4 bytes per normal and 8 per
anomalous pixel, more at ``compute``); at each image's own size (`evaluation.resolution=native`) that is
GBs for an MVTec AD 2 category. Here the same split is spilled to raw files in a temporary folder, image by
image: ``normal.f32`` (the score of each normal pixel), ``anomalous.f32`` and ``sizes.i32`` (the score of
each anomalous pixel and the size of its region, 8-connected within its image); one score and one label
per image stay in memory. The folder is deleted at `close`.

Why it is exact: every pixel metric is a sum over the anomalous pixels a of a function of three integer
counts, L(a) = #normal < a, R(a) = #normal <= a and T(a) = #anomalous >= a, and each count is a sum over
chunks (``searchsorted`` of a block of anomalous scores into each sorted run of scores):

- pixel AUROC = sum (L + R) / (2 N0 N1) (Mann-Whitney, ties count 1/2), an integer sum as in `split`;
- pixel AP = (1/N1) sum T / (T + N0 - L): each anomalous pixel adds the precision at its own score, which
  is `split._ap_sorted`'s step-wise AP (a tie group adds its size times the precision at its score);
- AUPRO to a limit: `split._aupro_split` term by term. v is the curve point's score where the FPR first
  exceeds the limit, an order statistic of the normal scores found by bisection on the float32 bit
  patterns with counting passes; with n_v = #normal <= v the area is
  sum w (max(L - n_v, 0) + max(R - n_v, 0)) / 2 N0 (w = 1 / region size) plus the segment through v cut
  at the limit by the same interpolation, divided by the number of regions and the limit;
- IoU from the two counts >= the threshold (compared in float32, as `split._count_ge` does).

Only the order of the float64 sums differs from the in-memory computation. Memory: one run of
``chunk`` normal scores (4 bytes each) and a block of ``chunk // 8`` anomalous pixels with their counts
(about 70 bytes each): about 13 bytes x ``chunk``, whatever the number of pixels. Measured
(`tools/native_memory.py`, `docs/metrics.md`; `CHUNK_PIXELS`, one 2232x1024 image in hand): 124 MiB above
the process for 91 M pixels and 128 MiB for 183 M, where `AnomalyMetrics` took 1579 and 2701 MiB. Time:
every block is counted against every run, so it grows as N1 x (N0 + N1) / ``chunk`` (N0 normal, N1
anomalous pixels): about the in-memory time at 90 M pixels with 20 % anomalous, 1.25 x at 180 M.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mvtec_seg.metrics.functional import METRIC_NAMES
from mvtec_seg.metrics.inputs import _check_fpr_limit, _iou, _pro_undefined_reason, _undefined
from mvtec_seg.metrics.split import _auroc_sorted, _first_count_above, _sort, _split_1d, region_sizes

__all__ = ["CHUNK_PIXELS", "OutOfCoreMetrics", "SpilledSplit", "spilled_pixel_metrics"]

CHUNK_PIXELS = 1 << 23
"""Scores per sorted run (8 Mi: 32 MiB); the anomalous pixels are counted in blocks of an eighth of it."""
_MARKS_PER_RUN = 1024  # every (run / 1024)-th sorted score kept in memory: counting reads one window a run


def _read(f: BinaryIO, dtype: type, start: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
    """``count`` values of ``dtype`` from element ``start`` of a raw file (into ``out``'s head if given)."""
    arr = np.empty(count, dtype) if out is None else out[:count]
    f.seek(start * arr.itemsize)
    if f.readinto(arr.view(np.uint8)) != arr.nbytes:
        raise OSError(f"{f.name}: short read at element {start}")
    return arr


def _write(f: BinaryIO, arr: np.ndarray, start: int) -> None:
    f.seek(start * arr.itemsize)
    f.write(arr.view(np.uint8))


@dataclass
class _SortedRuns:
    """A raw float32 file sorted in runs of ``run`` scores, with every ``stride``-th score of each run (and
    its last) in memory, so that counting the scores below a value reads one window of each run."""

    path: Path
    n: int
    run: int
    stride: int
    marks: list[np.ndarray] = field(default_factory=list)
    last: list[np.float32] = field(default_factory=list)

    def spans(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.run, self.n)) for s in range(0, self.n, self.run)]

    def count(self, value: np.float32, side: str) -> int:
        """#scores < value (``side="left"``) or <= value (``"right"``), compared in float32."""
        total = 0
        with open(self.path, "rb") as f:
            for (start, stop), marks in zip(self.spans(), self.marks, strict=True):
                i = int(np.searchsorted(marks, value, side))  # marks[i-1] is in, marks[i] is out
                if i == 0:
                    continue
                lo, hi = (i - 1) * self.stride, min(i * self.stride, stop - start)
                window = _read(f, np.float32, start + lo, hi - lo)
                total += lo + int(np.searchsorted(window, value, side))
        return total


def _sort_runs(path: Path, n: int, run: int) -> _SortedRuns:
    """Sort a raw float32 file in place, run by run (one run in memory)."""
    stride = max(1, run // _MARKS_PER_RUN)
    runs = _SortedRuns(path, n, run, stride)
    with open(path, "r+b") as f:
        for start, stop in runs.spans():
            x = _read(f, np.float32, start, stop - start)
            x.sort()
            _write(f, x, start)
            runs.marks.append(x[::stride].copy())
            runs.last.append(x[-1])
    return runs


_KEY_NEG_INF, _KEY_POS_INF = 0x007FFFFF, 0xFF800000  # the order-preserving keys of -inf and +inf


def _key_value(key: int) -> np.float32:
    """The float32 of an order-preserving uint32 key (sign bit flipped for >= +0, all bits for < 0)."""
    bits = key ^ 0x80000000 if key >= 0x80000000 else ~key & 0xFFFFFFFF
    return np.array(bits, dtype=np.uint32).view(np.float32)[()]


def _kth_smallest(runs: _SortedRuns, k: int) -> np.float32:
    """The score of rank ``k`` (0-based, ascending): the smallest key whose value has > k scores <= it."""
    lo, hi = _KEY_NEG_INF, _KEY_POS_INF
    while lo < hi:
        mid = (lo + hi) // 2
        if runs.count(_key_value(mid), "right") > k:
            hi = mid
        else:
            lo = mid + 1
    return _key_value(lo)


@dataclass
class SpilledSplit:
    """`split.PixelSplit` on disk: ``folder`` holds ``normal.f32``, ``anomalous.f32`` and ``sizes.i32``."""

    folder: Path
    n_normal: int
    n_anomalous: int
    n_regions: int


@dataclass
class _Cut:
    """Where the PRO curve crosses one FPR limit: v, #normal <= v, #normal < v (None: the limit is 1)."""

    limit: float
    v: np.float32 | None = None
    le: int = 0
    lt: int = 0
    area: float = 0.0  # sum w (max(L - le, 0) + max(R - le, 0))
    p_gt: float = 0.0  # sum w over anomalous > v
    p_ge: float = 0.0  # sum w over anomalous >= v


def _cut(normal: _SortedRuns, limit: float) -> _Cut:
    n = normal.n
    c = _first_count_above(limit, n)
    if c > n:  # the limit is 1: every normal pixel counts
        return _Cut(limit)
    v = _kth_smallest(normal, n - c)
    return _Cut(limit, v, normal.count(v, "right"), normal.count(v, "left"))


def _aupro_value(cut: _Cut, n: int, n_regions: int) -> float:
    """`split._aupro_split`'s closing lines on the summed terms."""
    area = cut.area / (2.0 * n)
    if cut.v is not None:
        f0, f1 = (n - cut.le) / n, (n - cut.lt) / n
        y_lim = cut.p_gt + (cut.p_ge - cut.p_gt) * (cut.limit - f0) / (f1 - f0)
        area += (cut.limit - f0) * (cut.p_gt + y_lim) / 2.0
    return area / n_regions / cut.limit


def _add_counts(
    runs: _SortedRuns, f: BinaryIO, buf: np.ndarray, a: np.ndarray, lt: np.ndarray, le: np.ndarray | None
) -> None:
    """Add #run < a (and #run <= a) of every run to ``lt`` (``le``); ``a`` ascending."""
    for (start, stop), first, last in zip(runs.spans(), (m[0] for m in runs.marks), runs.last, strict=True):
        lo, hi = int(np.searchsorted(a, first, "left")), int(np.searchsorted(a, last, "right"))
        lt[hi:] += stop - start  # above the run: all of it; below it: none
        if le is not None:
            le[hi:] += stop - start
        if lo == hi:
            continue
        x = _read(f, np.float32, start, stop - start, buf)
        lt[lo:hi] += np.searchsorted(x, a[lo:hi], "left")
        if le is not None:
            le[lo:hi] += np.searchsorted(x, a[lo:hi], "right")


def spilled_pixel_metrics(
    sp: SpilledSplit,
    iou_threshold: float,
    fpr_limits: Mapping[str, float],
    chunk: int = CHUNK_PIXELS,
) -> dict[str, float]:
    """pixel_AUROC, pixel_AP, IoU and an AUPRO per ``fpr_limits`` entry (name -> limit), exact (see the
    module doc); sorts the spilled scores in runs of ``chunk`` in place. NaN with a warning if undefined."""
    n0, n1 = sp.n_normal, sp.n_anomalous
    anom_sorted = sp.folder / "anomalous_sorted.f32"
    shutil.copyfile(sp.folder / "anomalous.f32", anom_sorted)  # T(a) counts against sorted runs of these
    normal = _sort_runs(sp.folder / "normal.f32", n0, chunk)
    anomalous = _sort_runs(anom_sorted, n1, chunk)
    reason = _pro_undefined_reason(sp.n_regions, n0)
    cuts = {} if reason else {name: _cut(normal, _check_fpr_limit(lim)) for name, lim in fpr_limits.items()}
    thr = np.float32(iou_threshold)
    twice, ap, tp = 0, 0.0, 0
    block = max(1, chunk // 8)
    buf = np.empty(min(chunk, max(n0, n1, 1)), np.float32)
    with (
        open(sp.folder / "anomalous.f32", "rb") as fa,
        open(sp.folder / "sizes.i32", "rb") as fs,
        open(normal.path, "rb") as fn,
        open(anomalous.path, "rb") as ft,
    ):
        for start in range(0, n1, block):
            count = min(block, n1 - start)
            a = _read(fa, np.float32, start, count)
            order = np.argsort(a, kind="stable")  # ascending queries: searchsorted is cache-friendly
            a = a[order]
            w = 1.0 / _read(fs, np.int32, start, count)[order].astype(np.float64)
            del order
            lt, le = np.zeros(count, np.int64), np.zeros(count, np.int64)
            _add_counts(normal, fn, buf, a, lt, le)
            below = np.zeros(count, np.int64)
            _add_counts(anomalous, ft, buf, a, below, None)
            twice += int((lt + le).sum())
            ge = n1 - below  # T(a): #anomalous >= a, a itself included
            ap += float((ge / (ge + (n0 - lt)).astype(np.float64)).sum())
            del below, ge
            for cut in cuts.values():
                ranks = np.maximum(lt - cut.le, 0) + np.maximum(le - cut.le, 0)
                cut.area += float((w * ranks).sum())
                if cut.v is not None:
                    cut.p_gt += float(w[a > cut.v].sum())
                    cut.p_ge += float(w[a >= cut.v].sum())
            tp += int(np.count_nonzero(a >= thr))
    if n1 == 0 or n0 == 0:  # `split._auroc_sorted`'s warning
        missing = "anomalous" if n1 == 0 else "normal"
        why = f"no {missing} pixels ({n0 + n1} scored, only one class present)"
        pixel_auroc = _undefined("pixel_AUROC", why)
    else:
        pixel_auroc = twice / (2.0 * n1 * n0)
    out = {
        "pixel_AUROC": pixel_auroc,
        "pixel_AP": ap / n1 if n1 else _undefined("pixel_AP", f"no anomalous pixels ({n0} scored)"),
        "IoU": _iou(tp, tp + n0 - normal.count(thr, "left"), n1),
    }
    for name in fpr_limits:
        out[name] = _undefined(name, reason) if reason else _aupro_value(cuts[name], n0, sp.n_regions)
    return out


_FILES = ("normal.f32", "anomalous.f32", "sizes.i32")


class OutOfCoreMetrics:
    """`AnomalyMetrics`' five metrics from images added one at a time, with the pixels spilled to a
    temporary folder under ``folder`` (the system's temporary folder if None; it should be on disk, not in
    memory) and the metrics computed in chunks (module doc). Use as a context manager, or call `close`.
    """

    def __init__(
        self,
        iou_threshold: float = 0.5,
        fpr_limit: float = 0.3,
        folder: Path | str | None = None,
        chunk: int = CHUNK_PIXELS,
    ) -> None:
        self.iou_threshold = float(iou_threshold)
        self.fpr_limit = _check_fpr_limit(fpr_limit)
        self.chunk = int(chunk)
        self.folder = Path(tempfile.mkdtemp(prefix="spilled_pixels_", dir=folder))
        self._files = {name: open(self.folder / name, "wb") for name in _FILES}  # noqa: SIM115
        self.n_normal = self.n_anomalous = self.n_regions = 0
        self.image_scores: list[np.float32] = []
        self.image_labels: list[int] = []

    def update(self, anomaly_map: np.ndarray, gt_mask: np.ndarray, gt_label: int | None = None) -> None:
        """Spill one image: anomaly_map [H,W] (scored in float32), gt_mask [H,W] (non-zero = anomalous),
        gt_label (default: the mask has an anomalous pixel)."""
        s = np.asarray(anomaly_map, dtype=np.float32)
        m = np.asarray(gt_mask) != 0
        if s.ndim != 2 or s.shape != m.shape:
            raise ValueError(f"anomaly_map {s.shape} and gt_mask {m.shape} must be one [H,W] image")
        if np.isnan(s).any():
            raise ValueError("anomaly_map contains NaN; anomaly scores must be real numbers (inf is allowed)")
        sizes, n_regions = region_sizes(m[None])
        normal, anomalous = s[~m], s[m]
        self._files["normal.f32"].write(normal.view(np.uint8))
        self._files["anomalous.f32"].write(anomalous.view(np.uint8))
        self._files["sizes.i32"].write(sizes.view(np.uint8))
        self.n_normal += normal.size
        self.n_anomalous += anomalous.size
        self.n_regions += n_regions
        self.image_scores.append(s.max())
        self.image_labels.append(int(m.any()) if gt_label is None else int(gt_label != 0))

    def compute(self, fpr_limits: Mapping[str, float] | None = None) -> dict[str, float]:
        """METRIC_NAMES, and an AUPRO per ``fpr_limits`` entry (name -> limit, e.g. MVTec AD 2's
        ``{"pixel_AUPRO_0.05": 0.05}``) from the same pass; NaN with a warning where undefined."""
        extra = dict(fpr_limits or {})
        names = (*METRIC_NAMES, *extra)
        if not self.image_scores:
            return {name: _undefined(name, "no data was passed to update()") for name in names}
        for f in self._files.values():
            f.flush()
        neg, pos = _split_1d(np.array(self.image_scores, np.float32), np.array(self.image_labels, np.uint8))
        out = {"image_AUROC": _auroc_sorted(_sort(neg), pos, "image_AUROC", "images")}
        sp = SpilledSplit(self.folder, self.n_normal, self.n_anomalous, self.n_regions)
        limits = {"pixel_AUPRO": self.fpr_limit, **extra}
        out.update(spilled_pixel_metrics(sp, self.iou_threshold, limits, self.chunk))
        return {name: float(out[name]) for name in names}

    def close(self) -> None:
        """Delete the spilled pixels."""
        for f in self._files.values():
            f.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> OutOfCoreMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
