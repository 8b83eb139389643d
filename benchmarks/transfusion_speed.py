"""TransFusion training and inference speed (#9) on whatever device is present (CUDA if available, else CPU).

For the default network (teacher config) and the published one (`experiment=transfusion_paper`), it reports:
anomaly generation per batch, network forward+backward+AdamW per batch, the plain step (both, outside
Lightning), the real Lightning loop (images/s; its time beyond generation + network is the loop overhead,
with the full garbage collections that fell inside it), inference images/s (`predict`, the whole reverse
process), and the number of device-synchronising aten ops per training step (read-backs, boolean indexing:
counted by a dispatch mode, so measurable on the CPU too). It also counts the arithmetic (`flops_per_image`)
and reports the TFLOP/s the network step (AdamW included) and the best inference batch reach, to set against
the device's peak: how far a target is from its roofline.

    python benchmarks/transfusion_speed.py [--tiny] [--out DIR] [--nets default,paper] [--steps 20]
        [--batch 8] [--size 256] [--default-size 128] [--infer-batches 8,32] [--compile] [--precision auto]
        [--channels-last] [--pageable]

On a CPU the published network runs at a small size/batch (see --cpu-paper-size); `benchmarks/gpu_transfusion.sh`
runs the GPU measurement in numbered steps. `--out DIR` writes `DIR/transfusion_speed.md` (heading, command, table).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from common import emit
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset

from mvtec_seg.config import compose_config
from mvtec_seg.models.base import build_optimizers, parameter_count, with_fused_default
from mvtec_seg.models.transfusion import AnomalyGenerator, TransFusionLoss, TransFusionModel

SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique", "_unique2"}
SYNCING |= {"unique_consecutive", "unique_dim", "repeat_interleave", "allclose", "item"}


class SyncCounter(TorchDispatchMode):
    """Counts aten ops that make the host wait for the device on a GPU (same list as the test's guard)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING or (
            name in {"index", "index_put", "index_put_"}
            and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] or []))
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


def device_precision(device: torch.device) -> str:
    """The benchmarks' default precision: bf16 autocast on a GPU (as the published recipe trains), else fp32."""
    return "bf16" if device.type == "cuda" else "fp32"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return f"CPU {cpu or platform.processor()} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def net_params(paper: bool, size: int) -> dict:
    overrides = [f"data.image_size={size}"] + (["experiment=transfusion_paper"] if paper else [])
    cfg = compose_config(overrides, run_dir="/tmp/unused")
    net = dict(cfg.teacher.params.net)
    net["channel_mult"], net["attention_levels"] = list(net["channel_mult"]), list(net["attention_levels"])
    return {"net": net, "lr": float(cfg.teacher.params.optimizer.lr)}


