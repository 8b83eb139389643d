"""LightningDataModule over the split manifest: cached arrays in, `{image, gt_mask, ...}` batches out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mvtec_seg.data.cache import decoded_arrays, decoding_key, manifest_files
from mvtec_seg.data.files import data_record, file_state
from mvtec_seg.data.sources import known_normal_rows
from mvtec_seg.data.split import load_or_create_manifest, part_counts
from mvtec_seg.data.visa import DEFAULT_VISA_SPLIT

TRAIN_SUBSETS: tuple[str, ...] = ("all", "known_normal")


class ManifestDataset(Dataset):
    """Rows of one split part, served from uint8 arrays held in memory (or memory-mapped)."""

    def __init__(
        self,
        images: np.ndarray,
        gt_masks: np.ndarray,
        target_masks: np.ndarray | None,
        rows: list[dict],
        indices: np.ndarray,
        augment: bool = False,
        crop: int | None = None,
        target_weights: np.ndarray | None = None,
        soft_targets: np.ndarray | None = None,
        known_normal: np.ndarray | None = None,
    ) -> None:
        self.images, self.gt_masks, self.target_masks = images, gt_masks, target_masks
        self.known_normal = known_normal_rows(rows) if known_normal is None else np.asarray(known_normal)
        self.target_weights, self.soft_targets = target_weights, soft_targets
        self.rows, self.indices, self.augment = rows, np.asarray(indices, dtype=np.int64), augment
        self.crop = crop

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        j = int(self.indices[i])
        image = torch.from_numpy(np.array(self.images[j])).permute(2, 0, 1).float().div_(255.0)
        gt = torch.from_numpy(np.array(self.gt_masks[j])).float().unsqueeze(0)
        target = (
            gt
            if self.target_masks is None
            else torch.from_numpy(np.array(self.target_masks[j])).float()[None]
        )
        weight = (
            torch.ones_like(target)
            if self.target_weights is None
            else torch.from_numpy(np.array(self.target_weights[j])).float()[None]
        )
        planes = [image, gt, target, weight]
        if self.soft_targets is not None:
            planes.append(torch.from_numpy(np.array(self.soft_targets[j])).float()[None])
        if self.augment:
            dims = [d for d, flip in ((-1, torch.rand(()) < 0.5), (-2, torch.rand(()) < 0.5)) if flip]
            if dims:
                planes = [t.flip(dims) for t in planes]
        if self.crop and self.crop < image.shape[-1]:
            top, left = (int(v) for v in torch.randint(0, image.shape[-1] - self.crop + 1, (2,)))
            planes = [t[..., top : top + self.crop, left : left + self.crop] for t in planes]
        image, gt, target, weight = planes[:4]
        row = self.rows[j]
        extra = {"soft_target": planes[4]} if self.soft_targets is not None else {}
        return extra | {
            "image": image,
            "gt_mask": gt,
            "target_mask": target,
            "target_weight": weight,
            "gt_label": torch.tensor(row["label"], dtype=torch.long),
            "known_normal": torch.tensor(bool(self.known_normal[j])),
            "defect_type": row["defect_type"],
            "path": row["image"],
            "index": torch.tensor(j, dtype=torch.long),
        }


class SyntheticValDataset(Dataset):
    """The GT-free validation set (`pseudo.synthetic_val`): images with synthetic defects and their exact
    masks, served with the batch keys of the val part (`target_mask` is the exact mask)."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.masks, self.labels = images, masks, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1).float().div_(255.0)
        mask = torch.from_numpy(np.array(self.masks[i])).float().unsqueeze(0)
        return {
            "image": image,
            "gt_mask": mask,
            "target_mask": mask,
            "target_weight": torch.ones_like(mask),
            "gt_label": torch.tensor(int(self.labels[i]), dtype=torch.long),
            "defect_type": "synthetic" if self.labels[i] else "good",
            "path": f"synthetic_val/{i:05d}",
            "index": torch.tensor(-1 - i, dtype=torch.long),
        }


