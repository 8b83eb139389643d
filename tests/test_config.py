"""Every config group composes, and the composed values are what the user asked for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, compose_cfg
from omegaconf import OmegaConf, open_dict

from mvtec_seg.data.layouts import CATEGORIES as DATASET_CATEGORIES

CATEGORIES = sorted(p.stem for p in (Path(CONF_DIR) / "category").glob("*.yaml"))
MVTEC_CATEGORIES = DATASET_CATEGORIES["mvtec"]
# MVTec AD's texture categories (anomalies anywhere, no foreground), as the official TransFusion code lists them
MVTEC_TEXTURES = {"carpet", "grid", "leather", "tile", "wood", "zipper"}


def test_every_mvtec_category_has_a_config():
    """The category files are the one list of names: MVTec AD's 15, and the built-in ones beside them."""
    assert len(MVTEC_CATEGORIES) == 15 and set(MVTEC_CATEGORIES) >= MVTEC_TEXTURES
    assert set(MVTEC_CATEGORIES) | {"synthetic", "synthetic_texture", "custom"} == set(CATEGORIES)
    assert (len(DATASET_CATEGORIES["visa"]), len(DATASET_CATEGORIES["mvtec_ad2"])) == (12, 8)


@pytest.mark.parametrize("model", ["unet", "deeplab", "transfusion"])
@pytest.mark.parametrize("mask", ["gt", "pseudo"])
def test_model_mask_grid_composes(tmp_path, model, mask):
    cfg = compose_cfg(tmp_path, [f"model={model}", f"mask={mask}"])
    OmegaConf.resolve(cfg)
    assert cfg.model.name == model and cfg.mask.name == mask
    assert cfg.task_name == f"{model}_{mask}_synthetic"
    if model != "transfusion":
        assert cfg.model.params.net.encoder_weights is None  # nothing downloads by default
        assert cfg.model.params.optimizer.lr == pytest.approx(1e-4)
    if model == "unet":
        assert cfg.model.params.net.encoder_name == "resnet18" and cfg.model.params.loss.dice_weight > 0
    if model == "deeplab":
        assert cfg.model.params.net.encoder_name == "resnet50" and cfg.model.params.loss.dice_weight == 0


@pytest.mark.parametrize("category", [c for c in CATEGORIES if c != "custom"])
def test_category_configs(tmp_path, category):
    cfg = compose_cfg(tmp_path, [f"category={category}"])
    assert cfg.category.name == category
    if category in MVTEC_CATEGORIES:
        assert cfg.category.kind == ("texture" if category in MVTEC_TEXTURES else "object")
        assert cfg.category.generate is None
    else:
        assert cfg.category.generate.kind == cfg.category.kind


def test_custom_category_needs_a_name(tmp_path):
    cfg = compose_cfg(tmp_path, ["category=custom", "category.name=my_product"])
    assert cfg.task_name == "unet_gt_my_product"


@pytest.mark.parametrize(
    "group",
    [
        "trainer=cpu",
        "trainer=gpu",
        "trainer=ddp",
        "trainer=ddp_cpu",
        "logger=csv",
        "logger=wandb",
        "debug=fast",
        "experiment=transfusion_paper",
        "experiment=unet_fast_cpu",
    ],
)
def test_other_groups_compose(tmp_path, group):
    cfg = compose_cfg(tmp_path, [group])
    OmegaConf.resolve(cfg)
    if group == "logger=wandb":
        assert cfg.logger.wandb.mode == "offline"
    if group == "trainer=gpu":
        assert cfg.trainer.precision == "bf16-mixed"
    if group == "experiment=unet_fast_cpu":
        assert cfg.model.params.scheduler.T_max == cfg.model.max_epochs == 40 and cfg.data.train_crop == 128
        assert cfg.model.params.optimizer.lr == pytest.approx(1e-3)
        assert cfg.model.params.scheduler._target_.endswith("CosineAnnealingLR")
    if group == "experiment=transfusion_paper":
        assert cfg.model.name == "transfusion" and cfg.teacher.trainer.max_epochs == 1500
        assert (
            cfg.teacher.params.optimizer.lr == pytest.approx(1e-5)
            and cfg.teacher.params.scheduler.step_size == 800
        )
        assert cfg.teacher.params.optimizer._target_ == "torch.optim.AdamW"
        assert cfg.data.eval_batch_size == 32  # the maps stage's batch on a GPU
    if group == "debug=fast":
        assert cfg.trainer.max_epochs == 1 and cfg.trainer.limit_train_batches == 2


def test_optimizer_and_scheduler_come_from_the_config(cfg_fast):
    """Optimizers and schedulers are Hydra `_target_`s: another one is a config override, not code."""
    from mvtec_seg.builders import build_model

    opt = build_model(cfg_fast).configure_optimizers()
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["fused"]  # the default, fused
    with open_dict(cfg_fast):
        cfg_fast.model.params.optimizer = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01}
        cfg_fast.model.params.scheduler = {
            "_target_": "torch.optim.lr_scheduler.StepLR",
            "_partial_": True,
            "step_size": 3,
            "interval": "step",
        }
    out = build_model(cfg_fast).configure_optimizers()
    assert isinstance(out["optimizer"], torch.optim.SGD)
    assert out["optimizer"].param_groups[0]["lr"] == pytest.approx(0.01)
    assert out["lr_scheduler"]["interval"] == "step" and out["lr_scheduler"]["scheduler"].step_size == 3


