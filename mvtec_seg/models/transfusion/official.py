"""The authors' checkpoints (``{category}_model.pkl`` of https://github.com/MaticFuc/ECCV_TransFusion).

The official files are a plain ``state_dict`` of their ``TransFusion`` wrapper (every key ``model.`` + the
key of their U-Net; ``Experiment.py:109``). Our `TransFusionUNet` is the same network under other names,
so loading is a key rename (`rename_official_keys`) plus reading the architecture off the tensor shapes
(`infer_official_net`): the file carries no configuration, and the released MVTec AD checkpoints use the
official defaults (64 channels, ``[1, 2, 2, 2]``, 2 blocks, attention at the two deepest levels).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

OFFICIAL_NORM_GROUPS = 32
"""GroupNorm groups of the official residual blocks (the output norm uses 8, as ours does)."""

NET_KEYS: tuple[str, ...] = (
    "base_channels",
    "channel_mult",
    "num_res_blocks",
    "attention_levels",
    "norm_groups",
)
"""The ``teacher.params.net`` settings an official checkpoint fixes (and that must agree with it)."""

_DROPPED = ("pos_emb.penc.inv_freq",)  # positional-encoding buffer (= [1.0]); ours computes sin(row) directly

# (pattern, replacement) applied in order to the key without its ``model.`` prefix
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^image_proj\.", "stem."),
    (r"^time_emb\.linear_1\.", "time_embed.fc1."),
    (r"^time_emb\.linear_2\.", "time_embed.fc2."),
    (r"^(down|up)\.(\d+)\.conv\.", r"\1.\2."),  # Downsample / Upsample wrap one conv
    (r"^middle\.res1\.", "mid1."),
    (r"^middle\.attn\.", "mid_attn."),
    (r"^middle\.res2\.", "mid2."),
    (r"\.time_emb\.", ".time_proj."),
    (r"\.shortcut\.", ".skip."),
    (r"\.attn\.projection\.", ".attn.qkv."),
    (r"^mid_attn\.projection\.", "mid_attn.qkv."),
    (r"\.attn\.output\.", ".attn.out."),
    (r"^mid_attn\.output\.", "mid_attn.out."),
    (r"^norm\.", "out_norm."),
    (r"^final\.", "noise_head."),
    (r"^final_mean\.", "mean_head."),
    (r"^final_seg\.norm\.", "mask_head.0."),
    (r"^final_seg\.conv\.", "mask_head.2."),
)


def is_official_state_dict(state: object) -> bool:
    """True for a plain dict of tensors in the official layout (``model.image_proj.weight`` present)."""
    return isinstance(state, Mapping) and "model.image_proj.weight" in state


def rename_official_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official key names -> `TransFusionUNet` key names (``model.`` prefix dropped, buffers we compute dropped)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix("model.")
        if name in _DROPPED:
            continue
        for pattern, repl in _RENAMES:
            name = re.sub(pattern, repl, name)
        out[name] = value
    return out


def infer_official_net(state: Mapping[str, Tensor]) -> dict:
    """Architecture of an official state_dict from its shapes: the `TransFusionUNet` settings in `NET_KEYS`.

    Down path: ``num_res_blocks`` residual levels per resolution, a strided conv between resolutions; a
    level's multiplier is its first block's out/in channels; attention where the level's blocks attend.
    """
    sd = {k.removeprefix("model."): v for k, v in state.items()}
    indices = sorted({int(m.group(1)) for k in sd if (m := re.match(r"down\.(\d+)\.", k))})
    levels: list[list[int]] = [[]]
    for i in indices:
        if f"down.{i}.conv.weight" in sd:
            levels.append([])
        else:
            levels[-1].append(i)
    blocks = {len(lv) for lv in levels}
    if len(blocks) != 1 or 0 in blocks:
        raise ValueError(f"unexpected down path in the official checkpoint: residual levels {levels}")
    mults, attention = [], []
    for n, lv in enumerate(levels):
        w = sd[f"down.{lv[0]}.res.conv1.weight"]
        out_ch, in_ch = int(w.shape[0]), int(w.shape[1])
        if out_ch % in_ch:
            raise ValueError(f"official checkpoint: level {n} goes from {in_ch} to {out_ch} channels")
        mults.append(out_ch // in_ch)
        if f"down.{lv[0]}.attn.projection.weight" in sd:
            attention.append(n)
    return {
        "base_channels": int(sd["image_proj.weight"].shape[0]),
        "channel_mult": mults,
        "num_res_blocks": blocks.pop(),
        "attention_levels": attention,
        "norm_groups": OFFICIAL_NORM_GROUPS,
    }


def normalise_net(net: Mapping) -> dict:
    """The `NET_KEYS` of a ``net`` config in the form `infer_official_net` returns (lists, resolved defaults)."""
    mults = [int(m) for m in net.get("channel_mult", (1, 2, 2, 2))]
    n = len(mults)
    attn = net.get("attention_levels")
    attn = range(max(0, n - 2), n) if attn is None else attn
    return {
        "base_channels": int(net.get("base_channels", 64)),
        "channel_mult": mults,
        "num_res_blocks": int(net.get("num_res_blocks", 2)),
        "attention_levels": sorted({int(i) % n for i in attn}),
        "norm_groups": int(net.get("norm_groups", 32)),
    }


def net_differences(configured: Mapping, inferred: Mapping) -> list[str]:
    """``["base_channels 16 (config) vs 64 (checkpoint)", ...]`` for every `NET_KEYS` entry that differs."""
    ours = normalise_net(configured)
    return [
        f"{k} {ours[k]} (config) vs {inferred[k]} (checkpoint)" for k in NET_KEYS if ours[k] != inferred[k]
    ]
