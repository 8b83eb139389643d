"""Exact metrics at dataset scale (#11): AUPRO, pixel AUROC and pixel AP on 200 / 1,000 / 1,725 maps of 256 px.

AUPRO (to FPR 0.3): `mvtec_seg.metrics.aupro` against a straightforward full-sort implementation of the MVTec
definition (`full_sort_aupro` below: label, argsort all pixels, cumulative sums, cut, trapezoid), anomalib's
AUPRO (row skipped with a note when anomalib is not installed), and a bare ``np.sort`` of the same number of
float32 values (the floor any sort-based exact method pays). Pixel AUROC / AP: `mvtec_seg.metrics` against
scikit-learn (skipped when absent) and torchmetrics' exact mode (``thresholds=None``).

Data: random blob masks (half the maps anomalous, 1-3 ellipses each) and float32 scores (noise plus a bump on
the defects), seeded. Times are medians over ``--rounds`` alternating runs in one process; imports and data
outside the timing. Peak extra memory: numpy allocations traced by ``tracemalloc`` (AUPRO table, all numpy),
resident-set growth sampled every 2 ms (AUROC/AP table: torchmetrics allocates outside tracemalloc's view).

    .venv/bin/python benchmarks/metrics_scale.py [--maps 200,1000,1725] [--rounds 2] [--compare-maps 200,1725]
        [--compare-rounds 1] [--tiny] [--out DIR]
"""

from __future__ import annotations

import statistics
import threading
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import scipy.ndimage
import torch
from common import bench_parser, emit, md_table, write_section

from mvtec_seg.metrics import aupro, auroc, average_precision, compute_all

FPR_LIMIT = 0.3


# ---------------------------------------------------------------------------------------------
# data and the comparison implementations
# ---------------------------------------------------------------------------------------------