class EpochShuffle(Sampler[int]):
    """A fresh permutation each epoch drawn from (seed, epoch) alone, not from the global RNG: epoch k sees
    the same order whether the run went straight through or was resumed from a checkpoint.

    Lightning calls `set_epoch` at the start of every training epoch (as for a `DistributedSampler`).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        key = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(key)).tolist())

    def __len__(self) -> int:
        return self.n


class MVTecDataModule(pl.LightningDataModule):
    """Serves the train/val/test parts of one category's manifest.

    `train_crop` trains on random square crops (evaluation always sees whole images): a cheap way to
    see more defects per CPU second with a fully convolutional network.
    `train_subset="known_normal"` keeps only the known normal training images (`data.sources`: `train/good`;
    TransFusion is trained on them, and `mask=synthetic_only` students too). Which rows are known normals is
    `known_normal` (default: the strict rule; `set_known_normals` for `mask.image_labels=true`).
    Targets for train and val come from `target_masks` (pseudo masks) when given; test is always scored on GT.
    `shard_evaluation` (for a trainer with `use_distributed_sampler=False`): under DDP the module shards
    the data itself, so evaluation sees every image exactly once (no padding).
    """

    def __init__(
        self,
        category_dir: str | Path,
        cache_dir: str | Path,
        category: str,
        seed: int = 0,
        image_size: int = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        decode_workers: int = 2,
        split_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
        augment: bool = True,
        train_subset: str = "all",
        pin_memory: bool = False,
        train_crop: int | None = None,
        shard_evaluation: bool = False,
        protocol: str = "split",
        layout: str = "mvtec",
        visa_split: str = DEFAULT_VISA_SPLIT,
    ) -> None:
        super().__init__()
        self.category_dir, self.cache_dir = Path(category_dir), Path(cache_dir)
        self.category, self.seed, self.image_size = category, seed, image_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.decode_workers, self.pin_memory = num_workers, decode_workers, pin_memory
        self.split_ratios, self.augment = tuple(split_ratios), augment
        if train_subset not in TRAIN_SUBSETS:
            raise ValueError(f"data.train_subset must be one of {TRAIN_SUBSETS}, got {train_subset!r}")
        self.train_subset = train_subset
        self.train_crop = train_crop
        self.shard_evaluation = shard_evaluation
        self.protocol = protocol  # "split" (seeded 7:1:2) or "official" (the dataset's own parts)
        self.layout = layout  # the folder layout of the category (`data.layouts.LAYOUTS`)
        self.visa_split = visa_split  # VisA's split file behind the official parts (`data.visa.VISA_SPLITS`)
        self.target_masks: np.ndarray | None = None
        self.known_normal: np.ndarray | None = None  # bool per manifest row; None: the strict rule
        self.left_out: np.ndarray | None = None  # bool per manifest row: not trained on (`set_left_out`)
        self.target_weights: np.ndarray | None = None
        self.soft_targets: np.ndarray | None = None  # the distillation target (calibrated teacher map)
        self.synthetic_val: SyntheticValDataset | None = None
        self.manifest: dict | None = None
        self.manifest_path: Path | None = None
        self.file_state: dict[str, str] = {}
        self.decoding: int | None = None  # the decoding rules' version when the pixels depend on it

    def prepare(self) -> dict:
        """Scan, split and decode (once; cached). Safe to call repeatedly, and before the trainer exists."""
        if self.manifest is None:
            self.manifest_path, self.manifest = load_or_create_manifest(
                self.category_dir,
                self.cache_dir,
                self.category,
                self.seed,
                self.split_ratios,
                self.protocol,
                self.layout,
                self.visa_split,
            )
            self.file_state = file_state(self.category_dir, manifest_files(self.manifest))
            self.images, self.gt_masks = decoded_arrays(
                self.manifest,
                self.category_dir,
                self.cache_dir,
                self.image_size,
                self.decode_workers,
                self.file_state,
            )
            self.decoding = decoding_key(self.manifest, self.cache_dir, self.image_size, self.file_state)
        return self.manifest

    def data_record(self, indices: np.ndarray | None = None, masks: bool = False) -> dict:
        """The root and the digests of the images (and masks) of these manifest rows (default: all): what
        an artefact derived from them is keyed by (`data.files`)."""
        rows = self.prepare()["samples"]
        picked = [rows[int(i)] for i in (range(len(rows)) if indices is None else indices)]
        paths = [r["image"] for r in picked] + (
            [r["gt_mask"] for r in picked if r["gt_mask"]] if masks else []
        )
        return data_record(self.category_dir, {p: self.file_state[p] for p in paths})

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def set_target_masks(
        self, masks: np.ndarray, weights: np.ndarray | None = None, soft: np.ndarray | None = None
    ) -> None:
        """Use these targets ([N,H,W] in manifest order, binary or soft in [0,1]) for training/validation
        instead of GT, with optional per-pixel loss weights (`target_weight`; 0 = ignore; default 1) and an
        optional soft distillation target (`soft_target`, training only)."""
        self.prepare()
        for name, arr in (("target masks", masks), ("target weights", weights), ("soft targets", soft)):
            if arr is not None and arr.shape != self.gt_masks.shape:
                raise ValueError(f"{name} have shape {arr.shape}, expected {self.gt_masks.shape}")
        self.target_masks, self.target_weights, self.soft_targets = masks, weights, soft

    def use_gt_targets(self, rows: np.ndarray) -> None:
        """The targets of these manifest rows become their GT masks (loss weight 1, distillation target the
        mask): the labelled images of `mask=mixed`, put in after the pseudo targets are set."""
        if self.target_masks is None or len(rows) == 0:
            return
        rows = np.asarray(rows, dtype=np.int64)
        gt = np.asarray(self.gt_masks[rows])
        self.target_masks = np.array(self.target_masks)  # a copy: the cached set on disk stays pseudo
        self.target_masks[rows] = gt.astype(self.target_masks.dtype)
        if self.target_weights is not None:
            self.target_weights = np.array(self.target_weights)
            self.target_weights[rows] = 1
        if self.soft_targets is not None:
            self.soft_targets = np.array(self.soft_targets)
            self.soft_targets[rows] = gt.astype(self.soft_targets.dtype)

    def set_left_out(self, left_out: np.ndarray | None) -> None:
        """Manifest rows the train loader skips (bool per row; None: none): the unlabelled defective images of
        `mask=gt mask.gt_images=k`."""
        self.prepare()
        if left_out is not None and len(left_out) != len(self.manifest["samples"]):
            raise ValueError(f"left_out has {len(left_out)} rows, expected {len(self.manifest['samples'])}")
        self.left_out = None if left_out is None else np.asarray(left_out, dtype=bool)

    def set_synthetic_val(self, arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> None:
        """Serve the GT-free validation set as a second val dataloader (its metrics: `val/synthetic_*`)."""
        self.synthetic_val = SyntheticValDataset(*arrays) if arrays is not None else None

    def set_known_normals(self, known: np.ndarray | None) -> None:
        """Which manifest rows count as known normals (bool per row; None: the strict rule of
        `data.sources`): what `known_normal=True` selects and where synthetic defects may be pasted."""
        self.prepare()
        if known is not None and len(known) != len(self.manifest["samples"]):
            raise ValueError(
                f"known normals have {len(known)} rows, expected {len(self.manifest['samples'])}"
            )
        self.known_normal = None if known is None else np.asarray(known, dtype=bool)

    def known_normals(self) -> np.ndarray:
        """Bool per manifest row: a known normal (see `set_known_normals`)."""
        rows = self.prepare()["samples"]
        return known_normal_rows(rows) if self.known_normal is None else self.known_normal

    def indices(self, part: str, normal_only: bool = False, known_normal: bool = False) -> np.ndarray:
        """Manifest rows of `part`; `normal_only`: labelled normal (reads image labels: for scoring);
        `known_normal`: known normals only (what the pseudo-mask chain may treat as normal)."""
        rows = self.prepare()["samples"]
        known = self.known_normals() if known_normal else None
        return np.array(
            [
                i
                for i, r in enumerate(rows)
                if r["part"] == part and (not normal_only or r["label"] == 0) and (known is None or known[i])
            ],
            dtype=np.int64,
        )

    def dataset(
        self,
        part: str,
        augment: bool = False,
        normal_only: bool = False,
        crop: int | None = None,
        known_normal: bool = False,
    ) -> ManifestDataset:
        rows = self.prepare()["samples"]
        target = self.target_masks if part in ("train", "val") else None
        weight = self.target_weights if part in ("train", "val") else None
        soft = self.soft_targets if part == "train" else None
        idx = self.indices(part, normal_only, known_normal)
        if part == "train" and self.left_out is not None:
            idx = idx[~self.left_out[idx]]
        if part == "train" and weight is not None:
            idx = idx[np.asarray(weight[idx]).any(axis=(1, 2))]  # weighted 0 everywhere: teaches nothing
        return ManifestDataset(
            self.images, self.gt_masks, target, rows, idx, augment, crop, weight, soft, self.known_normals()
        )

    def counts(self) -> dict[str, int]:
        return part_counts(self.prepare())

    def _sampler(self, ds: Dataset, shuffle: bool):
        """Under DDP with `shard_evaluation`: shuffled shards for training, and unpadded strided shards for
        evaluation, so every test image is scored exactly once."""
        trainer = getattr(self, "trainer", None)
        if not self.shard_evaluation or trainer is None or trainer.world_size <= 1:
            return None
        if shuffle:
            return DistributedSampler(
                ds, num_replicas=trainer.world_size, rank=trainer.global_rank, seed=self.seed
            )
        return list(range(trainer.global_rank, len(ds), trainer.world_size))

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        sampler = self._sampler(ds, shuffle)
        if sampler is None and shuffle:
            sampler = EpochShuffle(len(ds), self.seed)
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset(
            "train",
            augment=self.augment,
            crop=self.train_crop,
            known_normal=self.train_subset == "known_normal",
        )
        return self._loader(ds, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The val part; with a synthetic validation set, that set as a second loader."""
        val = self._loader(self.dataset("val"), self.eval_batch_size, shuffle=False)
        if self.synthetic_val is None:
            return val
        return [val, self._loader(self.synthetic_val, self.eval_batch_size, shuffle=False)]

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Every image of the manifest in order (for pseudo masks)."""
        rows = self.prepare()["samples"]
        ds = ManifestDataset(self.images, self.gt_masks, None, rows, np.arange(len(rows)))
        return self._loader(ds, self.eval_batch_size, shuffle=False)
