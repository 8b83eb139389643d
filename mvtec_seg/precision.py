"""The training precision a CPU run takes by default: ``bf16-mixed`` where the CPU computes bfloat16 natively
(AVX-512 BF16 or AMX), ``32-true`` elsewhere.

Without native bf16, oneDNN emulates it and a bf16 training step is an order of magnitude slower than float32
(`benchmarks/RESULTS.md`, Speed), so the choice is the CPU's, read once per process. `trainer/cpu.yaml` asks
for it through the ``${cpu_precision:}`` resolver, so the resolved config (and with it a run's identity and the
teacher's cache key) records the precision actually used; ``trainer.precision=...`` overrides it.
"""

from __future__ import annotations

import functools
import os

from omegaconf import OmegaConf

NATIVE_BF16_ENV = "MVTEC_SEG_NATIVE_BF16"
"""``1`` or ``0`` overrides the CPU check (a CPU the check misreads; the test suite pins ``0`` so its runs are
the same on every machine)."""


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AVX-512 BF16 or AMX tiles), as torch's kernels see it."""
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def cpu_precision() -> str:
    """``bf16-mixed`` on a CPU with native bf16, else ``32-true`` (Lightning's precision names)."""
    return "bf16-mixed" if native_bf16() else "32-true"


def register_resolvers() -> None:
    """``${cpu_precision:}`` for the configs (idempotent)."""
    if not OmegaConf.has_resolver("cpu_precision"):
        OmegaConf.register_new_resolver("cpu_precision", cpu_precision)
