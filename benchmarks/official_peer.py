"""The authors' TransFusion network timed beside ours: the same configuration, inputs, threads and process.

The official code (https://github.com/MaticFuc/ECCV_TransFusion) is imported from the checkout that
``OFFICIAL_TRANSFUSION`` names, never copied here. It needs its own `positional-encodings` package (pinned at
6.0.3 in its requirements). Its anomaly generator (DTD textures, foreground masks) is replaced by one that
returns fixed inputs, and its hard-coded ``.cuda()`` calls are identities on a machine without a GPU; both
sides then time the same work: the network's training step (forward, the full official loss or ours,
backward, AdamW) and the reverse process.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV = "OFFICIAL_TRANSFUSION"


def checkout() -> Path | None:
    """The official checkout named by ``OFFICIAL_TRANSFUSION``, or None (the case is then skipped)."""
    value = os.environ.get(ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not (path / "model" / "TransFusion.py").is_file():
        from mvtec_seg.errors import UserError

        raise UserError(
            f"{ENV}={value} holds no model/TransFusion.py — point it at an ECCV_TransFusion checkout"
        )
    return path


@contextlib.contextmanager
def _official_modules(root: Path) -> Iterator[dict[str, Any]]:
    """Import the official `model.UNet`, `model.TransFusion` and `utils.EvaluationUtils` from `root`, with the
    anomaly generator stubbed and ``.cuda()`` an identity when there is no GPU; undone on exit."""
    import torch

    names = ("model", "model.UNet", "model.TransFusion", "model.SyntAnomGenerator", "utils")
    names += ("utils.MathUtils", "utils.EvaluationUtils")
    saved = {n: sys.modules.pop(n, None) for n in names}
    stub = types.ModuleType("model.SyntAnomGenerator")
    stub.SyntAnomalyGenerator = lambda params: None  # replaced by fixed inputs: see `official_case`
    sys.modules["model.SyntAnomGenerator"] = stub
    cuda = torch.Tensor.cuda
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    sys.path.insert(0, str(root))
    try:
        import model.TransFusion as tf_mod
        import model.UNet as unet_mod
        import utils.EvaluationUtils as eval_mod

        yield {"UNet": unet_mod.UNet, "TransFusion": tf_mod.TransFusion, "sample": eval_mod}
    finally:
        sys.path.remove(str(root))
        torch.Tensor.cuda = cuda  # type: ignore[method-assign]
        for n in names:
            sys.modules.pop(n, None)
            if saved[n] is not None:
                sys.modules[n] = saved[n]


def official_net(mods: dict[str, Any], net: dict, steps: int, device):
    """The official TransFusion wrapper around their U-Net, built as `utils/ParsingUtils.py` does (rgb)."""
    n = len(net["channel_mult"])
    unet = mods["UNet"](
        {
            "n_channels": int(net["base_channels"]),
            "ch_mults": list(net["channel_mult"]),
            "is_attn": [i in set(net["attention_levels"]) for i in range(n)],
            "use_groups": [True] * n,
            "n_blocks": int(net["num_res_blocks"]),
            "image_channels": 3,
            "is_rgbd": False,
        }
    )
    return mods["TransFusion"](
        unet, {"num_steps": steps, "mode": "rgb", "noise_generator_parameters": {}}
    ).to(device)


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def official_case(run_cfg, steps: int, infer_images: int) -> dict[str, Any]:
    """Training step and reverse-process images/s of ours and of the official network, same inputs."""
    import torch

    from mvtec_seg.builders import trainer_device
    from mvtec_seg.models.base import AUTOCAST, parameter_count
    from mvtec_seg.teacher import build_teacher

    root = checkout()
    if root is None:
        return {}
    device = trainer_device(run_cfg.teacher.trainer)
    dtype = AUTOCAST.get(str(run_cfg.teacher.trainer.precision))
    ours = build_teacher(run_cfg).to(device)
    net = dict(run_cfg.teacher.params.net)
    b, size, t_steps = int(run_cfg.teacher.batch_size), int(run_cfg.data.image_size), int(net["num_steps"])
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(b, 3, size, size, generator=g).to(device)
    mask = (torch.rand(b, 1, size, size, generator=g) > 0.7).float().to(device)
    appearance = torch.rand(b, 3, size, size, generator=g).to(device)
    t = torch.randint(1, t_steps, (b,), generator=g).to(device)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    opt = torch.optim.AdamW(ours.parameters(), lr=1e-5, fused=True)

    def ours_step() -> None:
        with autocast():
            out = ours.model.training_forward(x0, mask, appearance, torch.zeros_like(mask), t)
            loss = ours.criterion(out)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    images = x0[:infer_images].repeat(max(1, -(-infer_images // b)), 1, 1, 1)[:infer_images]
    ours.eval()

    def ours_maps(batch: int):
        def run() -> None:
            with torch.no_grad(), autocast():
                for i in range(0, len(images), batch):
                    ours.model.predict(images[i : i + batch])

        return run

    row: dict[str, Any] = {"params": parameter_count(ours), "batch_size": b}
    ours.train()
    row["train_images_per_s"] = b / _timed(ours_step, steps)
    ours.eval()
    row["infer_images_per_s"] = len(images) / _timed(ours_maps(b), 1)
    row["infer_images_per_s_batch1"] = len(images) / _timed(ours_maps(1), 1)
    with _official_modules(root) as mods:
        theirs = official_net(mods, net, t_steps, device)
        theirs.beta = theirs.beta.to(device)
        x0m, appm = x0 * 2 - 1, (appearance * 2 - 1) * mask
        # their set_noise draws DTD/Perlin anomalies on half the batch: here the same fixed inputs as ours
        theirs.set_noise = lambda x, tt, idx, plane_mask=None: (appm, mask, torch.zeros_like(mask))
        their_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-5)  # utils/ParsingUtils.py: get_optimizer

        def their_step() -> None:
            their_opt.zero_grad()
            with autocast():
                loss = theirs.loss(x0m.clone(), idx=torch.arange(b))
            loss.backward()
            their_opt.step()

        def their_maps() -> None:  # utils/EvaluationUtils.py: one image at a time, as their evaluation
            for image in images * 2 - 1:
                with autocast():
                    mods["sample"].get_transparentfussion_sample(theirs, theirs.steps - 1, image)

        row["official_params"] = parameter_count(theirs.model)
        theirs.train()
        row["official_train_images_per_s"] = b / _timed(their_step, steps)
        theirs.eval()
        row["official_infer_images_per_s"] = len(images) / _timed(their_maps, 1)
    return row
