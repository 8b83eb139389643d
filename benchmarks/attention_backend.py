"""Which scaled-dot-product-attention kernel serves TransFusion's attention, and what each would cost (#9).

The published network attends over all positions with one head as wide as the channels: 5 layers at
64x64 = 4,096 tokens of 256 channels and 6 at 32x32 = 1,024 tokens of 512 channels (256 px input); its
attention's matrix products are 89 of the 366.5 GFLOP of a forward pass. A profile on the issue's H100 showed
the memory-efficient kernel's backward at 13 % of the step, not flash attention. For each shape this forces
each backend in turn (`torch.nn.attention.sdpa_kernel`) on query/key/value laid out as the model makes them
(chunks of one linear layer's output) and reports whether it runs (else PyTorch's reason), its forward and
forward+backward time, and the default choice's time; the fastest eligible backend is the lever.

    python benchmarks/attention_backend.py [--batch 8] [--steps 10] [--tiny] [--out DIR]
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from common import bench_parser, emit, md_table, write_section
from torch.nn.attention import SDPBackend, sdpa_kernel
from transfusion_speed import device_name, timed

BACKENDS = {
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "memory-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
PAPER_SHAPES = [(4096, 256, 5), (1024, 512, 6)]  # (tokens, channels, layers) at 256 px


def qkv(batch: int, tokens: int, channels: int, device: torch.device, dtype: torch.dtype):
    """Query, key, value as `SelfAttention` makes them: one linear output split three ways, [B,1,HW,C]."""
    x = torch.randn(batch, tokens, 3 * channels, device=device, dtype=dtype, requires_grad=True)
    return x, x.unsqueeze(1).chunk(3, dim=-1)


def time_backend(backend, batch, tokens, channels, steps, device, dtype) -> dict:
    """Forward and forward+backward ms, or the reason the backend does not run on these inputs."""
    x, (q, k, v) = qkv(batch, tokens, channels, device, dtype)
    grad = torch.randn(batch, 1, tokens, channels, device=device, dtype=dtype)
    context = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()

    def forward():
        return F.scaled_dot_product_attention(q, k, v)

    def both():
        forward().backward(grad)

    with context, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            both()  # warm-up, and the eligibility check
        except RuntimeError as err:
            reasons = [str(w.message).splitlines()[0] for w in caught] or [str(err).splitlines()[0]]
            return {"runs": False, "reason": "; ".join(dict.fromkeys(reasons))[:300]}
        return {
            "runs": True,
            "forward_ms": 1e3 * timed(forward, steps, device),
            "forward_backward_ms": 1e3 * timed(both, steps, device),
        }


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = PAPER_SHAPES
    if args.tiny:
        args.batch, args.steps, shapes = 2, 1, [(64, 16, 1)]
    elif device.type == "cpu":
        args.batch, args.steps, shapes = 1, 2, [(1024, 256, 5)]  # the 128 px level: CPU-sized
    rows = []
    for tokens, channels, layers in shapes:
        for name, backend in BACKENDS.items():
            torch.manual_seed(0)
            r = time_backend(backend, args.batch, tokens, channels, args.steps, device, dtype)
            r |= {"backend": name, "tokens": tokens, "channels": channels, "layers": layers}
            emit("attention_backend", {**r, "batch": args.batch, "device": device_name(device)})
            rows.append(r)
    table = md_table(
        ["tokens x channels (layers)", "backend", "forward ms", "forward+backward ms", "why not"],
        [
            [
                f"{r['tokens']} x {r['channels']} ({r['layers']})",
                r["backend"],
                f"{r['forward_ms']:.2f}" if r["runs"] else "–",
                f"{r['forward_backward_ms']:.2f}" if r["runs"] else "–",
                "" if r["runs"] else r["reason"].replace("|", "/"),
            ]
            for r in rows
        ],
    )
    body = (
        f"Batch {args.batch}, one head, {str(dtype).removeprefix('torch.')}, on {device_name(device)}; "
        f"per layer, mean of {args.steps} calls after a warm-up.\n\n{table}"
    )
    write_section(args, "attention_backend", "Attention kernels for TransFusion's shapes (#9)", body)


if __name__ == "__main__":
    main()
