"""The CPU's default precision: bf16-mixed where bf16 is native, float32 elsewhere; overrides win; the plan
line says which one a run uses."""

from __future__ import annotations

import pytest
from conftest import compose_cfg

from mvtec_seg import precision
from mvtec_seg.plan import plan_lines


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set what the CPU check answers (through its environment override) for one test."""

    def set_native(native: bool) -> None:
        monkeypatch.setenv(precision.NATIVE_BF16_ENV, "1" if native else "0")
        precision.native_bf16.cache_clear()

    yield set_native
    precision.native_bf16.cache_clear()


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
def test_cpu_default_follows_native_bf16(tmp_path, cpu_bf16, native, expected):
    cpu_bf16(native)
    cfg = compose_cfg(tmp_path, ["model=transfusion"])
    assert cfg.trainer.precision == expected
    assert cfg.teacher.trainer.precision == expected  # the teacher trains as the run does


def test_an_explicit_precision_wins(tmp_path, cpu_bf16):
    cpu_bf16(True)
    assert compose_cfg(tmp_path, ["trainer.precision=32-true"]).trainer.precision == "32-true"
    cpu_bf16(False)
    assert compose_cfg(tmp_path, ["trainer.precision=bf16-mixed"]).trainer.precision == "bf16-mixed"
    assert compose_cfg(tmp_path, ["trainer=gpu"]).trainer.precision == "bf16-mixed"  # not the CPU's choice


def test_the_check_reads_the_cpu_when_not_overridden(monkeypatch):
    import torch

    monkeypatch.delenv(precision.NATIVE_BF16_ENV, raising=False)
    precision.native_bf16.cache_clear()
    try:
        expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        assert precision.native_bf16() is bool(expected)
    finally:
        precision.native_bf16.cache_clear()


class _Data:
    """The part of a DataModule the plan reads: part sizes, the train images a fit sees, the manifest."""

    manifest = {"samples": []}

    def counts(self) -> dict[str, int]:
        return {"train": 7, "val": 1, "test": 2}

    def dataset(self, part: str, known_normal: bool = False) -> list:
        return [None] * self.counts()[part]


@pytest.mark.parametrize(
    ("native", "phrase"),
    [
        (True, "precision bf16-mixed (CPU with native bf16)"),
        (False, "precision 32-true (CPU without native bf16)"),
    ],
)
def test_plan_line_names_the_precision(tmp_path, cpu_bf16, native, phrase):
    cpu_bf16(native)
    first = plan_lines(compose_cfg(tmp_path, ["model=unet", "mask=gt"]), _Data())[0]
    assert first.endswith(phrase), first
    gpu = plan_lines(compose_cfg(tmp_path, ["model=unet", "mask=gt", "trainer=gpu"]), _Data())[0]
    assert gpu.endswith(", precision bf16-mixed"), gpu


@pytest.mark.parametrize(
    ("model", "setting"),
    [("unet", "model.params.channels_last=true"), ("transfusion", "+teacher.params.channels_last=true")],
)
def test_channels_last_keeps_the_values(tmp_path, model, setting):
    """NHWC weights give the same maps as NCHW (up to rounding); a checkpoint of one layout loads into the
    other."""
    import torch

    from mvtec_seg.builders import build_model
    from mvtec_seg.teacher import build_teacher

    build = build_teacher if model == "transfusion" else build_model
    base = [f"model={model}", "data.image_size=32"]
    plain = build(compose_cfg(tmp_path, base))
    nhwc = build(compose_cfg(tmp_path, [*base, setting]))
    nhwc.load_state_dict(plain.state_dict())
    convs = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not any(
        m.weight.is_contiguous(memory_format=torch.channels_last)
        for m in plain.modules()
        if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1
    )
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain.eval()
    nhwc.eval()
    torch.testing.assert_close(nhwc.anomaly_map(images), plain.anomaly_map(images), atol=1e-4, rtol=1e-4)
    plain.load_state_dict(nhwc.state_dict())  # and back
