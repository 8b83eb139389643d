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

Labelled images (`mask.gt_images`, sources `gt` and `mixed`): a budget of k defective train-part images whose
GT masks the run may read, chosen by `labelling_order` from the run's seed alone (stratified: round-robin over
the defect types in a seeded order, each type's images in a seeded order), so every run of one seed and k labels
the same images, and k + 1 labels those of k and one more. `null` is every defective train-part image; a
fraction in (0, 1) is that share of them.

| source | knows | targets |
|---|---|---|
| `gt` | every mask | GT (and with `mask.synthetic_fraction`, synthetic defects on the known normals) |
| `pseudo` | which images are known normals | the teacher's maps through the mask rules |
| `pseudo` + `mask.image_labels=true` | every image's label | as `pseudo`, normals = every label-0 image |
| `synthetic_only` | which images are known normals | synthetic defects on the known normals only |
| `gt` + `mask.gt_images=k` | k defective images' masks, every label | GT; the other defective train images left out |
| `mixed` (`mask.gt_images=k`) | as `pseudo`, and k defective images' masks | as `pseudo`, GT on the k labelled images |

Under `mixed` the pseudo-mask chain (teacher, thresholds, gates, self-training rounds) runs exactly as under
`pseudo`, reading no GT; only then are the labelled images' targets replaced by their GT masks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mvtec_seg.data.visa import DEFAULT_VISA_SPLIT, VISA_SPLITS
from mvtec_seg.errors import UserError

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


LABEL_STREAM = 0x6C61626C  # the seed's stream for the choice of labelled images (apart from the split's)