def object_images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    """Discs on a light background: an object category (the foreground rule runs on them)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2).float()
    colour = 0.1 + 0.4 * torch.rand(b, 3, 1, 1, generator=g)
    return 0.85 * (1 - disc) + (colour + 0.05 * torch.rand(b, 3, size, size, generator=g)) * disc


class Images(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "path": f"train/good/{i:03d}.png"}


def timed(fn, steps: int, device: torch.device) -> float:
    """Median-free mean seconds per call after one warm-up call (device synchronised around the block)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Training(NamedTuple):
    """The pieces of a plain TransFusion training step, outside Lightning."""

    spec: dict
    model: TransFusionModel
    loss_fn: TransFusionLoss
    opt: torch.optim.Optimizer
    gen: AnomalyGenerator
    images: torch.Tensor
    paths: list[str]

    def network_step(self, material: dict, precision: str) -> None:
        """The step without generation: timesteps, forward and loss under ``precision``, backward, AdamW."""
        device = self.images.device
        t = self.model.sample_timesteps(len(material["x0"]), device)
        with autocast(device, precision):
            out = self.model.training_forward(
                material["x0"], material["mask"], material["appearance"], material["prev_mask"], t
            )
            loss = self.loss_fn(out)["loss"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def adamw(lr: float, options: dict | None = None) -> dict:
    """The teacher's optimizer config (AdamW, Hydra partial), with extra keyword ``options`` (e.g. foreach)."""
    return {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": lr, **(options or {})}


def plain_training(paper: bool, size: int, batch: int, n_images: int, device: torch.device) -> Training:
    """Network (seeded), loss, AdamW (fused, as the teacher's module builds it), the anomaly generator with
    its foreground cache warm for ``n_images`` object images (a fit warms it in its first epoch), and those
    images with their paths."""
    spec = net_params(paper, size)
    torch.manual_seed(0)
    model = TransFusionModel(**spec["net"]).to(device).train()
    params = list(model.parameters())
    opt = build_optimizers(params, with_fused_default(adamw(spec["lr"]), params))
    images = object_images(n_images, size).to(device)
    paths = [f"train/good/{i:03d}.png" for i in range(n_images)]
    gen = AnomalyGenerator(seed=0)
    for i in range(0, n_images, batch):
        gen.generate(images[i : i + batch], paths=paths[i : i + batch])
    return Training(spec, model, TransFusionLoss(), opt, gen, images, paths)


def flops_per_image(spec: dict, size: int) -> tuple[float, float]:
    """FLOPs of one image's training step (forward + loss + backward) and of its inference (`predict`, the
    whole reverse process), counted by torch's FlopCounterMode on the meta device: shapes only, no compute.
    Attention goes through the math backend there so its matrix products are counted too."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), sdpa_kernel(SDPBackend.MATH):
        model = TransFusionModel(**spec["net"])
        x, mask, t = torch.rand(1, 3, size, size), torch.zeros(1, 1, size, size), torch.tensor([1])
        with FlopCounterMode(display=False) as train:
            TransFusionLoss()(model.training_forward(x, mask, x, mask, t))["loss"].backward()
        with torch.no_grad(), FlopCounterMode(display=False) as infer:
            model.predict(x)
    return float(train.get_total_flops()), float(infer.get_total_flops())


def measure(name: str, paper: bool, size: int, batch: int, steps: int, args, device: torch.device) -> dict:
    training = plain_training(paper, size, batch, 2 * batch, device)
    spec, model, loss_fn, _, gen, images, paths = training
    if args.channels_last:  # weights in NHWC: every convolution then runs NHWC (no cuDNN layout conversions)
        model.to(memory_format=torch.channels_last)
    compile_s = 0.0
    if args.compile:
        # each network its own compile cache: the second one otherwise hits dynamo's recompile limit and
        # silently runs eager (seen on the GPU: "compiled" in 1 s, no faster than eager)
        torch._dynamo.reset()
        t0 = time.perf_counter()
        model.net.compile()
        loss_fn.compile()
    x, p = images[:batch], paths[:batch]

    def generate():
        return gen.generate(x, paths=p)

    material = generate()

    def network():
        training.network_step(material, args.precision)

    def plain_step():
        nonlocal material
        material = generate()
        network()

    if args.compile:
        network()
        sync(device)
        compile_s = time.perf_counter() - t0
    gen_s = timed(generate, steps, device)
    net_s = timed(network, steps, device)
    plain_s = timed(plain_step, steps, device)
    counter = SyncCounter()
    with counter:
        material = generate()
        t = model.sample_timesteps(batch, device)
        with autocast(device, args.precision):
            loss_fn(
                model.training_forward(
                    material["x0"], material["mask"], material["appearance"], material["prev_mask"], t
                )
            )
    loop_s, loop_gc = real_loop(spec, size, batch, steps, args, device)
    train_flops, infer_flops = flops_per_image(spec, size)
    model.eval()
    infer = {}
    for ib in args.infer_batches:
        xi = object_images(ib, size).to(device)
        with torch.inference_mode(), autocast(device, args.precision):
            infer[ib] = ib / timed(lambda xi=xi: model.predict(xi), max(1, args.infer_steps), device)
    return {
        "net": name,
        "params_M": parameter_count(model) / 1e6,
        "size": size,
        "batch": batch,
        "steps": steps,
        "precision": args.precision,
        "compile": bool(args.compile),
        "compile_s": compile_s,
        "channels_last": bool(args.channels_last),
        "loop_batches": "pinned" if device.type == "cuda" and not args.pageable else "pageable",
        "generation_ms": 1e3 * gen_s,
        "network_ms": 1e3 * net_s,
        "plain_step_ms": 1e3 * plain_s,
        "plain_images_per_s": batch / plain_s,
        "loop_step_ms": 1e3 * loop_s,
        "loop_images_per_s": batch / loop_s,
        "loop_overhead_ms": 1e3 * (loop_s - gen_s - net_s),
        "loop_full_gc": loop_gc,
        "syncing_ops_per_step": counter.count,
        "inference_images_per_s": {str(k): v for k, v in infer.items()},
        "train_GFLOP_per_image": train_flops / 1e9,
        "inference_GFLOP_per_image": infer_flops / 1e9,
        "network_TFLOP_per_s": train_flops * batch / net_s / 1e12,
        "inference_TFLOP_per_s": infer_flops * max(infer.values(), default=0.0) / 1e12,
    }


class FullCollections:
    """Python's full (generation 2) garbage collections while active: how many, and their seconds. A compile
    leaves many objects behind, and each full collection walks them all; one falling inside a short timed
    loop would read as loop overhead. Registered with Python's collector inside a ``with`` block."""

    def __init__(self) -> None:
        self.count, self.seconds, self.active, self._t = 0, 0.0, False, 0.0

    def __enter__(self) -> FullCollections:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)

    def summary(self) -> dict:
        return {"count": self.count, "ms": 1e3 * self.seconds}

    def __call__(self, phase: str, info: dict) -> None:
        if not self.active or info["generation"] != 2:
            return
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.count += 1
            self.seconds += time.perf_counter() - self._t


def real_loop(
    spec: dict, size: int, batch: int, steps: int, args, device: torch.device
) -> tuple[float, dict]:
    """Seconds per step of a Lightning fit (the teacher's loop), timed after 2 warm-up steps, and the full
    garbage collections inside the timed steps."""
    import pytorch_lightning as pl

    warm = 2
    marks: dict[str, float] = {}
    full_gc = FullCollections()

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch_, batch_idx):
            if trainer.global_step == warm:
                sync(device)
                marks["t0"] = time.perf_counter()
                full_gc.active = True

        def on_train_end(self, trainer, pl_module):
            sync(device)
            marks["t1"] = time.perf_counter()
            full_gc.active = False

    with full_gc:
        lightning_fit(
            spec,
            size,
            batch,
            4,
            device,
            [Clock()],
            precision=args.precision,
            compile=args.compile,
            pageable=args.pageable,
            channels_last=args.channels_last,
            max_steps=warm + steps,
        )
    return (marks["t1"] - marks["t0"]) / steps, full_gc.summary()


