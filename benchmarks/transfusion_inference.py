"""TransFusion inference: the batched reverse process vs the one-image-at-a-time loop, same weights, CPU.

Also the batched path under bf16 autocast (AMX on recent Intel CPUs). Maps of the two fp32 paths are
compared too, so the speed-up is for identical output.

    .venv/bin/python benchmarks/transfusion_inference.py [--size 128] [--batch 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import emit

from mvtec_seg.config import compose_config
from mvtec_seg.models.base import parameter_count
from mvtec_seg.models.transfusion import TransFusionModel


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = compose_config([f"data.image_size={args.size}"], run_dir="/tmp/unused")
    net = {k: v for k, v in dict(cfg.teacher.params.net).items()}
    net["channel_mult"], net["attention_levels"] = tuple(net["channel_mult"]), tuple(net["attention_levels"])
    torch.manual_seed(0)
    model = TransFusionModel(**net).eval()
    x = torch.rand(args.batch, 3, args.size, args.size)

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.predict(x)

    def one_by_one():
        return torch.cat([model.predict(x[i : i + 1])["anomaly_map"] for i in range(len(x))])

    with torch.inference_mode():
        same = (model.predict(x)["anomaly_map"] - one_by_one()).abs().max().item()
        t_batched = timed(lambda: model.predict(x), args.repeats)
        t_loop = timed(one_by_one, args.repeats)
        t_bf16 = timed(bf16, args.repeats)
    n = args.batch
    emit(
        "transfusion_inference",
        {
            "command": f"benchmarks/transfusion_inference.py --size {args.size} --batch {n}",
            "params": parameter_count(model),
            "net": net,
            "threads": torch.get_num_threads(),
            "loop_fp32_images_per_s": n / t_loop,
            "batched_fp32_images_per_s": n / t_batched,
            "batched_bf16_images_per_s": n / t_bf16,
            "speedup_batched_fp32": t_loop / t_batched,
            "speedup_batched_bf16": t_loop / t_bf16,
            "max_abs_diff_fp32": same,
            "target_speedup": 3.0,
        },
    )


if __name__ == "__main__":
    main()
