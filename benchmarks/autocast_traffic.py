"""GroupNorm under bf16 autocast (#9): the bytes TransFusion's network moves, its loss curve, and (on a GPU) its time,
with GroupNorm upcast to float32 (CUDA autocast's rule for ``group_norm``: the network before) and kept in the
autocast dtype (`torch_model.GroupNorm`: now).

- Traffic, counted without a GPU: the network runs on fake CUDA tensors (`FakeTensorMode`: shapes, dtypes and
  CUDA's dispatch keys, no memory, no compute) with CUDA autocast switched on, so each cast autocast inserts is
  a dispatched ``_to_copy``. An op's bytes are its tensor inputs plus outputs: what an unfused kernel reads and
  writes. Attention counts as one fused kernel (query, key, value, output), as a GPU runs it. Forward only,
  because autograd cannot run on fake CUDA tensors; the backward of a cast is a cast of the gradient.
- Loss curve: the default network trained in bf16 with each rule, same seed, plus the float32 rule with a
  second seed for the noise band. On the CPU the float32 rule is emulated (CPU autocast keeps group_norm in
  bf16); on a GPU it is autocast's own.
- Time, on a GPU: the published network's step (forward, loss, backward, AdamW) and inference with each
  rule, alternating (tiny mode runs this code on any device as a smoke test).
- bf16 weights (the issue's other precision lever, Lightning's ``bf16-true``): the share of the published
  network's initial weights that one AdamW step of size lr (its typical largest: |m/sqrt(v)| <= ~1) cannot
  move, because it is below half the bf16 spacing at that weight.

    python benchmarks/autocast_traffic.py [--epochs 20] [--rounds 3] [--tiny] [--out DIR]
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from unittest import mock

import torch
import torch.nn.functional as F
from common import bench_parser, emit, md_table, write_section
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transfusion_speed import autocast, device_name, loss_curve, net_params, plain_training, timed

from mvtec_seg.models.transfusion import torch_model
from mvtec_seg.models.transfusion.torch_model import GroupNorm, TransFusionModel

RULES = {
    "float32": "group_norm upcast to float32 (CUDA autocast's rule; before)",
    "bf16": "group_norm in the autocast dtype (`torch_model.GroupNorm`; now)",
}
COMPUTE = {"convolution", "addmm", "mm", "bmm", "baddbmm"}
# ops that only make a view or read metadata: no bytes move
NO_TRAFFIC = {"detach", "view", "_unsafe_view", "t", "transpose", "expand", "unsqueeze", "squeeze", "permute"}
NO_TRAFFIC |= {"slice", "select", "split", "split_with_sizes", "chunk", "alias", "unbind", "as_strided"}


@contextlib.contextmanager
def groupnorm_rule(rule: str):
    """Run the network's GroupNorms under ``rule``; "float32" is what CUDA autocast does to ``group_norm``
    (inputs to float32, float32 out), reproduced the same way on any device."""
    if rule == "bf16":
        yield
        return

    def upcast(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)

    with mock.patch.object(GroupNorm, "forward", upcast):
        yield


class Traffic(TorchDispatchMode):
    """Bytes read and written per kind of op (each op as its own kernel), and the upcasts of bf16 tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in NO_TRAFFIC or name == "device":
            return out
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if name == "_to_copy" and ins[0].dtype == outs[0].dtype:
            return out
        if name in COMPUTE:
            kind = "convolution + linear"
        elif name.startswith("_scaled_dot_product"):
            kind = "attention"
        elif name == "_to_copy":
            kind = "casts"
            if ins[0].dtype == torch.bfloat16 and outs[0].dtype == torch.float32:
                self.calls["upcasts"] += 1
        elif name in {"native_group_norm", "silu"}:
            kind = name.removeprefix("native_")
        else:
            kind = "other elementwise"
        self.bytes[kind] += sum(t.numel() * t.element_size() for t in ins + outs)
        self.calls[kind] += 1
        return out