def lightning_fit(
    spec: dict,
    size: int,
    batch: int,
    steps_per_epoch: int,
    device: torch.device,
    callbacks: list,
    *,
    precision: str,
    compile: bool = False,
    pageable: bool = False,
    channels_last: bool = False,
    max_steps: int = -1,
    max_epochs: int | None = None,
    seed: int = 0,
    optimizer_options: dict | None = None,
):
    """A Lightning fit of the teacher's module (initialisation and anomalies from ``seed``) on
    ``steps_per_epoch`` batches of object images an epoch, with ``callbacks`` and no checkpointing of its
    own; returns the trainer. ``precision``: bf16 or fp32; ``pageable``: batches not pinned on a GPU;
    ``channels_last``: the network's weights in NHWC; ``optimizer_options``: extra AdamW arguments."""
    import pytorch_lightning as pl

    from mvtec_seg.models.transfusion.lightning_model import TransFusion

    params = {
        "net": spec["net"],
        "anomalies": {"kind": "object", "seed": seed},
        "optimizer": adamw(spec["lr"], optimizer_options),
    }
    if compile:
        params["compile"] = True
    torch.manual_seed(seed)
    loader = DataLoader(
        Images(object_images(batch * steps_per_epoch, size)),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        pin_memory=device.type == "cuda" and not pageable,
    )
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        max_steps=max_steps,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    module = TransFusion(**params)
    if channels_last:
        module.model.to(memory_format=torch.channels_last)
    trainer.fit(module, loader)
    return trainer


