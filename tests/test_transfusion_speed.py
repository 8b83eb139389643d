"""TransFusion speed: no device read-backs in a training step, cached foregrounds, the batched
augmentations equal torchvision's per-image ones, no float32 round trips around GroupNorm under autocast.
Timing lives in the speed benchmark suite, not here."""

from __future__ import annotations

import math
import traceback
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torchvision.transforms.v2.functional as TF
from conftest import compose_cfg
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset

from mvtec_seg.models.transfusion import anomalies, image_ops
from mvtec_seg.models.transfusion.anomalies import AnomalyGenerator
from mvtec_seg.models.transfusion.image_ops import _augment_rows, _autocontrast, _sharpness
from mvtec_seg.models.transfusion.lightning_model import TransFusion
from mvtec_seg.models.transfusion.torch_model import GroupNorm, TransFusionModel

NET = {
    "base_channels": 8,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_levels": [1],
    "num_steps": 5,
}
NET.update(image_size=32, norm_groups=4)


def disc_images(b: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Dark discs on a light background: an object with a clear foreground."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).float()
    return 0.85 * (1 - disc) + (0.2 + 0.05 * torch.rand(b, 3, size, size, generator=g)) * disc


class _Images(Dataset):
    def __init__(self, n: int, crop: int | None = None) -> None:
        self.images, self.crop, self.augment = disc_images(n), crop, False

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "path": f"train/good/{i:03d}.png"}


