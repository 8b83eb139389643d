"""Where a TransFusion training step makes the host wait for the device (#9): call sites, not just a count.

Two detectors, each call site listed with the project frames of its Python stack and the phase it fell in
(generation / forward+loss / backward / optimizer):
- aten ops that read a value back (``item``, ``nonzero``, boolean indexing; `transfusion_speed.SyncCounter`),
  on any device, so the CPU sees them too (not in the optimizer: a foreach AdamW reads host step counters;
  the default fused one reads none);
- on CUDA, torch's own ``set_sync_debug_mode("warn")``, which also sees copies from pageable host memory
  (how the augmentations' constants were found: 7 waits in 3 steps on an H200, 0 after caching them).

    python benchmarks/sync_sites.py [--net paper|default] [--steps 3] [--batch 8] [--size 256] [--out DIR]
"""

from __future__ import annotations

import collections
import traceback
import warnings

import torch
from common import bench_parser, emit, md_table, write_section
from transfusion_speed import SyncCounter, device_name, plain_training


def call_site() -> str:
    """The innermost three project frames of the current stack (``file:line code``)."""
    frames = [f for f in traceback.extract_stack()[:-2] if "mvtec_seg" in f.filename]
    return " <- ".join(f"{f.filename.split('mvtec_seg/')[-1]}:{f.lineno} {f.line}" for f in frames[::-1][:3])


class SiteCounter(SyncCounter):
    """`SyncCounter` that also records where each read-back was asked for."""

    def __init__(self, record) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.count
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.count > before:
            self.record(f"aten.{func.overloadpacket.__name__}")
        return out


def measure(args, device: torch.device) -> collections.Counter:
    """Sites of synchronisations in ``args.steps`` plain training steps (foreground cache warm)."""
    _, model, loss_fn, opt, gen, x, paths = plain_training(
        args.net == "paper", args.size, args.batch, args.batch, device
    )
    sites: collections.Counter = collections.Counter()
    phase = "setup"

    def record(kind: str) -> None:
        # a foreach AdamW's step counters live on the host: its read-backs are no device waits
        if not (kind.startswith("aten.") and phase == "optimizer"):
            sites[(kind, phase, call_site() or "(no project frame)")] += 1

    def on_warning(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message) and "prototype" not in str(message):
            record("CUDA sync debug")

    cuda = device.type == "cuda"
    with warnings.catch_warnings(), SiteCounter(record):
        warnings.showwarning = on_warning
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(args.steps):
                phase = "generation"
                m = gen.generate(x, paths=paths)
                phase = "forward+loss"
                t = model.sample_timesteps(args.batch, device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    out = model.training_forward(m["x0"], m["mask"], m["appearance"], m["prev_mask"], t)
                    loss = loss_fn(out)["loss"]
                phase = "backward"
                loss.backward()
                phase = "optimizer"
                opt.step()
                opt.zero_grad(set_to_none=True)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    return sites


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--net", default="paper", choices=["paper", "default"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    args = ap.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.tiny:
        args.net, args.size, args.batch, args.steps = "default", 32, 2, 1
    sites = measure(args, device)
    emit("sync_sites", {"device": device_name(device), "net": args.net, "syncs": sum(sites.values())})
    rows = [[k, p, f"`{w}`", n] for (k, p, w), n in sites.most_common()] or [["both", "all", "none", 0]]
    body = (
        f"Device: {device_name(device)}; {args.net} network, {args.size} px, batch {args.batch}, "
        f"steps: {args.steps}.\n\n"
        + md_table(["detector", "phase", "call site (innermost first)", "calls"], rows)
    )
    write_section(
        args, "sync_sites", "Host synchronisations in a TransFusion training step, by call site (#9)", body
    )


if __name__ == "__main__":
    main()
