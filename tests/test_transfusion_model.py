"""TransFusion: forward process, network, loss, batched inference and synthetic anomalies (tiny CPU models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg
from omegaconf import OmegaConf
from PIL import Image
from references import transfusion_one_by_one

from mvtec_seg.models.base import parameter_count
from mvtec_seg.models.transfusion import (
    AnomalyGenerator,
    TransFusionLoss,
    TransFusionModel,
    estimate_foreground,
    perlin_noise,
)
from mvtec_seg.models.transfusion.torch_model import box_filter, reverse_step

TINY = {"base_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1, "num_steps": 6, "image_size": 32}


def tiny_model(seed: int = 0, **overrides) -> TransFusionModel:
    torch.manual_seed(seed)
    return TransFusionModel(**{**TINY, **overrides})


def object_images(b: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Dark discs on a light, slightly noisy background: an 'object category' with a known foreground."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).float()
    img = 0.85 + 0.02 * torch.rand(b, 3, size, size, generator=g)
    colour = 0.1 + 0.3 * torch.rand(b, 3, 1, 1, generator=g)
    return img * (1 - disc) + (colour + 0.05 * torch.rand(b, 3, size, size, generator=g)) * disc


# -- forward process and network -----------------------------------------------------------------------------
def test_q_sample_endpoints_and_schedule():
    model = tiny_model(num_steps=20)
    assert model.betas[0] == 0 and model.betas[-1] == 1 and len(model.betas) == 20
    x0, e = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    torch.testing.assert_close(model.q_sample(x0, mask, e, torch.tensor([0, 0])), x0)
    xt = model.q_sample(x0, mask, e, torch.tensor([19, 19]))
    torch.testing.assert_close(xt, mask * e + (1 - mask) * x0)
    mid = model.q_sample(x0, mask, e, torch.tensor([10, 10]))
    beta = 10 / 19
    torch.testing.assert_close(mid, (1 - mask) * x0 + mask * ((1 - beta) * x0 + beta * e))
    # one exact reverse step with the true quantities recovers x_{t-1}
    t = torch.tensor([10, 10])
    prev = reverse_step(mid, x0, mask, model.beta(t, x0) * e, model.beta(t, x0), model.beta(t - 1, x0))
    torch.testing.assert_close(prev, model.q_sample(x0, mask, e, t - 1))


def test_buffers_follow_to_and_dtype():
    model = tiny_model()
    assert "betas" in dict(model.named_buffers())
    model = model.double()
    assert model.betas.dtype == torch.float64
    meta = tiny_model().to("meta")
    assert meta.betas.device.type == "meta"


def test_shapes_training_and_inference():
    model = tiny_model()
    b = 3
    gen = AnomalyGenerator(object_category=False, seed=0)
    batch = gen.generate(torch.rand(b, 3, 32, 32))
    t = model.sample_timesteps(b, "cpu")
    assert t.min() >= 1 and t.max() <= model.num_steps - 1
    out = model.training_forward(batch["x0"], batch["mask"], batch["appearance"], batch["prev_mask"], t)
    assert out["noise"].shape == (b, 3, 32, 32) and out["mean"].shape == (b, 3, 32, 32)
    assert out["mask_logits"].shape == (b, 1, 32, 32)
    # outside the anomaly mask the scaled appearance target is exactly zero
    assert (out["target_noise"] * (1 - out["mask"])).abs().max() == 0
    model.eval()
    pred = model(torch.rand(b, 3, 32, 32))
    assert pred["anomaly_map"].shape == (b, 32, 32) and pred["pred_score"].shape == (b,)
    torch.testing.assert_close(pred["pred_score"], pred["anomaly_map"].flatten(1).amax(1))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.rand(1, 3, 31, 31))


def test_first_step_sees_an_empty_previous_mask():
    model = tiny_model().eval()
    x0, mask, e = torch.rand(2, 3, 32, 32), torch.ones(2, 1, 32, 32), torch.rand(2, 3, 32, 32)
    t = torch.full((2,), model.num_steps - 1)
    a = model.training_forward(x0, mask, e, torch.ones(2, 1, 32, 32), t)
    b = model.training_forward(x0, mask, e, torch.zeros(2, 1, 32, 32), t)
    torch.testing.assert_close(a["mask_logits"], b["mask_logits"])


def test_paper_configuration_parameter_count(tmp_path):
    """`experiment=transfusion_paper` builds the published network: 54.56 M parameters."""
    cfg = compose_cfg(tmp_path, ["experiment=transfusion_paper"])
    with torch.device("meta"):
        model = TransFusionModel(**OmegaConf.to_container(cfg.teacher.params.net, resolve=True))
    n = parameter_count(model)
    assert abs(n / 54.56e6 - 1) < 0.005, n


def test_loss_terms_and_decrease():
    torch.manual_seed(0)
    model = tiny_model(seed=0).train()
    loss_fn = TransFusionLoss()
    batch = AnomalyGenerator(object_category=False, seed=0).generate(object_images(4, 32))
    t = torch.tensor([2, 3, 4, 5])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        out = model.training_forward(batch["x0"], batch["mask"], batch["appearance"], batch["prev_mask"], t)
        terms = loss_fn(out)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
    expected = {
        "loss",
        "mask",
        "mask_focal",
        "mask_smooth_l1",
        "anomaly",
        "normal",
        "normal_ssim",
        "normal_l1",
        "step",
    }
    assert expected <= set(terms)
    sum_of_groups = terms["mask"] + terms["anomaly"] + terms["normal"] + terms["step"]
    torch.testing.assert_close(terms["loss"], sum_of_groups)
    torch.testing.assert_close(terms["mask"], 5 * terms["mask_focal"] + terms["mask_smooth_l1"])
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses


# -- inference ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reverse", ["official", "all_steps"])
def test_batched_equals_sequential_float64(reverse):
    model = tiny_model(seed=1, num_steps=5, reverse=reverse).double().eval()
    # non-trivial BatchNorm statistics so eval-mode normalisation is exercised too
    bn = model.net.mask_head[0]
    bn.running_mean.uniform_(-0.1, 0.1)
    bn.running_var.uniform_(0.5, 1.5)
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    batched = model(images)
    sequential = transfusion_one_by_one(model, images)
    assert batched["anomaly_map"].dtype == torch.float64
    torch.testing.assert_close(batched["anomaly_map"], sequential, rtol=0, atol=1e-8)
    torch.testing.assert_close(batched["pred_score"], sequential.flatten(1).amax(1), rtol=0, atol=1e-8)
    # the thresholded mask really switched somewhere, so the comparison covers the image update
    mean_mask, final = model.reverse_process(images)
    assert (final - (images * 2 - 1)).abs().max() > 0
    assert mean_mask.min() > 0 and mean_mask.max() < 1


@pytest.mark.parametrize(("reverse", "steps"), [("official", [4, 3, 2, 1]), ("all_steps", [5, 4, 3, 2, 1])])
def test_reverse_process_steps(reverse, steps):
    """Official: t = T-2 .. 1 (t = T-1 never evaluated), the sum of the masks divided by T-1 in both modes."""
    model = tiny_model(seed=2, num_steps=6, reverse=reverse).double().eval()
    seen: list[int] = []
    model.net.register_forward_pre_hook(lambda _m, args: seen.append(int(args[2][0])))
    torch.nn.init.constant_(model.net.mask_head[2].weight, 0.0)
    torch.nn.init.constant_(model.net.mask_head[2].bias, 50.0)  # every probability ~1
    mean_mask, _ = model.reverse_process(torch.rand(1, 3, 32, 32, dtype=torch.float64))
    assert seen == steps
    torch.testing.assert_close(mean_mask, torch.full_like(mean_mask, len(steps) / 5))
    with pytest.raises(ValueError, match="reverse"):
        tiny_model(reverse="paper")


def test_box_filter_matches_average_pooling():
    x = torch.rand(2, 16, 16, dtype=torch.float64)
    ref = torch.nn.functional.avg_pool2d(x[:, None], 7, stride=1, padding=3, count_include_pad=True)[:, 0]
    torch.testing.assert_close(box_filter(x, 7), ref)


def test_autocast_bfloat16_cpu():
    model = tiny_model()
    batch = AnomalyGenerator(object_category=False, seed=0).generate(torch.rand(2, 3, 32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.training_forward(
            batch["x0"], batch["mask"], batch["appearance"], batch["prev_mask"], torch.tensor([1, 5])
        )
        terms = TransFusionLoss()(out)
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(torch.rand(2, 3, 32, 32))
    assert pred["anomaly_map"].shape == (2, 32, 32)
    assert torch.isfinite(pred["anomaly_map"].float()).all()


# -- synthetic anomalies -------------------------------------------------------------------------------------------
def test_perlin_noise_shapes_and_range():
    g = torch.Generator().manual_seed(0)
    n = perlin_noise(40, 24, torch.tensor([1, 4, 32]), torch.tensor([2, 8, 16]), g)
    assert n.shape == (3, 40, 24)
    assert n.abs().max() <= 1.5 and n.std() > 0.05


def test_perlin_masks_binary_nonempty_inside_foreground():
    images = object_images(6, 64)
    gen = AnomalyGenerator(object_category=True, seed=3)
    fg_rule = estimate_foreground(images)
    # the disc is found, the corners are background
    assert fg_rule[:, 0, 32, 32].all() and not fg_rule[:, 0, 0, 0].any()
    before = images.clone()
    for _ in range(3):
        out = gen.generate(images)
        mask, prev, fg = out["mask"], out["prev_mask"], out["foreground"]
        assert torch.equal(images, before)
        assert out["has_anomaly"].tolist() == [True] * 3 + [False] * 3
        for m in (mask, prev):
            assert set(m.unique().tolist()) <= {0.0, 1.0}
            assert (m * (1 - fg)).sum() == 0
        assert (mask[:3].flatten(1).sum(1) > 0).all()
        assert mask[3:].sum() == 0 and prev[3:].sum() == 0
        assert out["x0"].shape == images.shape and out["appearance"].shape == images.shape
        assert out["appearance"].min() >= 0 and out["appearance"].max() <= 1


def test_texture_categories_use_the_whole_image_and_supplied_foreground_wins():
    images = object_images(2, 32)
    out = AnomalyGenerator(object_category=False, seed=0, rotation_probability=0).generate(images)
    assert out["foreground"].min() == 1
    fg = torch.zeros(2, 1, 32, 32)
    fg[..., 8:24, 8:24] = 1
    out = AnomalyGenerator(seed=0, rotation_probability=0).generate(images, foreground=fg)
    assert (out["mask"] * (1 - fg)).sum() == 0 and out["mask"][0].sum() > 0
    # a tiny foreground still gets a (tiny) anomaly; an empty one falls back to the whole image
    fg = torch.zeros(2, 1, 32, 32)
    fg[0, :, 5:7, 9:11] = 1
    out = AnomalyGenerator(seed=0, rotation_probability=0).generate(images, foreground=fg)
    assert 0 < out["mask"][0].sum() <= 4 and (out["mask"] * (1 - fg)).sum() == 0
    out = AnomalyGenerator(seed=0, rotation_probability=0).generate(images[:1], foreground=fg[1:])
    assert out["foreground"].min() == 1 and out["mask"].sum() > 0


def test_foreground_dir_masks(tmp_path: Path):
    masks = tmp_path / "fg" / "train" / "good"
    masks.mkdir(parents=True)
    m = np.zeros((64, 64), dtype=np.uint8)
    m[:32] = 255
    Image.fromarray(m).save(masks / "000.png")
    gen = AnomalyGenerator(foreground_dir=tmp_path / "fg", seed=0, rotation_probability=0)
    out = gen.generate(object_images(1, 32), paths=["train/good/000.png"])
    # top half foreground (rows 0..15 at 32 px), then dilated by the official 5 x 5 square: rows 0..17
    assert out["foreground"][0, 0, :18].min() == 1 and out["foreground"][0, 0, 18:].max() == 0
    assert (out["mask"] * (1 - out["foreground"])).sum() == 0
    with pytest.raises(ValueError, match="001"):
        gen.generate(object_images(1, 32), paths=["train/good/001.png"])


def test_seed_reproducible():
    images = object_images(4, 32)
    a = AnomalyGenerator(seed=7).generate(images)
    b = AnomalyGenerator(seed=7).generate(images)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_texture_dir_errors(tmp_path: Path):
    missing = tmp_path / "no_such_dtd"
    with pytest.raises(ValueError, match="no_such_dtd") as err:
        AnomalyGenerator(texture_dir=missing)
    assert "\n" not in str(err.value) and "null" in str(err.value)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images"):
        AnomalyGenerator(texture_dir=empty)
    with pytest.raises(ValueError, match="foreground_dir"):
        AnomalyGenerator(foreground_dir=tmp_path / "no_masks")


def test_texture_dir_images_are_used(tmp_path: Path):
    folder = tmp_path / "dtd" / "banded"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((20, 30, 3), (255, 0, 0), dtype=np.uint8)).save(folder / "red.jpg")
    gen = AnomalyGenerator(texture_dir=tmp_path / "dtd", seed=0)
    assert len(gen.texture_files) == 1
    tex = gen.textures(2, 16, 16, "cpu", torch.float32)
    assert tex.shape == (2, 3, 16, 16)
    assert tex[:, 0].min() > 0.9 and tex[:, 1:].max() < 0.1


def _texture_folder(root: Path, n: int) -> Path:
    """``n`` noise images of different sizes (lossless, so every decode gives the same pixels)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = 20 + 7 * i, 30 + 5 * i
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"t{i}.png")
    return root