class SyncGuard(TorchDispatchMode):
    """Fails on every aten op that makes the host wait for the device on a GPU (read-backs, data-dependent
    shapes). On the CPU nothing waits, but the same calls would; so this checks a CUDA property on the CPU."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique", "_unique2"}
    SYNCING |= {"unique_consecutive", "unique_dim", "repeat_interleave", "allclose", "item"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in {"index", "index_put", "index_put_"} and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] or [])
        )
        if name in self.SYNCING or bool_index:
            raise AssertionError(f"host synchronisation inside the training step: aten.{name}")
        return func(*args, **(kwargs or {}))


def _fit(module: TransFusion, dataset: Dataset, steps: int) -> None:
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(dataset, batch_size=4))


def test_training_step_never_reads_back_from_the_device(monkeypatch):
    module = TransFusion(
        NET, {"kind": "object", "seed": 0}, {"_target_": "torch.optim.AdamW", "_partial_": True}
    )
    original = TransFusion.training_step
    guarded = {"steps": 0}

    def step(self, batch, batch_idx):
        if self.global_step == 0:  # the first batch fills the foreground cache (SciPy, once per image)
            return original(self, batch, batch_idx)
        with SyncGuard():
            out = original(self, batch, batch_idx)
        guarded["steps"] += 1
        return out

    monkeypatch.setattr(TransFusion, "training_step", step)
    _fit(module, _Images(4), steps=3)
    assert guarded["steps"] == 2
    # the guard itself works: the previous, reading-back loss check is caught
    with pytest.raises(AssertionError, match="_local_scalar_dense|is_nonzero"), SyncGuard():
        bool(torch.isfinite(torch.tensor(1.0)))


def test_foreground_is_computed_once_per_image(monkeypatch):
    calls = {"images": 0}
    original = anomalies.estimate_foreground

    def counting(images, *args, **kwargs):
        calls["images"] += len(images)
        return original(images, *args, **kwargs)

    monkeypatch.setattr(anomalies, "estimate_foreground", counting)
    images, paths = disc_images(4), [f"good/{i}.png" for i in range(4)]
    gen = AnomalyGenerator(seed=0)
    first = gen.generate(images, paths=paths)
    gen.generate(images[:2], paths=paths[:2])
    gen.generate(images, paths=paths)
    assert calls["images"] == 4
    fresh = AnomalyGenerator(seed=0, cache_foreground=False).generate(images, paths=paths)
    assert calls["images"] == 8
    # cached or not, the same foreground (before the random rotation, which both draw alike)
    assert torch.equal(first["foreground"], fresh["foreground"])


def test_augmentation_constants_reach_the_device_once():
    """On a GPU, copying the colour matrices / sharpen kernel from host memory on every call made the host
    wait several times a step; they are copied once per (device, dtype)."""
    image_ops._constant.cache_clear()
    g = torch.Generator().manual_seed(0)
    img = disc_images(2)
    for _ in range(3):
        _augment_rows(img, 3, g)  # hue/saturation: two colour matrices
        _augment_rows(img, 2, g)  # sharpness: one kernel
    info = image_ops._constant.cache_info()
    assert (info.misses, info.hits) == (3, 6)
    _augment_rows(img.double(), 2, g)  # another dtype is another copy
    assert image_ops._constant.cache_info().misses == 4


def test_generation_ignores_autocast():
    """bf16-mixed training runs the step under autocast; the material stays in the images' dtype."""
    images = disc_images(4)
    plain = AnomalyGenerator(seed=0).generate(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = AnomalyGenerator(seed=0).generate(images)
    for k in plain:
        assert mixed[k].dtype == plain[k].dtype and torch.equal(mixed[k], plain[k]), k


def test_random_crops_turn_the_foreground_cache_off():
    module = TransFusion(
        NET, {"kind": "object", "seed": 0}, {"_target_": "torch.optim.AdamW", "_partial_": True}
    )
    _fit(module, _Images(4, crop=16), steps=1)
    assert module.anomaly_generator.cache_foreground is False


def test_batched_augmentations_equal_torchvision_per_image():
    x = torch.rand(5, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    x[1] = 0.5  # a flat image: autocontrast leaves it
    factors = torch.tensor([0.0, 0.5, 1.0, 1.7, 2.0])
    sharp = _sharpness(x, factors.view(-1, 1, 1, 1))
    for i, f in enumerate(factors.tolist()):
        torch.testing.assert_close(sharp[i].clamp(0, 1), TF.adjust_sharpness(x[i].clone(), f))
    auto = _autocontrast(x)
    for i in range(len(x)):
        torch.testing.assert_close(auto[i], TF.autocontrast(x[i]))
    # every operation keeps shape and range and gives each image its own parameters
    g = torch.Generator().manual_seed(1)
    same = x[:1].expand(4, -1, -1, -1).contiguous()
    for op in range(10):
        out = _augment_rows(same, op, g).clamp(0, 1)
        assert out.shape == same.shape and out.min() >= 0 and out.max() <= 1
        if op not in (6, 7, 8):  # the parameter-free ones (invert, autocontrast, equalize)
            spread = (out - out[:1]).abs().flatten(1).amax(1)
            assert spread[1:].max() > 0, op  # rows differ (own draws); solarize may skip some rows


def test_posterize_keeps_the_top_bits():
    x = torch.linspace(0, 1, 256).view(1, 1, 16, 16).expand(8, 3, 16, 16).contiguous()
    g = torch.Generator().manual_seed(0)
    out = _augment_rows(x, 5, g)
    u8 = (out * 255).round().to(torch.uint8)
    for i in range(len(x)):
        levels = len(u8[i].unique())
        assert levels == 2 ** round(math.log2(levels))  # 2**bits levels of the 256 grey values
        torch.testing.assert_close(
            u8[i], TF.posterize((x[i] * 255).round().to(torch.uint8), int(math.log2(levels)))
        )


def test_groupnorm_is_nn_groupnorm_without_autocast():
    """The float32 and float64 paths (the official-equality tests run in float64) are untouched."""
    torch.manual_seed(0)
    ours, ref = GroupNorm(4, 8), torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(ours.weight)
    torch.nn.init.normal_(ours.bias)
    ref.load_state_dict(ours.state_dict())
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 8, 5, 5, dtype=dtype)
        assert torch.equal(ours.to(dtype)(x), ref.to(dtype)(x))
    # and on the meta device, where the benchmarks count FLOPs (no autocast exists there)
    with torch.device("meta"):
        assert GroupNorm(4, 8)(torch.empty(2, 8, 5, 5)).shape == (2, 8, 5, 5)


def test_groupnorm_stays_in_bf16_under_autocast():
    """Under autocast the output is in the autocast dtype, within bf16 rounding of float32, and the float32
    weights still get float32 gradients close to float32 training's."""
    torch.manual_seed(0)
    norm = GroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 8, 6, 6)
    ref = norm(x)
    ref.square().sum().backward()
    grad = norm.weight.grad.clone()
    norm.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)
    out.float().square().sum().backward()
    assert norm.weight.grad.dtype == torch.float32
    torch.testing.assert_close(norm.weight.grad, grad, atol=0.5, rtol=0.05)