def make_maps(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 scores [n,size,size] and bool masks: every other map has 1-3 elliptic blobs."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.ogrid[:size, :size]
    for i in range(0, n, 2):
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.integers(0, size, 2)
            ry, rx = rng.uniform(2, size / 8, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    scores = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        scores[i] = rng.random((size, size), dtype=np.float32) * 0.7 + 0.35 * masks[i]
    return scores, masks


def full_sort_aupro(preds: np.ndarray, target: np.ndarray, fpr_limit: float) -> float:
    """The MVTec AUPRO written the straightforward way: one argsort of every pixel, cumulative sums."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connected within each image
    labels, n_regions = scipy.ndimage.label(target, structure=structure)
    labels = labels.ravel()
    s = preds.ravel()
    order = np.argsort(-s)
    s_sorted, region_sorted = s[order], labels[order]
    sizes = np.bincount(labels, minlength=n_regions + 1)
    weight = 1.0 / (n_regions * np.maximum(sizes, 1))
    weight[0] = 0.0
    fp = np.cumsum(region_sorted == 0)
    pro = np.cumsum(weight[region_sorted])
    ends = np.append(np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s.size - 1)
    fpr = np.concatenate(([0.0], fp[ends] / sizes[0], [1.0]))
    pro = np.concatenate(([0.0], pro[ends], [1.0]))
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:k], pro[:k]
    if k < fpr.size:
        y_lim = pro[k - 1] + (pro[k] - pro[k - 1]) * (fpr_limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
        x, y = np.append(x, fpr_limit), np.append(y, y_lim)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0 / fpr_limit)


def anomalib_aupro() -> Callable | str:
    """anomalib's AUPRO as a function of (preds, target), or why there is no row."""
    try:
        from anomalib.metrics import AUPRO
    except ImportError:
        return "anomalib is not installed (not part of the project's environment): row skipped"

    def run(preds: np.ndarray, target: np.ndarray) -> float:
        metric = AUPRO(fpr_limit=FPR_LIMIT)
        metric.update(torch.from_numpy(preds), torch.from_numpy(target).int())
        return float(metric.compute())

    return run


def sklearn_pair() -> tuple[Callable, Callable] | str:
    try:
        from sklearn.metrics import average_precision_score, roc_auc_score
    except ImportError:
        return "scikit-learn is not installed: rows skipped"
    return (
        lambda s, y: float(roc_auc_score(y.ravel(), s.ravel())),
        lambda s, y: float(average_precision_score(y.ravel(), s.ravel())),
    )


def torchmetrics_pair() -> tuple[Callable, Callable]:
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    # scores are in [0, 1], so torchmetrics applies no sigmoid; thresholds=None is its exact mode
    return (
        lambda s, y: float(binary_auroc(torch.from_numpy(s).ravel(), torch.from_numpy(y).ravel().long())),
        lambda s, y: float(
            binary_average_precision(torch.from_numpy(s).ravel(), torch.from_numpy(y).ravel().long())
        ),
    )


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def run_traced(fn: Callable, *args) -> tuple[float, float, int]:
    """(seconds, value, peak extra bytes of numpy/Python allocations)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    value = fn(*args)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, value, peak


def run_rss(fn: Callable, *args) -> tuple[float, float, int]:
    """(seconds, value, peak growth of the resident set, sampled every 2 ms)."""
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss() - base)
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    value = fn(*args)
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    return seconds, value, max(peak[0], _rss() - base)


def alternate(methods: dict[str, Callable], args: tuple, rounds: int, runner: Callable) -> dict[str, dict]:
    """Run every method once per round, in turn; median time, max peak, the value (equal every round)."""
    runs: dict[str, list] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            runs[name].append(runner(fn, *args))
    return {
        name: {
            "seconds": statistics.median(r[0] for r in rs),
            "value": rs[-1][1],
            "peak_bytes": max(r[2] for r in rs),
        }
        for name, rs in runs.items()
    }


def one_category(rounds: int, tiny: bool) -> str:
    """All five metrics on 83 maps of 256 px (a large MVTec category): was a timing test, bound 10 s."""
    g = torch.Generator().manual_seed(0)
    n, size = (8, 64) if tiny else (83, 256)
    mask = torch.zeros(n, 1, size, size)
    for i in range(n // 2):
        y, x = torch.randint(0, size - 40, (2,), generator=g).tolist()
        mask[i, 0, y : y + 30, x : x + 40] = 1
    amap = torch.rand(n, size, size, generator=g) * 0.5 + 0.4 * mask[:, 0]
    compute_all(amap[:4], mask[:4])  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        compute_all(amap, mask)
        times.append(time.perf_counter() - t0)
    return (
        f"**One category.** `compute_all` (all five metrics) on {n} maps of {size} px (a large MVTec category): "
        f"median {statistics.median(times):.2f} s over {rounds} runs (the former timing test allowed 10 s)."
    )


def _mb(b: int) -> str:
    return f"{b / 2**20:,.0f} MB"


def report(args, results: list[dict], aupro_rows: list, clf_rows: list, notes: list[str], done: bool) -> None:
    """Emit the JSON and write the section: after every size, so a run cut short keeps what it measured."""
    emit("metrics_scale", {"size": args.size, "rounds": args.rounds, "results": results, "notes": notes})
    body = [
        f"{args.size} x {args.size} maps, random blob masks (half the maps anomalous), float32 scores; "
        f"each method run {args.rounds} time(s) for AUPRO and {args.compare_rounds} time(s) for AUROC/AP, "
        "the methods alternating in one process (median time when run more than once). The machine was "
        "shared with other jobs "
        "while this ran: compare ratios (same process, alternating), not absolute times.",
        "",
        f"**AUPRO to FPR {FPR_LIMIT}.** Speed-up and memory are ratios to the full-sort baseline (a "
        "straightforward implementation of the MVTec definition: one argsort of all pixels); peak extra memory "
        "is what `tracemalloc` sees numpy allocate during the call (the inputs excluded).",
        "",
        md_table(
            ["maps", "pixels", "method", "time (s)", "speed-up", "peak extra", "memory ratio", "AUPRO"],
            aupro_rows,
        ),
        "",
        "**Pixel AUROC and AP.** Time ratio is to `mvtec_seg` for the same metric; peak extra memory is the "
        "growth of the resident set sampled every 2 ms (torch allocates outside tracemalloc's view).",
        "",
        md_table(
            ["maps", "pixels", "method", "time (s)", "time / mvtec_seg", "peak extra", "value"], clf_rows
        ),
    ]
    if done:
        body += ["", one_category(max(args.rounds, 3), args.tiny)]
    if notes:
        body += ["", *notes]
    write_section(args, "metrics_scale", "Exact metrics at dataset scale (#11)", "\n".join(body))


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--maps", default="200,1000,1725", help="comma-separated numbers of maps")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--compare-maps",
        default="200,1725",
        help="sizes at which the scikit-learn / torchmetrics rows run (they take minutes at 1,725 maps)",
    )
    ap.add_argument("--compare-rounds", type=int, default=1, help="rounds of the AUROC/AP table")
    args = ap.parse_args()
    if args.tiny:
        args.maps, args.size, args.rounds, args.compare_maps = "4,8", 32, 1, "8"
    sizes = [int(m) for m in args.maps.split(",")]
    anomalib = anomalib_aupro()
    sklearn = sklearn_pair()
    tm = torchmetrics_pair()
    notes = []
    if isinstance(anomalib, str):
        notes.append(f"anomalib AUPRO: {anomalib}.")
    if isinstance(sklearn, str):
        notes.append(f"scikit-learn: {sklearn}.")
    else:
        import sklearn as sk

        notes.append(
            f"scikit-learn {sk.__version__} (installed outside the project's environment for this run)."
        )
    import torchmetrics

    notes.append(
        f"torchmetrics {torchmetrics.__version__}, torch {torch.__version__}, numpy {np.__version__}."
    )

    aupro_rows, clf_rows, results = [], [], []
    for n in sizes:
        preds, target = make_maps(n, args.size)
        pixels = preds.size
        methods = {
            "full-sort MVTec AUPRO (baseline)": lambda p, t: full_sort_aupro(p, t, FPR_LIMIT),
            "mvtec_seg.metrics.aupro": lambda p, t: aupro(p, t, fpr_limit=FPR_LIMIT),
            "bare np.sort of the same float32 values": lambda p, t: float(np.sort(p.ravel())[-1]),
        }
        if not isinstance(anomalib, str):
            methods["anomalib AUPRO"] = anomalib
        res = alternate(methods, (preds, target), args.rounds, run_traced)
        base = res["full-sort MVTec AUPRO (baseline)"]
        ours = res["mvtec_seg.metrics.aupro"]
        bare = res["bare np.sort of the same float32 values"]
        for name, r in res.items():
            is_aupro = not name.startswith("bare")
            aupro_rows.append(
                [
                    n,
                    f"{pixels / 1e6:.1f} M",
                    name,
                    f"{r['seconds']:.2f}",
                    f"{base['seconds'] / r['seconds']:.2f}x",
                    _mb(r["peak_bytes"]),
                    f"{r['peak_bytes'] / base['peak_bytes']:.2f}",
                    f"{r['value']:.12f}" if is_aupro else "—",
                ]
            )
        aupro_rows.append(
            [
                n,
                "",
                "**mvtec_seg / bare sort (time)**",
                f"{ours['seconds'] / bare['seconds']:.2f}x",
                "",
                "",
                "",
                "",
            ]
        )
        entry = {"maps": n, "pixels": pixels, "aupro": res}

        clf: dict[str, Callable] = {
            "mvtec_seg auroc": lambda p, t: auroc(p, t),
            "mvtec_seg average_precision": lambda p, t: average_precision(p, t),
        }
        if str(n) in args.compare_maps.split(","):
            if not isinstance(sklearn, str):
                clf["scikit-learn roc_auc_score"] = sklearn[0]
                clf["scikit-learn average_precision_score"] = sklearn[1]
            clf["torchmetrics binary_auroc (exact)"] = tm[0]
            clf["torchmetrics binary_average_precision (exact)"] = tm[1]
        cres = alternate(clf, (preds, target), args.compare_rounds, run_rss)
        for name, r in cres.items():
            ref = cres[
                "mvtec_seg auroc" if "auroc" in name or "roc_auc" in name else "mvtec_seg average_precision"
            ]
            clf_rows.append(
                [
                    n,
                    f"{pixels / 1e6:.1f} M",
                    name,
                    f"{r['seconds']:.2f}",
                    f"{r['seconds'] / ref['seconds']:.2f}x",
                    _mb(r["peak_bytes"]),
                    f"{r['value']:.12f}",
                ]
            )
        entry["clf"] = cres
        results.append(entry)
        del preds, target
        report(args, results, aupro_rows, clf_rows, notes, done=n == sizes[-1])


if __name__ == "__main__":
    main()
