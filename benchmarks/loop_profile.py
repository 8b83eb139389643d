"""Where the teacher's Lightning loop spends a step, on the host and on the device (#9).

On the H200 the compiled network step was 28 % faster than eager, yet the Lightning loop around it ran at eager
speed: 27 ms a step of "loop overhead" against 8 eager, cause unknown. This splits the loop's steps two ways,
eager and compiled, with the real loop (`transfusion_speed.lightning_fit`: the teacher's module, AdamW, bf16
autocast on a GPU, pinned batches, epochs of ``--steps-per-epoch`` batches; bottle has 26, the speed benchmark
4, and each epoch end waits for the device):

- host time by phase (no device synchronisation inside the window; Lightning's hooks stamp the clock):
  generation, the rest of `training_step` (forward, loss, logging), zero_grad + backward, the optimizer step
  (AdamW and Lightning's glue, hook to hook), and between batches (the loop, the DataLoader, the copy to
  the device);
- in a second window under torch.profiler: wall ms per step against the ms the device was busy (kernels and
  copies). Busy close to wall: the device limits the loop. Well below: the device waits for the host, and the
  host phases say where the host's time goes;
- the full garbage collections in the first window (each walks the objects a compile leaves behind).

    python benchmarks/loop_profile.py [--net paper|default] [--size 256] [--batch 8] [--steps 10]
        [--steps-per-epoch 26] [--modes eager,compile] [--tiny] [--out DIR]
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from common import bench_parser, emit, md_table, write_section
from torch.profiler import ProfilerActivity, profile, schedule
from transfusion_speed import FullCollections, device_name, device_precision, lightning_fit, net_params, sync

PHASES = ["generation", "forward, loss, logging", "zero_grad + backward", "optimizer step", "between batches"]


class Phases(pl.Callback):
    """Host clock at Lightning's hooks for the steps in ``window`` (the generator's `generate` wrapped to
    stamp its end), the device synchronised only at the ends of ``window`` and ``profiled``; steps ``prof``
    (a scheduled profiler) once per batch."""

    def __init__(self, window: range, profiled: range, device: torch.device, prof: profile) -> None:
        self.window, self.profiled, self.device, self.prof = window, profiled, device, prof
        self.ms = {p: 0.0 for p in PHASES}
        self.marks: dict[str, float] = {}
        self.t: dict[str, float] = {}
        self.full_gc = FullCollections()

    def _span(self, phase: str, start: str, end: str) -> None:
        self.ms[phase] += 1e3 * (self.t[end] - self.t[start])

    def on_train_start(self, trainer, pl_module) -> None:
        gen = pl_module.anomaly_generator
        generate = gen.generate

        def stamped(*a, **kw):
            out = generate(*a, **kw)
            self.t["generated"] = time.perf_counter()
            return out

        gen.generate = stamped

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now, step = time.perf_counter(), trainer.global_step
        if step in self.window and step > self.window.start:
            self.ms["between batches"] += 1e3 * (now - self.t["batch_end"])
        for part in (self.window, self.profiled):
            if step == part.start:
                sync(self.device)
                now = self.marks[f"start{part.start}"] = time.perf_counter()
        self.full_gc.active = step in self.window
        self.t["batch_start"] = now

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        self.t["zero_grad"] = time.perf_counter()

    def on_after_backward(self, trainer, pl_module) -> None:
        self.t["backward_done"] = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.t["batch_end"] = time.perf_counter()
        step = trainer.global_step - 1  # the step that just ran
        if step in self.window:
            self._span("generation", "batch_start", "generated")
            self._span("forward, loss, logging", "generated", "zero_grad")
            self._span("zero_grad + backward", "zero_grad", "backward_done")
            self._span("optimizer step", "backward_done", "batch_end")
        for part in (self.window, self.profiled):
            if step == part.stop - 1:
                sync(self.device)
                self.marks[f"end{part.start}"] = time.perf_counter()
        if step == self.window.stop - 1:  # the gaps between the window's batches count too
            self.full_gc.active = False
        self.prof.step()


def run(args, compiled: bool, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    warm, n = 3, args.steps
    window, profiled = range(warm, warm + n), range(warm + n, warm + 2 * n)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    torch._dynamo.reset()
    # profiler step k is training step k: recording exactly the steps in `profiled`
    plan = schedule(wait=profiled.start - 1, warmup=1, active=n, repeat=1)
    with profile(activities=activities, schedule=plan) as prof:
        phases = Phases(window, profiled, device, prof)
        with phases.full_gc:
            lightning_fit(
                net_params(args.net == "paper", args.size),
                args.size,
                args.batch,
                args.steps_per_epoch,
                device,
                [phases],
                precision=device_precision(device),
                compile=compiled,
                max_steps=profiled.stop,
            )
    kernels = [e for e in prof.events() if cuda and e.device_type == torch.autograd.DeviceType.CUDA]
    per_step = {
        k: 1e3 * (phases.marks[f"end{r.start}"] - phases.marks[f"start{r.start}"]) / n
        for k, r in (("wall_ms", window), ("profiled_wall_ms", profiled))
    }
    return {
        "mode": "compiled" if compiled else "eager",
        "host_ms": {p: v / n for p, v in phases.ms.items()},
        **per_step,
        "device_busy_ms": sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / n if cuda else None,
        "profiled_ops": len(prof.events()) / n,
        "full_gc": phases.full_gc.summary(),
    }


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--net", choices=["paper", "default"], default="paper")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--steps-per-epoch", type=int, default=26)
    ap.add_argument("--modes", default=None, help="eager,compile (tiny: eager)")
    args = ap.parse_args()
    if args.tiny:
        args.net, args.size, args.batch, args.steps, args.steps_per_epoch = "default", 32, 2, 2, 3
    args.modes = args.modes or ("eager" if args.tiny else "eager,compile")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results = [run(args, m == "compile", device) for m in modes]
    for r in results:
        emit("loop_profile", {**r, "net": args.net, "size": args.size, "device": device_name(device)})
    rows = [[p, *[f"{r['host_ms'][p]:.1f}" for r in results]] for p in PHASES]
    rows.append(["**host, all phases**", *[f"{sum(r['host_ms'].values()):.1f}" for r in results]])
    rows.append(
        ["wall (device-synchronised at the window's ends)", *[f"{r['wall_ms']:.1f}" for r in results]]
    )
    rows.append(
        ["full GCs in the window (count, ms a step)"]
        + [f"{r['full_gc']['count']}, {r['full_gc']['ms'] / args.steps:.1f}" for r in results]
    )
    rows.append(["wall under the profiler", *[f"{r['profiled_wall_ms']:.1f}" for r in results]])
    busy = [r["device_busy_ms"] for r in results]
    rows.append(["device busy (kernels and copies)", *["–" if b is None else f"{b:.1f}" for b in busy]])
    body = (
        f"{args.net} network at {args.size} px, batch {args.batch}, "
        f"{'bf16' if device.type == 'cuda' else 'float32'}, epochs of {args.steps_per_epoch} batches, on "
        f"{device_name(device)}: ms per step, mean of {args.steps} steps after 3 warm-up steps (host phases and "
        f"wall), then {args.steps} more under torch.profiler (device busy against wall). The host phases are "
        "the clock between Lightning's hooks without synchronising, so a phase that waits for the device "
        "(a full launch queue, a read-back) counts the wait."
        + (" On a CPU there is no device: each phase is its own compute." if device.type == "cpu" else "")
        + "\n\n"
        + md_table(["ms per step", *[r["mode"] for r in results]], rows)
    )
    write_section(args, "loop_profile", "Where the teacher's Lightning loop spends a step (#9)", body)


if __name__ == "__main__":
    main()