def loss_curve(
    size: int, steps_per_epoch: int, epochs: int, seed: int, device: torch.device, *, precision: str, **fit
) -> list[float]:
    """Epoch means of ``train/loss`` of the default network, batch 8, trained by `lightning_fit` (``fit``: its
    other keyword arguments)."""
    import pytorch_lightning as pl

    losses: list[float] = []

    class EpochLoss(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            losses.append(float(trainer.callback_metrics["train/loss"]))

    lightning_fit(
        net_params(False, size),
        size,
        8,
        steps_per_epoch,
        device,
        [EpochLoss()],
        precision=precision,
        max_epochs=epochs,
        seed=seed,
        **fit,
    )
    return losses


def markdown(results: list[dict], command: str, device: str) -> str:
    ib = sorted({k for r in results for k in r["inference_images_per_s"]}, key=int)
    head = (
        "| network | params | px | batch | precision | compile | generation ms | network fwd+bwd+opt ms "
        "| plain step img/s | Lightning loop img/s (batches) | loop overhead ms (full GCs: count, ms a step) "
        "| syncing ops/step | "
        + "".join(f"inference img/s (batch {b}) | " for b in ib)
        + "GFLOP/img train, inference | TFLOP/s network step, best inference |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        cells = [
            r["net"],
            f"{r['params_M']:.2f} M",
            str(r["size"]),
            str(r["batch"]),
            r["precision"],
            (f"yes ({r['compile_s']:.0f} s)" if r["compile"] else "no")
            + (", channels_last" if r.get("channels_last") else ""),
            f"{r['generation_ms']:.1f}",
            f"{r['network_ms']:.1f}",
            f"{r['plain_images_per_s']:.1f}",
            f"{r['loop_images_per_s']:.1f} ({r['loop_batches']})",
            f"{r['loop_overhead_ms']:.1f} ({r['loop_full_gc']['count']}, "
            f"{r['loop_full_gc']['ms'] / r['steps']:.1f})",
            str(r["syncing_ops_per_step"]),
        ] + [f"{r['inference_images_per_s'].get(b, float('nan')):.1f}" for b in ib]
        cells += [
            f"{r['train_GFLOP_per_image']:.1f}, {r['inference_GFLOP_per_image']:.0f}",
            f"{r['network_TFLOP_per_s']:.3g}, {r['inference_TFLOP_per_s']:.3g}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(
        ["## TransFusion speed (#9)", "", f"Device: {device}", "", "```", command, "```", "", *rows, ""]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a few seconds: tiny sizes, 1 step (for tests)")
    ap.add_argument("--out", type=Path, default=None, help="write DIR/transfusion_speed.md")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--nets", default="default,paper")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 3 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="default 8 on GPU, 4 on CPU")
    ap.add_argument("--size", type=int, default=256, help="image size of the published network on GPU")
    ap.add_argument("--default-size", type=int, default=128, help="image size of the default network")
    ap.add_argument(
        "--cpu-paper-size", type=int, default=64, help="image size of the published network on CPU"
    )
    ap.add_argument(
        "--infer-batches", default=None, help="comma list (default 8,32 on GPU, 4 on CPU; 0: none)"
    )
    ap.add_argument("--infer-steps", type=int, default=None)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on GPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile network and loss")
    ap.add_argument(
        "--channels-last",
        action="store_true",
        help="network weights in channels_last (NHWC) memory format, in every measurement",
    )
    ap.add_argument(
        "--pageable",
        action="store_true",
        help="the Lightning loop's batches from pageable memory (data.pin_memory=false on a GPU)",
    )
    args = ap.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.precision == "auto":
        args.precision = device_precision(device)
    steps = args.steps or (20 if gpu else 3)
    batch = args.batch or (8 if gpu else 4)
    args.infer_batches = [int(b) for b in (args.infer_batches or ("8,32" if gpu else "4")).split(",")]
    args.infer_batches = [b for b in args.infer_batches if b > 0]  # --infer-batches 0: no inference
    args.infer_steps = args.infer_steps or (5 if gpu else 1)
    sizes = {"default": args.default_size, "paper": args.size if gpu else args.cpu_paper_size}
    if args.tiny:
        steps, batch, sizes = 1, 2, {"default": 32, "paper": 32}
        args.infer_batches, args.infer_steps = [2], 1
    results = []
    for name in [n.strip() for n in args.nets.split(",") if n.strip()]:
        if name not in sizes:
            sys.exit(f"--nets: unknown network {name!r} (default, paper)")
        r = measure(name, name == "paper", sizes[name], batch, steps, args, device)
        r["device"] = device_name(device)
        emit("transfusion_speed", r)
        results.append(r)
    command = "python benchmarks/transfusion_speed.py " + shlex.join(sys.argv[1:])
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        text = markdown(results, command, device_name(device))
        if args.tiny:  # the heading, then the flag the runner and the test look for
            head, rest = text.split("\n\n", 1)
            text = f"{head}\n\n**Tiny mode: a smoke run, not a measurement.**\n\n{rest}"
        (args.out / "transfusion_speed.md").write_text(text)


if __name__ == "__main__":
    main()
