"""Mask sources: what a segmenter's training targets come from, and what each source may know.

One object per `mask.name` owns every decision that depends on the source: whether the run needs the
teacher, which train-part images count as known normals (where synthetic defects go, what the teacher and
the calibration see), which images are unlabelled, and which images are left out of training.

Known normals are the images a factory would know are good without inspecting them: those of a folder that
holds only good images by construction (`KNOWN_NORMAL_SOURCES`: MVTec AD's and VisA's `train` folder, MVTec
AD 2's `train` and `validation` folders). Every other image is unlabelled to the pseudo-mask chain, whatever
its `label`: `test/good` images included, so the chain cannot tell the defective images by elimination.
Under VisA's 2cls split files (`data.visa_split`) the `train` rows hold labelled anomalous images too: the
label rule keeps them out, so the known normals stay the normal train rows. There every other train-part image
is defective, as those files state: the chain never reads their masks, but it could tell them by elimination,
so such a run is reported under the `image labels` protocol (`labelled_by_split`).
`mask.image_labels=true` is the weak-supervision variant: every normal image (`label == 0`) counts as known.

| source | knows | targets |
|---|---|---|
| `gt` | every mask | GT (and with `mask.synthetic_fraction`, synthetic defects on the known normals) |
| `pseudo` | which images are known normals | the teacher's maps through the mask rules |
| `pseudo` + `mask.image_labels=true` | every image's label | as `pseudo`, normals = every label-0 image |
| `synthetic_only` | which images are known normals | synthetic defects on the known normals only |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mvtec_seg.data.visa import DEFAULT_VISA_SPLIT, VISA_SPLITS

KNOWN_NORMAL_SOURCES: tuple[str, ...] = ("train", "validation")
"""The folders (`Sample.source`) that hold only good images by the dataset's construction."""


def is_known_normal(row: Mapping[str, Any], image_labels: bool = False) -> bool:
    """A manifest row the chain may treat as normal: a good image of a known-good folder (with
    `image_labels`: any image labelled normal)."""
    if int(row["label"]) != 0:
        return False
    return image_labels or row.get("source") in KNOWN_NORMAL_SOURCES


def known_normal_rows(rows: Sequence[Mapping[str, Any]], image_labels: bool = False) -> np.ndarray:
    """`is_known_normal` of every manifest row, as a bool array in manifest order."""
    return np.array([is_known_normal(r, image_labels) for r in rows], dtype=bool)


@dataclass(frozen=True)
class MaskSource:
    """One `mask.name`: what it needs and which images it trains on (see the module docstring)."""

    name: str
    needs_teacher: bool  # the teacher's maps make the targets
    reads_gt: bool  # the targets are GT masks
    trains_on_unlabelled: bool  # unlabelled train-part images are trained on (False: only known normals)
    label: str  # how tables name it
    synthetic_val: bool = False  # `synthetic_val.enabled=auto` builds the GT-free validation set

    def image_labels(self, settings: Any) -> bool:
        """Whether the chain may read image labels (`mask.image_labels=true`; only `pseudo` offers it)."""
        return self.name == "pseudo" and bool(_get(settings, "mask.image_labels", False))

    def known_normals(self, settings: Any, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Per manifest row: may this source treat it as normal (synthetic defects go there)."""
        return known_normal_rows(rows, self.image_labels(settings))

    def variant(self, settings: Any) -> str:
        """The variant's name in tables: e.g. `PSEUDO + image labels`, `GT + synthetic`."""
        if self.protocol(settings) == "image labels" and not self.reads_gt:
            return f"{self.label} + image labels"
        if self.name == "gt" and float(_get(settings, "mask.synthetic_fraction", 0.0) or 0.0) > 0:
            return f"{self.label} + synthetic"
        return self.label

    def protocol(self, settings: Any) -> str:
        """What the pseudo-mask chain may read: `image labels` or `known normals` (reported per run)."""
        return "image labels" if self.image_labels(settings) or labelled_by_split(settings) else "known normals"


SOURCES: dict[str, MaskSource] = {
    "gt": MaskSource("gt", needs_teacher=False, reads_gt=True, trains_on_unlabelled=True, label="GT"),
    "pseudo": MaskSource(
        "pseudo",
        needs_teacher=True,
        reads_gt=False,
        trains_on_unlabelled=True,
        label="PSEUDO",
        synthetic_val=True,
    ),
    "synthetic_only": MaskSource(
        "synthetic_only",
        needs_teacher=False,
        reads_gt=False,
        trains_on_unlabelled=False,
        label="synthetic only",
        synthetic_val=True,
    ),
}
"""Every mask source by `mask.name` (the `conf/mask/*.yaml` files)."""


def _get(settings: Any, key: str, default: Any = None) -> Any:
    """`key` of a flat settings dict (`{"mask.name": ...}`) or of a config (`cfg.mask.name`)."""
    if isinstance(settings, Mapping) and key in settings:
        return settings[key]
    node = settings
    for part in key.split("."):
        try:
            node = node.get(part) if node is not None else None
        except AttributeError:
            return default
    return default if node is None else node


def labelled_by_split(settings: Any) -> bool:
    """Whether the data's own split labels every train-part image (VisA's 2cls files under
    `data.protocol=official`): the unlabelled images are then the defective ones."""
    official = _get(settings, "data.protocol", "split") == "official"
    return official and VISA_SPLITS.get(str(_get(settings, "data.visa_split", DEFAULT_VISA_SPLIT)), False)


def mask_source(settings: Any) -> MaskSource:
    """The mask source of a run's settings (flat dict or config); unknown names raise `KeyError`."""
    return SOURCES[str(_get(settings, "mask.name", "gt"))]


def needs_teacher(settings: Any) -> bool:
    """Whether the run uses the TransFusion teacher: it is the model, or its maps make the targets."""
    return _get(settings, "model.source") == "teacher" or mask_source(settings).needs_teacher