def _count_decodes(monkeypatch) -> list[str]:
    from mvtec_seg.models.transfusion import anomalies

    opened: list[str] = []
    real_open = anomalies.Image.open

    def counting_open(path, *a, **kw):
        opened.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(anomalies.Image, "open", counting_open)
    return opened


def test_texture_cache_gives_the_same_material_and_decodes_each_file_once(tmp_path: Path, monkeypatch):
    """With texture_dir (the published recipe), every pick decoded a file on the loop's thread; cached,
    each file is decoded once and the material is bitwise what the uncached generator draws."""
    folder = _texture_folder(tmp_path, 5)
    opened = _count_decodes(monkeypatch)
    images = object_images(8, 32)
    kw = {"texture_dir": folder, "seed": 3, "texture_probability": 1.0}
    cached, uncached = AnomalyGenerator(**kw), AnomalyGenerator(**kw, texture_cache_mb=0)
    cached_opens = 0
    for _ in range(6):
        before = len(opened)
        a = cached.generate(images)
        cached_opens += len(opened) - before
        before = len(opened)
        b = uncached.generate(images)
        assert len(opened) > before  # uncached: the call's picks are decoded again
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert cached_opens == len(cached._textures) == 5  # the cached generator: each file decoded once
    assert cached._texture_bytes == 5 * 3 * 32 * 32 and uncached._texture_bytes == 0


def test_texture_cache_stays_within_its_budget(tmp_path: Path):
    folder = _texture_folder(tmp_path, 6)
    budget = 2 * 3 * 16 * 16  # bytes: two 16 x 16 textures
    gen = AnomalyGenerator(texture_dir=folder, seed=0, texture_cache_mb=budget / 2**20)
    ref = AnomalyGenerator(texture_dir=folder, seed=0, texture_cache_mb=0)
    for _ in range(5):
        assert torch.equal(
            gen.textures(4, 16, 16, "cpu", torch.float32), ref.textures(4, 16, 16, "cpu", torch.float32)
        )
    assert len(gen._textures) == 2 and gen._texture_bytes == budget
