"""TransFusion inference: the batched reverse process vs the one-image-at-a-time loop, same weights, CPU.

Also the batched path under bf16 autocast (AMX on recent Intel CPUs). Maps of the two fp32 paths are
compared too, so the speed-up is for identical output.

    .venv/bin/python benchmarks/transfusion_inference.py [--size 128] [--batch 8] [--repeats 3] [--tiny] [--out DIR]
        (--tiny: 2 images of 32 px, 1 repeat)
"""

from __future__ import annotations

import statistics
import time

import torch
from common import bench_parser, emit, md_table, write_section

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
    ap = bench_parser(__doc__)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.tiny:
        args.size, args.batch, args.repeats = 32, 2, 1
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
    result = {
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
    }
    emit("transfusion_inference", result)
    rows = [
        ["one image at a time, fp32", f"{n / t_loop:.2f}", "1.00"],
        ["batched, fp32", f"{n / t_batched:.2f}", f"{t_loop / t_batched:.2f}"],
        ["batched, bf16 autocast", f"{n / t_bf16:.2f}", f"{t_loop / t_bf16:.2f}"],
    ]
    write_section(
        args,
        "transfusion_inference",
        "TransFusion inference: batched vs one image at a time",
        f"Default teacher network ({parameter_count(model) / 1e6:.2f} M parameters), {n} images of {args.size} px, "
        f"{torch.get_num_threads()} threads, medians of {args.repeats} repeats after a warm-up. Speed-up is the "
        f"ratio to one image at a time (target 3x):\n\n{md_table(['path', 'images/s', 'speed-up'], rows)}\n\n"
        f"Largest difference between the batched and sequential fp32 maps: {same:.2e}.",
    )


if __name__ == "__main__":
    main()
