"""DDP sync: two gloo processes, each seeing part of the data, must report the whole-data metrics.

Why: curve metrics are not averages of per-rank values; the cat states must be gathered before the
exact computation. Uneven shards (5 vs 4 images) also exercise torchmetrics' padded gather.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mvtec_seg.metrics import METRIC_NAMES, AnomalyMetrics, compute_all

WORLD_SIZE = 2
N_IMAGES = 9
IOU_THRESHOLD = 0.6
FPR_LIMIT = 0.3


def _dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    mask = torch.zeros(N_IMAGES, 1, 16, 16)
    for i in range(0, N_IMAGES, 2):  # every other image anomalous
        y, x = torch.randint(0, 10, (2,), generator=g).tolist()
        mask[i, 0, y : y + 4, x : x + 5] = 1
    amap = torch.rand(N_IMAGES, 16, 16, generator=g) * 0.7 + 0.35 * mask[:, 0]
    amap = torch.round(amap * 50) / 50  # ties across ranks
    return amap, mask


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        amap, mask = _dataset()
        shard = slice(0, 5) if rank == 0 else slice(5, N_IMAGES)
        amap, mask = amap[shard], mask[shard]
        metrics = AnomalyMetrics(iou_threshold=IOU_THRESHOLD, fpr_limit=FPR_LIMIT)
        for start in range(0, amap.shape[0], 2):  # several update calls per rank
            metrics.update(amap[start : start + 2], mask[start : start + 2])
        result = {k: v.item() for k, v in metrics.compute().items()}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="gloo backend unavailable"
)
def test_synced_compute_equals_single_process(tmp_path: Path) -> None:
    init_file = tmp_path / "dist_init"
    mp.spawn(_worker, args=(str(init_file), str(tmp_path)), nprocs=WORLD_SIZE, join=True)

    amap, mask = _dataset()
    expected = compute_all(amap, mask, iou_threshold=IOU_THRESHOLD, fpr_limit=FPR_LIMIT)
    for rank in range(WORLD_SIZE):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name in METRIC_NAMES:
            assert got[name] == pytest.approx(expected[name], abs=1e-12), (rank, name)
    # sanity: the shards alone give different values, so the equality above proves the sync
    shard0 = compute_all(amap[:5], mask[:5], iou_threshold=IOU_THRESHOLD, fpr_limit=FPR_LIMIT)
    assert shard0["pixel_AUPRO"] != pytest.approx(expected["pixel_AUPRO"], abs=1e-9)
