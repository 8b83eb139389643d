"""The GT-free validation set: synthetic defects with exact masks on the val part's known normal images
(`train/good`; every normal image with `mask.image_labels=true`).

Why: with `mask=pseudo` nothing may be scored against GT before the test, and the val part's pseudo masks
share the teacher's errors, so a student that copies the teacher looks best against them. Defects pasted
(`models.segmenter.synthetic.SyntheticDefects`) on normal images that no model trained on have exact masks:
a candidate (mask rules, a self-training round, a checkpoint) is scored by how well it finds them.

The set holds each val normal image once as it is (normal pixels, a normal image) and `per_image` times with
a defect. Its defects are filled with the images' own shuffled patches by default (`texture_probability`
0), while students trained with `mask.synthetic_fraction` see textures half the time, so the criterion does
not only reward having seen its own kind of defect. Built once per category, seed, size and setting, keyed by
the bytes of the images it reads, and kept in the cache (`images.npy`, `masks.npy`, `labels.npy`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mvtec_seg.data.files import files_key, write_record
from mvtec_seg.interrupt import stage
from mvtec_seg.io_utils import build_once, content_key
from mvtec_seg.models.base import loader_maps
from mvtec_seg.models.segmenter.synthetic import SyntheticDefects

log = logging.getLogger(__name__)
SEED_OFFSET = 7919  # the set's defects never repeat the training draws of the same seed


def settings(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.synthetic_val, resolve=True)


def synthetic_val_dir(cfg: DictConfig, dm) -> Path:
    record = dm.data_record(dm.indices("val", known_normal=True))
    key = content_key(
        {
            "files": files_key(record),
            "size": int(dm.image_size),
            "seed": int(cfg.seed),
            "kind": cfg.category.kind,
            "settings": settings(cfg),
        }
    )
    return Path(cfg.paths.cache_dir) / "synthetic_val" / cfg.category.name / key


@stage("synthetic validation set")
def ensure_synthetic_val(cfg: DictConfig, dm) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(images uint8 [M,H,W,3], masks uint8 [M,H,W], labels uint8 [M]) of the set, built once; None when
    the val part has no normal image."""
    idx = dm.indices("val", known_normal=True)
    if len(idx) == 0:
        log.warning("no normal image in the val part: no synthetic validation set")
        return None
    s = settings(cfg)
    folder = synthetic_val_dir(cfg, dm)

    def build(tmp: Path) -> None:
        defects = SyntheticDefects(
            kind=str(cfg.category.kind),
            seed=int(cfg.seed) + SEED_OFFSET,
            opacity=tuple(s["opacity"]),
            texture_probability=float(s["texture_probability"]),
        )
        clean = torch.from_numpy(np.asarray(dm.images[idx])).permute(0, 3, 1, 2).float() / 255
        images, masks = [clean], [torch.zeros(len(idx), 1, *clean.shape[-2:])]
        for _ in range(int(s["per_image"])):
            for part in clean.split(32):
                x, m = defects(part)
                images.append(x)
                masks.append(m)
        img = (torch.cat(images).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        msk = torch.cat(masks)[:, 0].to(torch.uint8).numpy()
        labels = msk.reshape(len(msk), -1).any(axis=1).astype(np.uint8)
        tmp.mkdir(parents=True)
        np.save(tmp / "images.npy", img)
        np.save(tmp / "masks.npy", msk)
        np.save(tmp / "labels.npy", labels)
        write_record(tmp, dm.data_record(idx))
        log.info(
            "synthetic validation set: %d images (%d with a defect) in %s", len(img), labels.sum(), folder
        )

    build_once(folder, build)
    return tuple(np.load(folder / f"{name}.npy") for name in ("images", "masks", "labels"))


@torch.no_grad()
def synthetic_scores(
    module, dm, fpr_limit: float = 0.3, iou_threshold: float = 0.5
) -> dict[str, float] | None:
    """The five metrics of `module` (its current weights) on the datamodule's synthetic validation set
    against its exact masks; None when the datamodule has none."""
    from torch.utils.data import DataLoader

    from mvtec_seg.metrics import compute_all

    if dm.synthetic_val is None:
        return None
    loader = DataLoader(dm.synthetic_val, batch_size=dm.eval_batch_size, shuffle=False)
    maps, kept = loader_maps(module, loader, ("target_mask", "gt_label"))
    return compute_all(
        maps,
        kept["target_mask"][:, 0] > 0.5,
        kept["gt_label"],
        iou_threshold=iou_threshold,
        fpr_limit=fpr_limit,
    )
