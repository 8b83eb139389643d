"""Mask sources and the PSEUDO protocol: the chain reads no image label by default (known normals are
`train/good`, thresholds calibrated on the val part's), `mask.image_labels=true` reproduces the earlier
targets exactly, the controls need no teacher, and the decision threshold never reads the test part."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mvtec_seg.data.sources import SOURCES, is_known_normal, mask_source, needs_teacher
from mvtec_seg.errors import UserError
from mvtec_seg.pseudo.masks import chain_sets
from mvtec_seg.pseudo.rules import derive_targets

BASE = {
    "threshold": {
        "strategy": "hysteresis",
        "quantile": 0.995,
        "low_quantile": 0.98,
        "fixed": 0.5,
        "mebin": {"sample_rate": 4, "min_interval": 4, "erode": 6},
    },
    "gate": {"strategy": "quantile", "quantile": 0.99},
    "normal_empty": False,
    "gated": "empty",
    "regions": {"min_area": 4, "fill_holes": 0},
    "target": "hard",
    "distill": {"weight": 0.0},
}
VARIANTS = {
    "default": {},
    "separation_ignore": {"gate": {"strategy": "separation", "quantile": 0.99}, "normal_empty": True, "gated": "ignore"},
    "quantile_soft": {"threshold": {**BASE["threshold"], "strategy": "quantile"}, "target": "soft", "distill": {"weight": 0.5}},
    "ignore_target": {"target": "ignore", "normal_empty": True},
}  # fmt: skip
PINNED = {  # digests of (mask, target, weight, soft) made by the chain before it had a strict protocol
    "default": "1c6da3b29cfc22f6",
    "separation_ignore": "6e0c6fdb8a184667",
    "quantile_soft": "b82fd515ba2ffdd8",
    "ignore_target": "ba9fd77fb9d32d28",
}


def _maps() -> np.ndarray:
    rng = np.random.default_rng(0)
    maps = rng.gamma(2.0, 0.1, (30, 16, 16)).astype(np.float32)
    maps[20:, 4:10, 4:10] += 0.8
    return maps


def _dm() -> SimpleNamespace:
    """30 rows: train part 0-23 (0-11 train/good, 12-15 test/good, 16-23 defective), val part 24-29
    (24-26 train/good, 27 test/good, 28-29 defective)."""
    rows = []
    for i in range(30):
        part = "train" if i < 24 else "val"
        good_train = i < 12 or 24 <= i < 27
        label = 0 if (i < 16 or 24 <= i < 28) else 1
        rows.append({"part": part, "label": label, "source": "train" if good_train else "test"})
    return SimpleNamespace(manifest={"samples": rows})


def _digest(t) -> str:
    h = hashlib.sha256()
    for a in (t.mask, t.target, t.weight, t.soft):
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _settings(variant: str, image_labels: bool) -> dict:
    s = copy.deepcopy(BASE)
    s.update(VARIANTS[variant])
    return s | {"image_labels": image_labels}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_image_labels_true_reproduces_the_earlier_targets(variant: str) -> None:
    settings = _settings(variant, image_labels=True)
    train, known, calibration = chain_sets(_dm(), settings)
    assert list(known) == list(range(16)) and list(calibration) == list(known)  # every label-0 train image
    assert _digest(derive_targets(_maps(), train, known, settings, calibration)) == PINNED[variant]


def test_strict_sets_are_train_good_and_the_val_parts_train_good() -> None:
    train, known, calibration = chain_sets(_dm(), _settings("default", image_labels=False))
    assert (
        list(train) == list(range(24))
        and list(known) == list(range(12))
        and list(calibration) == [24, 25, 26]
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_strict_targets_read_no_label_of_an_unlabelled_image(variant: str) -> None:
    """Relabelling the unlabelled images (test/good and defective alike) changes nothing under the strict
    protocol, and changes the targets of the image-labels variant (it reads them)."""
    maps, dm = _maps(), _dm()
    relabelled = copy.deepcopy(dm)
    for row in relabelled.manifest["samples"]:
        if row["source"] == "test":
            row["label"] = 1 - row["label"]
    strict = _settings(variant, image_labels=False)
    a = derive_targets(maps, *chain_sets(dm, strict)[:2], strict, chain_sets(dm, strict)[2])
    b = derive_targets(maps, *chain_sets(relabelled, strict)[:2], strict, chain_sets(relabelled, strict)[2])
    assert _digest(a) == _digest(b) and a.record == b.record
    weak = _settings(variant, image_labels=True)
    c = derive_targets(maps, *chain_sets(dm, weak)[:2], weak, chain_sets(dm, weak)[2])
    d = derive_targets(maps, *chain_sets(relabelled, weak)[:2], weak, chain_sets(relabelled, weak)[2])
    assert _digest(c) != _digest(d)


def test_strict_calibration_is_the_val_parts_known_normals() -> None:
    maps, dm = _maps(), _dm()
    s = _settings("default", image_labels=False) | {
        "threshold": {**BASE["threshold"], "strategy": "quantile"}
    }
    t = derive_targets(maps, *chain_sets(dm, s)[:2], s, chain_sets(dm, s)[2])
    assert t.record["threshold"] == pytest.approx(float(np.quantile(maps[[24, 25, 26]], 0.995)))


def test_strict_without_val_known_normals_is_one_line() -> None:
    dm = _dm()
    for row in dm.manifest["samples"][24:]:
        row["source"] = "test"
    with pytest.raises(UserError, match="mask.image_labels=true"):
        chain_sets(dm, {"image_labels": False})


def test_each_source_owns_its_decisions() -> None:
    rows = _dm().manifest["samples"]
    assert set(SOURCES) == {
        p.stem for p in (Path(__file__).parents[1] / "mvtec_seg/conf/mask").glob("*.yaml")
    }
    assert needs_teacher({"model.source": "fit", "mask.name": "pseudo"})
    assert not needs_teacher({"model.source": "fit", "mask.name": "synthetic_only"})
    assert not needs_teacher({"model.source": "fit", "mask.name": "gt"})
    assert needs_teacher({"model.source": "teacher", "mask.name": "gt"})
    strict = {"mask.name": "pseudo", "mask.image_labels": False}
    weak = {"mask.name": "pseudo", "mask.image_labels": True}
    assert mask_source(strict).known_normals(strict, rows).sum() == 15  # train/good of every part
    assert mask_source(weak).known_normals(weak, rows).sum() == 20  # every label-0 image
    assert not is_known_normal({"label": 1, "source": "train"}, image_labels=True)
    gt_syn = {"mask.name": "gt", "mask.synthetic_fraction": 0.5, "mask.image_labels": True}
    assert mask_source(gt_syn).known_normals(gt_syn, rows).sum() == 15  # only pseudo offers image labels
    assert [mask_source(s).variant(s) for s in (strict, weak, gt_syn, {"mask.name": "synthetic_only"})] == [
        "PSEUDO",
        "PSEUDO + image labels",
        "GT + synthetic",
        "synthetic only",
    ]
    assert not SOURCES["synthetic_only"].trains_on_unlabelled and SOURCES["pseudo"].trains_on_unlabelled


def test_synthetic_only_without_synthetic_defects_is_refused(tmp_path: Path) -> None:
    from conftest import compose_cfg

    from mvtec_seg.preflight import check_config

    cfg = compose_cfg(tmp_path, ["mask=synthetic_only", "mask.synthetic_fraction=0"])
    with pytest.raises(UserError, match="mask.synthetic_fraction=0.5"):
        check_config(cfg)
    check_config(compose_cfg(tmp_path, ["mask=gt", "mask.synthetic_fraction=0.5"]))  # GT + synthetic is valid


def test_decision_threshold_never_reads_the_test_part(segmenter_run: dict) -> None:
    """The threshold comes from the val part: scrambling every test mask leaves it unchanged."""
    from mvtec_seg.builders import build_datamodule
    from mvtec_seg.inference import choose_threshold, load_trained
    from mvtec_seg.train import threshold_set

    cfg = segmenter_run["cfg"]
    module = load_trained(segmenter_run["run"]).module
    dm = build_datamodule(cfg)
    dm.prepare()
    first = choose_threshold(module, threshold_set(cfg, dm), 8, "gt")
    assert first["value"] == pytest.approx(segmenter_run["summary"]["decision_threshold"]["value"])
    test = dm.indices("test")
    masks = np.array(dm.gt_masks)
    masks[test] = np.random.default_rng(0).integers(0, 2, masks[test].shape, dtype=masks.dtype)
    dm.gt_masks = masks
    assert choose_threshold(module, threshold_set(cfg, dm), 8, "gt") == first
    metrics = segmenter_run["summary"]["metrics"]
    assert "test/IoU_at_threshold" in metrics and "test/IoU" in metrics