def defective_train_rows(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Bool per manifest row: a defective image of the train part (what `mask.gt_images` chooses from)."""
    return np.array([r["part"] == "train" and int(r["label"]) != 0 for r in rows], dtype=bool)


def labelling_order(rows: Sequence[Mapping[str, Any]], seed: int) -> list[int]:
    """Every defective train-part row, in the order they are labelled: the defect types in a seeded order,
    round-robin, each type's images in a seeded order. The first k are the k labelled images, so a larger
    budget keeps every image of a smaller one (nested), and every type gets one before any gets two."""
    rng = np.random.default_rng([int(seed), LABEL_STREAM])
    by_type: dict[str, list[int]] = {}
    for i in np.flatnonzero(defective_train_rows(rows)):
        by_type.setdefault(str(rows[i]["defect_type"]), []).append(int(i))
    queues = []
    for name in sorted(by_type):  # sorted first: the order depends on the seed, not on the manifest's order
        images = sorted(by_type[name], key=lambda i: str(rows[i]["image"]))
        queues.append([images[j] for j in rng.permutation(len(images))])
    queues = [queues[j] for j in rng.permutation(len(queues))]
    order: list[int] = []
    for depth in range(max((len(q) for q in queues), default=0)):
        order += [q[depth] for q in queues if depth < len(q)]
    return order


def labelled_count(gt_images: Any, available: int) -> int:
    """How many images `mask.gt_images` labels out of `available`: null all, a fraction in (0, 1) that share
    (rounded half up), a whole number itself; more than `available` is refused."""
    if gt_images is None:
        return available
    if isinstance(gt_images, float) and 0 < gt_images < 1:
        return int(np.floor(gt_images * available + 0.5))
    k = int(gt_images)
    if k > available:
        raise UserError(
            f"mask.gt_images={gt_images} asks for more GT masks than the {available} defective images of this "
            f"split's train part — use at most {available}, a fraction such as 0.5, or null for all"
        )
    return k


def labelled_rows(rows: Sequence[Mapping[str, Any]], gt_images: Any, seed: int) -> np.ndarray:
    """The manifest rows whose GT masks a `mask.gt_images` budget labels, in the order they were chosen."""
    order = labelling_order(rows, seed)
    return np.array(order[: labelled_count(gt_images, len(order))], dtype=np.int64)


@dataclass(frozen=True)
class MaskSource:
    """One `mask.name`: what it needs and which images it trains on (see the module docstring)."""

    name: str
    needs_teacher: bool  # the teacher's maps make the targets
    reads_gt: bool  # the targets are GT masks
    trains_on_unlabelled: bool  # unlabelled train-part images are trained on (False: only known normals)
    label: str  # how tables name it
    synthetic_val: bool = False  # `synthetic_val.enabled=auto` builds the GT-free validation set
    takes_gt_images: bool = False  # `mask.gt_images`: GT masks for a seeded budget of defective train images

    def image_labels(self, settings: Any) -> bool:
        """Whether the chain may read image labels (`mask.image_labels=true`; the sources that run the chain
        offer it)."""
        return self.needs_teacher and bool(_get(settings, "mask.image_labels", False))

    def labelled(self, settings: Any, rows: Sequence[Mapping[str, Any]]) -> np.ndarray | None:
        """The defective train-part rows whose GT masks the run reads (`mask.gt_images`, `labelled_rows`),
        in the order chosen; None where there is no budget (a source without the setting, or `gt` at its
        default null: every mask)."""
        budget = _get(settings, "mask.gt_images")
        if not self.takes_gt_images or (budget is None and not self.needs_teacher):
            return None
        return labelled_rows(rows, budget, int(_get(settings, "seed", 0)))

    def gt_targets(self, settings: Any, rows: Sequence[Mapping[str, Any]]) -> np.ndarray | None:
        """Rows whose pseudo targets are replaced by their GT masks (`mixed`: the labelled images); None when
        the targets are all of one kind."""
        return self.labelled(settings, rows) if self.needs_teacher else None

    def left_out(self, settings: Any, rows: Sequence[Mapping[str, Any]]) -> np.ndarray | None:
        """Bool per row: left out of training. `gt` with a budget (`mask.gt_images`): the defective
        train-part images without a label (a GT run knows every image's label, so the normal images stay,
        with empty masks); None: nothing is."""
        labelled = self.labelled(settings, rows)
        if labelled is None or self.needs_teacher:
            return None
        out = defective_train_rows(rows)
        out[labelled] = False
        return out

    def known_normals(self, settings: Any, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Per manifest row: may this source treat it as normal (synthetic defects go there)."""
        return known_normal_rows(rows, self.image_labels(settings))

    def variant(self, settings: Any) -> str:
        """The variant's name in tables: e.g. `PSEUDO + image labels`, `GT + synthetic`, `MIXED (gt_images=5)`."""
        name = self.label
        if self.needs_teacher and self.protocol(settings) == "image labels":
            name += " + image labels"
        if self.name == "gt" and float(_get(settings, "mask.synthetic_fraction", 0.0) or 0.0) > 0:
            name += " + synthetic"
        k = _get(settings, "mask.gt_images")
        if self.takes_gt_images and (k is not None or self.needs_teacher):
            name += f" (gt_images={'all' if k is None else k})"
        return name

    def protocol(self, settings: Any) -> str:
        """What the pseudo-mask chain may read: `image labels` or `known normals` (reported per run)."""
        return (
            "image labels" if self.image_labels(settings) or labelled_by_split(settings) else "known normals"
        )


SOURCES: dict[str, MaskSource] = {
    "gt": MaskSource(
        "gt", needs_teacher=False, reads_gt=True, trains_on_unlabelled=True, label="GT", takes_gt_images=True
    ),
    "pseudo": MaskSource(
        "pseudo",
        needs_teacher=True,
        reads_gt=False,
        trains_on_unlabelled=True,
        label="PSEUDO",
        synthetic_val=True,
    ),
    "mixed": MaskSource(
        "mixed",
        needs_teacher=True,
        reads_gt=False,  # the targets are pseudo masks; only the labelled images' are GT (`gt_targets`)
        trains_on_unlabelled=True,
        label="MIXED",
        synthetic_val=True,
        takes_gt_images=True,
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


def makes_pseudo_targets(settings: Any) -> bool:
    """Whether the run's mask source runs the pseudo-mask chain (`pseudo`, `mixed`): its `mask.*` rules
    apply. An unknown name is False (the settings check names it)."""
    source = SOURCES.get(str(_get(settings, "mask.name", "gt")))
    return source is not None and source.needs_teacher


def needs_teacher(settings: Any) -> bool:
    """Whether the run uses the TransFusion teacher: it is the model, or its maps make the targets."""
    return _get(settings, "model.source") == "teacher" or mask_source(settings).needs_teacher