class _Upcasts(TorchDispatchMode):
    """Counts bf16 -> float32 casts: what CUDA autocast inserts before every `group_norm`."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ == "_to_copy" and args[0].dtype == torch.bfloat16:
            self.count += out.dtype == torch.float32
        return out


def _fused_attention(q, k, v, *args, **kwargs):
    """Attention as one kernel, as on a GPU (fake CUDA tensors otherwise take the math path, which upcasts)."""
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0]


def _cuda_autocast_upcasts() -> int:
    """Upcasts in one forward of the small network under CUDA's bf16 autocast rules, on fake CUDA tensors
    (no GPU needed: autocast's CUDA kernel runs on the dispatch keys, fake tensors carry them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    was = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.autocast("cuda", enabled=False) warns without a GPU
        net = TransFusionModel(**NET).net
        x, mask, t = torch.rand(2, 3, 32, 32), torch.zeros(2, 1, 32, 32), torch.ones(2, dtype=torch.long)
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        try:
            with _Upcasts() as upcasts:
                net(x, mask, t)
        finally:
            torch.set_autocast_enabled("cuda", was[0])
            torch.set_autocast_dtype("cuda", was[1])
    return upcasts.count


def test_network_never_upcasts_activations_under_cuda_autocast(monkeypatch):
    """CUDA autocast runs group_norm in float32; those casts moved more bytes than the published network's
    convolutions. The network's GroupNorm keeps bf16 instead."""
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _fused_attention)
    assert _cuda_autocast_upcasts() == 0
    # the check sees CUDA's rule: with plain nn.GroupNorm, one upcast per norm
    monkeypatch.setattr(GroupNorm, "forward", torch.nn.GroupNorm.forward)
    norms = sum(isinstance(m, GroupNorm) for m in TransFusionModel(**NET).modules())
    assert norms > 0 and _cuda_autocast_upcasts() == norms


class _ReadBacks(TorchFunctionMode):
    """Python-level reads of a tensor's value (`item`, `tolist`, `bool`, `numpy`, ...) with the training batch
    they fell in: on a GPU each one waits for the device. AdamW's included: fused (the default), its step
    counters live with the parameters (foreach read one from the host per parameter tensor each step)."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}

    def __init__(self, window: dict) -> None:
        super().__init__()
        self.window, self.reads = window, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            frames = traceback.extract_stack()[:-1]
            caller = next(
                f for f in reversed(frames) if "torch/" not in f.filename.split("site-packages/")[-1]
            )
            self.reads.append(
                (self.window.get("at"), f"{func.__name__} at {caller.filename}:{caller.lineno}")
            )
        return func(*args, **(kwargs or {}))


def test_real_teacher_loop_reads_back_only_at_epoch_ends(tmp_path, monkeypatch):
    """The teacher's real training, as the command runs it (progress bar, CSV logger logging every step, the
    resume checkpoint, the DataLoader): between the start of one batch and the next within an epoch, nothing
    reads a value back, Lightning's hooks, the training step and AdamW included (Lightning runs the step inside
    `optimizer.step(closure)`: an earlier version that skipped reads under torch/optim skipped the step too).
    Epoch 0 fills the foreground cache (SciPy, once per image), so every epoch sees all its images."""
    from mvtec_seg.builders import build_datamodule
    from mvtec_seg.teacher import ensure_teacher

    cfg = compose_cfg(
        tmp_path,
        [
            "mask=pseudo",
            "data.image_size=32",
            "teacher.batch_size=10",
            "teacher.trainer.max_epochs=3",
            "teacher.params.net.num_steps=3",
            "trainer.enable_progress_bar=true",
            "trainer.log_every_n_steps=1",
        ],
    )
    dm = build_datamodule(cfg)
    dm.prepare()
    window: dict = {}

    def mark(self, batch, batch_idx):
        window["at"] = (self.current_epoch, batch_idx)

    monkeypatch.setattr(TransFusion, "on_train_batch_start", mark, raising=False)
    with _ReadBacks(window) as reads:
        ensure_teacher(cfg, dm)
    batches = math.ceil(len(dm.indices("train", known_normal=True)) / 10)  # the teacher's images: train/good
    assert batches >= 3
    last = batches - 1
    assert window["at"] == (2, last)  # three epochs of the known normal train images ran
    inside = [r for at, r in reads.reads if at is not None and at[0] > 0 and at[1] < last]
    assert inside == []
    # the check sees reads: the foreground cache filling in epoch 0 (SciPy's hole filling), and the
    # non-finite-loss check reading its flag once an epoch, in the last batch's window
    assert sum("anomalies.py" in r for at, r in reads.reads if at and at[0] == 0) == 2 * batches  # cpu, numpy
    assert sum("lightning_model.py" in r for at, r in reads.reads if at and at[1] == last) == 3
