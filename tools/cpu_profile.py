"""Where a CPU teacher step goes, and what the compiled reverse process would change (`docs/design.md`, CPU).

    OMP_NUM_THREADS=1 python tools/cpu_profile.py step      # anomaly generation / forward+loss / backward / AdamW
    OMP_NUM_THREADS=1 python tools/cpu_profile.py compile   # maps: eager against torch.compile (inductor, freezing)

The default teacher at 128 px, batch 8, on the generated synthetic category, through the code a run uses
(`build_datamodule`, `build_teacher`); each figure is the mean of a few steps after a warm-up.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from mvtec_seg.builders import build_datamodule
from mvtec_seg.config import compose_config
from mvtec_seg.teacher import build_teacher


def teacher(tmp: Path):
    over = ["category=synthetic", "category.generate.n_train=40", "data.image_size=128"]
    over += [
        "category.generate.image_size=128",
        f"paths.cache_dir={tmp / 'cache'}",
        f"data.root={tmp / 'data'}",
    ]
    cfg = compose_config(over, run_dir=tmp / "run")
    dm = build_datamodule(cfg, train_subset="known_normal", batch_size=8, augment=False)
    dm.prepare()
    return build_teacher(cfg), [b for _, b in zip(range(4), dm.train_dataloader(), strict=False)]


def step_shares(module, batches) -> None:
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)
    gen = module.anomaly_generator
    parts = ("anomaly generation", "forward + loss", "backward", "AdamW step")

    def step(batch) -> list[float]:
        marks = [time.perf_counter()]
        material = gen.generate(batch["image"], paths=batch["path"])
        marks.append(time.perf_counter())
        t = module.model.sample_timesteps(len(batch["image"]), batch["image"].device)
        out = module.model.training_forward(
            material["x0"], material["mask"], material["appearance"], material["prev_mask"], t
        )
        loss = module.criterion(out)["loss"]
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]

    step(batches[0])
    totals = [sum(x) for x in zip(*(step(b) for b in batches), strict=True)]
    whole = sum(totals)
    print(f"{8 * len(batches) / whole:.2f} images/s, {torch.get_num_threads()} thread(s)")
    for name, t in zip(parts, totals, strict=True):
        print(f"  {name}: {t / len(batches):.3f} s a step ({t / whole:.1%})")


def compiled_maps(module, batches) -> None:
    import torch._inductor.config as inductor

    images = batches[0]["image"]
    model = module.model.eval()
    eager = model.net
    inductor.freezing = True
    t0 = time.perf_counter()
    compiled = torch.compile(eager)
    with torch.no_grad():
        model.net = compiled
        model.predict(images)  # the shape it is timed at: another shape compiles again
    print(f"compile (first maps call): {time.perf_counter() - t0:.1f} s")
    for name, net in (("eager", eager), ("compiled", compiled)) * 2:
        model.net = net
        with torch.no_grad():
            t0 = time.perf_counter()
            model.predict(images)
        print(f"  {name}: {len(images) / (time.perf_counter() - t0):.2f} images/s")
    model.net = eager


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "step"
    with tempfile.TemporaryDirectory() as tmp:
        module, batches = teacher(Path(tmp))
        (compiled_maps if what == "compile" else step_shares)(module, batches)
