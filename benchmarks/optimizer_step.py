"""Adam(W) as a loop over parameters, as lists of them (foreach) or as one fused kernel (#9).

Adam and AdamW are now built with ``fused=True`` unless the config picks an implementation
(`models.base.with_fused_default`). PyTorch's default was the per-parameter loop on the CPU and foreach on
CUDA. This measures, on the device present:

- one optimizer step of the default and the published TransFusion network (AdamW; 206 and 322 parameter
  tensors) and of the default config's U-Net and DeepLabv3+ (Adam) with each implementation (gradients set
  once; mean of ``--steps`` steps after one);
- how far fused moves from the loop: the largest parameter difference after ``--steps`` steps with the same
  random gradients, against how far the parameters moved;
- the teacher's loss curve (default network, ``--size`` px, batch 8, ``--steps-per-epoch`` batches an
  epoch, ``--epochs``) with PyTorch's default (before) and fused (now), and before with a second seed for the
  noise, each fit's seconds a step beside it.

    python benchmarks/optimizer_step.py [--steps 10] [--size 64] [--steps-per-epoch 10] [--epochs 20]
        [--tiny] [--out DIR]
"""

from __future__ import annotations

import time

import torch
from common import bench_parser, emit, md_table, write_section
from transfusion_speed import device_name, device_precision, loss_curve, net_params, timed

from mvtec_seg.builders import build_model
from mvtec_seg.config import compose_config
from mvtec_seg.models.transfusion import TransFusionModel

IMPLEMENTATIONS = {
    "loop (foreach=False)": {"foreach": False},
    "foreach": {"foreach": True},
    "fused (now)": {"fused": True},
}
BEFORE = {"foreach": None}  # PyTorch's choice: the loop on the CPU, foreach on CUDA


def network_parameters(name: str) -> tuple[list[torch.Tensor], type, float]:
    """Initial parameters, optimizer class and lr of a network as configured: the default or the published
    TransFusion (AdamW), or a segmenter of the default config (Adam)."""
    torch.manual_seed(0)
    if name in ("default", "paper"):
        spec = net_params(name == "paper", 64)  # the parameters do not depend on the image size
        return list(TransFusionModel(**spec["net"]).parameters()), torch.optim.AdamW, spec["lr"]
    cfg = compose_config([f"model={name}"], run_dir="/tmp/unused")
    return list(build_model(cfg).parameters()), torch.optim.Adam, float(cfg.model.params.optimizer.lr)


def step_times(name: str, steps: int, device: torch.device) -> dict:
    """ms per optimizer step with each implementation, and fused's largest difference from the loop."""
    params0, cls, lr = network_parameters(name)
    start = [p.detach().to(device) for p in params0]
    out: dict = {
        "optimizer": cls.__name__,
        "tensors": len(start),
        "params_M": sum(p.numel() for p in start) / 1e6,
        "ms": {},
    }
    final = {}
    for impl, options in IMPLEMENTATIONS.items():
        params = [p.clone().requires_grad_() for p in start]
        g = torch.Generator(device=device).manual_seed(1)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, device=device)
        opt = cls(params, lr=lr, **options)
        out["ms"][impl] = 1e3 * timed(opt.step, steps, device)
        final[impl] = torch.cat([p.detach().flatten() for p in params])
    moved = (final["loop (foreach=False)"] - torch.cat([p.flatten() for p in start])).abs().max()
    out["fused_max_diff"] = float((final["fused (now)"] - final["loop (foreach=False)"]).abs().max())
    out["moved"] = float(moved)
    return out


def curve(options: dict, seed: int, args, device: torch.device) -> tuple[list[float], float]:
    """Epoch means of ``train/loss`` and seconds a step of one teacher fit with AdamW ``options``."""
    t0 = time.perf_counter()
    losses = loss_curve(
        args.size,
        args.steps_per_epoch,
        args.epochs,
        seed,
        device,
        precision=device_precision(device),
        optimizer_options=options,
    )
    return losses, (time.perf_counter() - t0) / (args.epochs * args.steps_per_epoch)


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps-per-epoch", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    nets = ["default", "paper", "unet", "deeplab"]
    if args.tiny:
        args.steps, args.size, args.steps_per_epoch, args.epochs, nets = 1, 32, 2, 2, ["default"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    times = {net: step_times(net, args.steps, device) for net in nets}
    runs = {
        "before (PyTorch's default), seed 0": curve(BEFORE, 0, args, device),
        "fused (now), seed 0": curve({"fused": True}, 0, args, device),
        "before, seed 1": curve(BEFORE, 1, args, device),
    }
    emit("optimizer_step", {"device": device_name(device), "times": times, "curves": runs})

    rows = [
        [
            f"{net} ({t['optimizer']}, {t['tensors']} tensors, {t['params_M']:.2f} M)",
            *[f"{t['ms'][k]:.2f}" for k in IMPLEMENTATIONS],
        ]
        for net, t in times.items()
    ]
    step_table = md_table(["network", *[f"{k} ms" for k in IMPLEMENTATIONS]], rows)
    diffs = "; ".join(
        f"{net}: {t['fused_max_diff']:.2g} (parameters moved up to {t['moved']:.2g})"
        for net, t in times.items()
    )
    ref = runs["before (PyTorch's default), seed 0"][0]
    epochs = sorted({*range(0, args.epochs, 2), args.epochs - 1})
    curve_rows = [
        [
            name,
            *[f"{losses[e]:.3f}" for e in epochs],
            f"{max(abs(a - b) for a, b in zip(losses, ref, strict=True)):.3f}",
            f"{1e3 * s_step:.0f}",
        ]
        for name, (losses, s_step) in runs.items()
    ]
    curve_table = md_table(
        [
            "optimizer, seed",
            *[f"epoch {e}" for e in epochs],
            "largest difference to before, seed 0",
            "ms a step",
        ],
        curve_rows,
    )
    body = (
        f"One optimizer step (the TransFusion networks: AdamW; the default config's segmenters, "
        f"`encoder_weights: null`: Adam) on {device_name(device)}, gradients set once, mean of {args.steps} steps after a "
        f"warm-up:\n\n{step_table}\n\nLargest parameter difference, fused against the loop, after "
        f"{args.steps + 1} steps with the same gradients: {diffs}.\n\nLoss curve (epoch means of "
        f"`train/loss`) of the default network at {args.size} px, batch 8, {args.steps_per_epoch} steps an "
        f"epoch, {'bf16' if device.type == 'cuda' else 'float32'}, with the seconds a step of the whole fit "
        f"(runs one after another, not alternating):\n\n{curve_table}"
    )
    write_section(args, "optimizer_step", "AdamW: loop, foreach or fused (#9)", body)


if __name__ == "__main__":
    main()
