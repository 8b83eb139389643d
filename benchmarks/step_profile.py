"""Where a TransFusion training step's device time goes (#9), by kind of work, as the issue's H100 profile did:
torch.profiler over a few plain bf16 training steps (anomaly generation, forward, loss, backward, AdamW) after
a warm-up, with GroupNorm kept in bf16 (now) and upcast to float32 (CUDA autocast's rule, before).

Each aten op's *self* device time (the kernels it launched itself, so nested ops are not counted twice) is
summed into a category by the op's name; cuDNN's layout conversions are counted apart from the kernel names.
Device busy time against wall time per step tells whether the step waits on the host (launch-bound) or the
device. On a CPU the same table is made of CPU time (only a smoke test of the code: tiny mode).

    python benchmarks/step_profile.py [--net paper|default] [--size 256] [--batch 8] [--steps 3] [--tiny]
        [--out DIR]
"""

from __future__ import annotations

import collections
import re
import time

import torch
from autocast_traffic import RULES, groupnorm_rule
from common import bench_parser, emit, md_table, write_section
from torch.profiler import ProfilerActivity, profile
from transfusion_speed import device_name, plain_training, sync

# first match wins: the op names of aten (self time), most specific first
CATEGORIES = [
    ("convolution", r"conv"),
    ("attention", r"attention|fmha|flash"),
    ("linear", r"addmm|\bmm\b|bmm|matmul|linear"),
    ("group_norm", r"group_norm"),
    ("casts and copies", r"_to_copy|copy_|clone|contiguous"),
    ("optimizer", r"_foreach|adam|lerp|addcdiv|addcmul"),
    ("SiLU", r"silu"),
    ("other elementwise and reductions", r"."),
]
LAYOUT = re.compile(r"nchwToNhwc|nhwcToNchw|nchw2nhwc|nhwc2nchw", re.IGNORECASE)


def category(op: str) -> str:
    return next(name for name, pattern in CATEGORIES if re.search(pattern, op))


def profile_steps(paper: bool, size: int, batch: int, steps: int, rule: str, device: torch.device) -> dict:
    """Device (or CPU) ms per step by category, kernels per step, and wall ms per step."""
    tr = plain_training(paper, size, batch, batch, device)
    x, paths = tr.images[:batch], tr.paths[:batch]

    def step():
        tr.network_step(tr.gen.generate(x, paths=paths), "bf16")

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with groupnorm_rule(rule):
        for _ in range(2):  # warm-up: cuDNN's algorithm search, allocator, foreground cache
            step()
        sync(device)
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            wall = time.perf_counter() - t0
    ms: collections.Counter = collections.Counter()
    for row in prof.key_averages():
        own = row.self_device_time_total if cuda else row.self_cpu_time_total
        if own > 0 and row.key.startswith("aten::"):
            ms[category(row.key)] += own / 1e3 / steps
    kernels = [e for e in prof.events() if cuda and e.device_type == torch.autograd.DeviceType.CUDA]
    layout = sum(e.time_range.elapsed_us() for e in kernels if LAYOUT.search(e.name)) / 1e3 / steps
    return {
        "ms": dict(ms),
        "layout_conversion_ms": layout,
        "kernels_per_step": len(kernels) / steps,
        "busy_ms": sum(ms.values()),
        "wall_ms": 1e3 * wall / steps,
    }


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--net", choices=["paper", "default"], default="paper")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    if args.tiny:
        args.net, args.size, args.batch, args.steps = "default", 32, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {
        rule: profile_steps(args.net == "paper", args.size, args.batch, args.steps, rule, device)
        for rule in RULES
    }
    emit(
        "step_profile", {"device": device_name(device), "net": args.net, "size": args.size, "rules": results}
    )

    clock = "device" if device.type == "cuda" else "CPU"
    rows = []
    for name, _ in CATEGORIES:
        rows.append([name, *[f"{results[r]['ms'].get(name, 0.0):.1f}" for r in RULES]])
        if name == "convolution":
            layout = [f"{results[r]['layout_conversion_ms']:.1f}" for r in RULES]
            rows.append(["of which cuDNN NCHW/NHWC conversions", *layout])
    for label, key in [
        (f"**{clock} busy**", "busy_ms"),
        ("wall", "wall_ms"),
        ("device kernels and copies", "kernels_per_step"),
    ]:
        rows.append([label, *[f"{results[r][key]:.1f}" for r in RULES]])
    body = (
        f"{args.net} network at {args.size} px, batch {args.batch}, bf16 autocast, {args.steps} profiled "
        f"training steps after 2 warm-up steps on {device_name(device)}; {clock} ms per step by category "
        "(self time of the aten ops; generation, forward, loss, backward and AdamW):\n\n"
        + md_table(["per step", *[f"GroupNorm: {RULES[r]}" for r in RULES]], rows)
    )
    write_section(args, "step_profile", "Where a TransFusion training step's time goes (#9)", body)


if __name__ == "__main__":
    main()