@pytest.mark.parametrize(
    ("overrides", "cuda", "pinned"),
    [
        (["trainer=cpu"], True, False),
        (["trainer=gpu"], False, True),  # decided by the configured accelerator, not by this machine
        (["trainer=ddp"], False, True),
        (["trainer.accelerator=auto"], True, True),
        (["trainer.accelerator=auto"], False, False),
        (["trainer=gpu", "data.pin_memory=false"], True, False),
        (["trainer=cpu", "data.pin_memory=true"], False, True),
    ],
)
def test_pin_memory_auto_pins_batches_for_gpu_training(tmp_path, monkeypatch, overrides, cuda, pinned):
    from mvtec_seg.builders import pin_memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = compose_cfg(tmp_path, overrides)
    assert cfg.data.pin_memory in ("auto", True, False)
    assert pin_memory(cfg) is pinned


def test_pin_memory_rejects_other_values(tmp_path):
    from mvtec_seg.builders import pin_memory
    from mvtec_seg.errors import UserError

    with pytest.raises(UserError, match="data.pin_memory='yes' must be auto, true or false"):
        pin_memory(compose_cfg(tmp_path, ["data.pin_memory=yes"]))


def test_adam_and_adamw_are_fused_unless_the_config_chooses(cfg_fast):
    """One fused kernel instead of a loop over the parameters, unless `fused`/`foreach` is configured,
    the parameters are on a device without the fused kernel, or 16-mixed gradients are clipped (Lightning
    refuses clipping with an optimizer that unscales itself)."""
    from types import SimpleNamespace

    from mvtec_seg.builders import build_model
    from mvtec_seg.models.base import with_fused_default

    cpu = [torch.nn.Parameter(torch.zeros(3))]
    adamw = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3}
    assert with_fused_default(adamw, cpu) == {**adamw, "fused": True}
    for chosen in ({"fused": False}, {"foreach": True}, {"foreach": None}):
        assert with_fused_default({**adamw, **chosen}, cpu) == {**adamw, **chosen}
    sgd = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}
    assert with_fused_default(sgd, cpu) == sgd
    assert with_fused_default(adamw, [torch.nn.Parameter(torch.zeros(3, device="meta"))]) == adamw

    module = build_model(cfg_fast)
    module._trainer = SimpleNamespace(gradient_clip_val=1.0, precision="16-mixed")
    assert not module.configure_optimizers().defaults["fused"]
    module._trainer = SimpleNamespace(gradient_clip_val=1.0, precision="bf16-mixed")
    assert module.configure_optimizers().defaults["fused"]


# --- each setting declared once ----------------------------------------------------------------------------


def test_every_rule_shows_a_default_or_example_that_passes_its_own_check():
    """A refusal's example is the composed default (or the rule's own form where the default is not one):
    it exists and is accepted, so the table cannot drift from the YAML."""
    from mvtec_seg.settings.rules import RULES, defaults, example

    flat = defaults()
    for rule in RULES:
        check, _ = rule.spec
        if rule.example is None:
            assert rule.key in flat, f"{rule.key} is in no composed default config"
            assert check(flat[rule.key]), f"{rule.key}: the default {flat[rule.key]!r} fails its own rule"
            assert example(rule).startswith(f"{rule.key}=")
    by_key = {r.key: r for r in RULES}
    assert (
        example(by_key["mask.gate.quantile"])
        == f"mask.gate.quantile={flat['mask.gate.quantile']} (the default)"
    )


def test_a_refusal_names_the_default(tmp_path):
    from mvtec_seg.errors import UserError
    from mvtec_seg.preflight import check_config

    with pytest.raises(
        UserError, match=r"mask.gate.quantile=1.5 must be .* e.g. mask.gate.quantile=0.99 \(the default\)"
    ):
        check_config(compose_cfg(tmp_path, ["mask=pseudo", "mask.gate.quantile=1.5"]))


def test_monitors_are_the_metrics_a_run_logs(tmp_path):
    """`val/synthetic_*` is what a PSEUDO run logs on its synthetic validation set: accepted there, refused
    where no such set is built (mask=gt, synthetic_val auto), and a name no run logs is refused."""
    from mvtec_seg.errors import UserError
    from mvtec_seg.metrics import MONITORS
    from mvtec_seg.preflight import check_config

    assert "val/synthetic_pixel_AUPRO" in MONITORS and "val/pixel_AP" in MONITORS
    settings = check_config(compose_cfg(tmp_path, ["mask=pseudo", "mask.monitor=val/synthetic_pixel_AUPRO"]))
    assert settings["checkpoint.monitor"] == "val/synthetic_pixel_AUPRO"
    with pytest.raises(UserError, match="needs the synthetic validation set"):
        check_config(compose_cfg(tmp_path, ["checkpoint.monitor=val/synthetic_pixel_AUPRO"]))
    with pytest.raises(UserError, match="mask.monitor='val/pixel_APP' must be one of"):
        check_config(compose_cfg(tmp_path, ["mask=pseudo", "mask.monitor=val/pixel_APP"]))


@pytest.mark.parametrize(
    ("override", "registry"),
    [
        ("mask.gate.strategy=median", "mvtec_seg.pseudo.rules:GATES"),
        ("mask.gated=drop", "mvtec_seg.pseudo.rules:GATED"),
        ("mask.select=best", "mvtec_seg.pseudo.select:MODES"),
        ("teacher.params.net.reverse=half", "mvtec_seg.models.transfusion.torch_model:REVERSE_MODES"),
    ],
)
def test_choices_come_from_the_code_that_implements_them(tmp_path, override, registry):
    import importlib

    from mvtec_seg.errors import UserError
    from mvtec_seg.preflight import check_config

    module, name = registry.split(":")
    choices = list(getattr(importlib.import_module(module), name))
    with pytest.raises(UserError, match=re.escape(f"is not one of {choices}")):
        check_config(compose_cfg(tmp_path, ["mask=pseudo", override]))