@contextlib.contextmanager
def cuda_autocast_on_fake_tensors():
    """Fake CUDA tensors by default, CUDA bf16 autocast on (set directly: `torch.autocast` turns itself off
    without a GPU), attention as one fused kernel."""

    def fused_attention(q, k, v, *args, **kwargs):
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0]

    was = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    with (
        FakeTensorMode(allow_non_fake_inputs=True),
        torch.device("cuda"),
        mock.patch.object(torch_model.F, "scaled_dot_product_attention", fused_attention),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter(
            "ignore"
        )  # "CUDA is not available", from GroupNorm's inner autocast(enabled=False)
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        try:
            yield
        finally:
            torch.set_autocast_enabled("cuda", was[0])
            torch.set_autocast_dtype("cuda", was[1])


def forward_traffic(spec: dict, size: int, batch: int, rule: str) -> Traffic:
    """What one forward of the network at ``batch`` x ``size`` px moves under CUDA bf16 autocast."""
    with cuda_autocast_on_fake_tensors():
        model = TransFusionModel(**spec["net"])
        x, mask = torch.rand(batch, 3, size, size), torch.zeros(batch, 1, size, size)
        t = torch.ones(batch, dtype=torch.long)
        with groupnorm_rule(rule), Traffic() as traffic:
            model.net(x, mask, t)
    return traffic


def frozen_share(spec: dict, lr: float) -> float:
    """Share of the network's initial weights (seeded) on which a step of ``lr`` rounds away in bf16."""
    torch.manual_seed(0)
    w = torch.cat([p.detach().flatten() for p in TransFusionModel(**spec["net"]).parameters()])
    mag = w.abs().bfloat16()
    spacing = torch.nextafter(mag, torch.full_like(mag, float("inf"))).float() - mag.float()
    return float((lr < spacing / 2).float().mean())


def rule_curve(rule: str, seed: int, size: int, steps: int, epochs: int, device: torch.device) -> list[float]:
    """Epoch means of ``train/loss`` of the default network trained in bf16 under ``rule``."""
    with groupnorm_rule(rule):
        return loss_curve(size, steps, epochs, seed, device, precision="bf16")


def rule_times(
    paper: bool, size: int, batch: int, infer_batch: int, rounds: int, steps: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """Per rule: ms of a bf16 network step (forward, loss, backward, AdamW) at ``batch`` and images/s of
    bf16 inference at ``infer_batch``, best of ``rounds`` alternating rounds."""
    tr = plain_training(paper, size, batch, batch, device)
    material = tr.gen.generate(tr.images, paths=tr.paths)
    xi = torch.rand(infer_batch, 3, size, size, device=device)

    def step():
        tr.network_step(material, "bf16")

    def infer():
        with torch.inference_mode(), autocast(device, "bf16"):
            tr.model.predict(xi)

    times: dict[str, dict[str, list[float]]] = {r: {"step": [], "infer": []} for r in RULES}
    for _ in range(rounds):
        for rule in RULES:
            with groupnorm_rule(rule):
                times[rule]["step"].append(timed(step, steps, device))
                times[rule]["infer"].append(timed(infer, max(1, steps // 5), device))
    return {
        r: {"step_ms": 1e3 * min(v["step"]), "inference_images_per_s": infer_batch / min(v["infer"])}
        for r, v in times.items()
    }


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--epochs", type=int, default=20, help="loss curve: epochs of --steps-per-epoch steps")
    ap.add_argument("--steps-per-epoch", type=int, default=10)
    ap.add_argument("--size", type=int, default=64, help="loss curve: image size (default network)")
    ap.add_argument("--rounds", type=int, default=3, help="GPU timing: alternating rounds per rule")
    ap.add_argument("--steps", type=int, default=10, help="GPU timing: steps per round")
    args = ap.parse_args()
    configs = [("paper", True, 256, 8), ("default", False, 128, 8)]
    if args.tiny:
        configs = [("default", False, 32, 2)]
        args.epochs, args.steps_per_epoch, args.size = 2, 2, 32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    traffic = {}
    for name, paper, size, batch in configs:
        for rule in RULES:
            tr = forward_traffic(net_params(paper, size), size, batch, rule)
            traffic[f"{name}/{rule}"] = {
                "GB": {k: v / 1e9 for k, v in tr.bytes.items()},
                "calls": dict(tr.calls),
            }
    curves = {
        f"{rule}, seed {seed}": rule_curve(rule, seed, args.size, args.steps_per_epoch, args.epochs, device)
        for rule, seed in [("float32", 0), ("bf16", 0), ("float32", 1)]
    }
    # timed on a GPU (the CPU's autocast is another rule set); tiny mode runs the code path anywhere
    timing = (False, 32, 2, 2, 1, 1) if args.tiny else (True, 256, 8, 32, args.rounds, args.steps)
    times = rule_times(*timing, device) if device.type == "cuda" or args.tiny else {}
    lead, lead_paper, lead_size, _ = configs[0]
    spec = net_params(lead_paper, lead_size)
    frozen = {lr: frozen_share(spec, lr) for lr in sorted({spec["lr"], 1e-4})}
    result = {"device": device_name(device), "traffic": traffic, "loss": curves, "gpu": times}
    emit("autocast_traffic", {**result, "bf16_frozen_share": frozen})

    kinds = ["casts", "group_norm", "silu", "other elementwise", "convolution + linear", "attention"]
    rows = []
    for (name, _, size, batch), rule in [(c, r) for c in configs for r in RULES]:
        t = traffic[f"{name}/{rule}"]
        total = sum(t["GB"].values())
        rows.append(
            [f"{name}, {size} px, batch {batch}", RULES[rule]]
            + [f"{t['GB'].get(k, 0.0):.3g}" for k in kinds]
            + [
                f"**{total:.3g}**",
                t["calls"].get("upcasts", 0),
                sum(v for k, v in t["calls"].items() if k != "upcasts"),
            ]
        )
    body = (
        "Bytes read + written by one forward of the network under CUDA's bf16 autocast, counted on fake CUDA "
        "tensors (no GPU needed; each op as its own kernel, attention as one fused kernel):\n\n"
        + md_table(
            ["network", "GroupNorm", *[f"{k} GB" for k in kinds], "total GB", "upcasts", "kernels"], rows
        )
    )
    every = max(1, args.epochs // 10)
    shown = list(range(0, args.epochs, every)) + ([args.epochs - 1] if (args.epochs - 1) % every else [])
    ref = curves["float32, seed 0"]
    rows = [
        [k] + [f"{c[e]:.3f}" for e in shown] + [f"{max(abs(a - b) for a, b in zip(c, ref, strict=True)):.3f}"]
        for k, c in curves.items()
    ]
    body += (
        f"\n\nLoss curve (epoch means of `train/loss`), default network at {args.size} px, batch 8, "
        f"{args.steps_per_epoch} steps an epoch, bf16 on {device_name(device)}"
        + (
            " (the float32 rule emulated: CPU autocast keeps group_norm in bf16)"
            if device.type == "cpu"
            else ""
        )
        + ":\n\n"
        + md_table(
            ["GroupNorm, seed", *[f"epoch {e}" for e in shown], "largest difference to float32, seed 0"], rows
        )
    )
    if times:
        rows = [
            [RULES[r], f"{v['step_ms']:.1f}", f"{v['inference_images_per_s']:.1f}"] for r, v in times.items()
        ]
        body += (
            f"\n\n{device_name(device)}, {'published' if timing[0] else 'default'} network at {timing[1]} px, "
            f"bf16, best of {timing[4]} alternating rounds of {timing[5]} steps:\n\n"
            + md_table(
                [
                    "GroupNorm",
                    f"network step ms (batch {timing[2]})",
                    f"inference images/s (batch {timing[3]})",
                ],
                rows,
            )
        )
    body += (
        f"\n\nbf16 weights, {lead} network (initialised with seed 0): share of the weights that "
        "one AdamW step of size lr cannot move in bf16: "
        + ", ".join(f"{v:.1%} at lr {k:g}" for k, v in frozen.items())
        + f" (this network's configured lr is {spec['lr']:g})."
    )
    write_section(args, "autocast_traffic", "GroupNorm under bf16 autocast: traffic, loss, time (#9)", body)


if __name__ == "__main__":
    main()
