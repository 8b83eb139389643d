"""What a run will do, said before it starts: one line per stage with its size and whether it is cached.

The work of a stage is counted, not guessed: epochs x images at a size for a training, images x network
passes for the maps. How long an epoch takes is measured as the run goes (`callbacks.EpochProgress` logs
each epoch with the time left); `benchmarks/RESULTS.md` (speed suite) gives images per second per device.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from mvtec_seg.builders import max_epochs
from mvtec_seg.data.sources import mask_source, needs_teacher
from mvtec_seg.precision import native_bf16

log = logging.getLogger("mvtec_seg.plan")


def _cached(path) -> str:
    return "cached" if path.exists() else "to build"


def precision_phrase(trainer: DictConfig) -> str:
    """'precision bf16-mixed (CPU with native bf16)': what a trainer node computes in, and on a CPU why."""
    precision = str(trainer.precision)
    if str(trainer.get("accelerator")) != "cpu":
        return f"precision {precision}"
    why = "CPU with native bf16" if native_bf16() else "CPU without native bf16"
    return f"precision {precision} ({why})"


def plan_lines(cfg: DictConfig, dm) -> list[str]:
    """The stages of this run: teacher, maps, pseudo masks, each segmenter fit, the test."""
    from mvtec_seg.pseudo.masks import teacher_pseudo_dir
    from mvtec_seg.teacher import Teacher, maps_dir, teacher_dir

    counts = dm.counts()
    size = int(cfg.data.image_size)
    lines = [
        f"plan: {cfg.model.name} on {cfg.mask.name if cfg.model.source == 'fit' else 'no mask source'}, "
        f"{cfg.category.name}, {sum(counts.values())} images at {size} px "
        f"(train {counts['train']}, val {counts['val']}, test {counts['test']}), "
        f"{precision_phrase(cfg.trainer)}"
    ]
    source = mask_source(cfg)
    if needs_teacher(cfg):
        tdir = teacher_dir(cfg, dm)
        n_normal = len(dm.indices("train", known_normal=True))
        if cfg.teacher.get("checkpoint"):
            lines.append(f"  teacher: loaded from {cfg.teacher.checkpoint}")
        else:
            epochs = int(cfg.teacher.trainer.max_epochs)
            lines.append(
                f"  teacher: TransFusion, {epochs} epochs x {n_normal} known normal images at {size} px — "
                f"{_cached(tdir / 'model.ckpt')}"
            )
            if str(cfg.teacher.trainer.precision) != str(cfg.trainer.precision):
                lines[-1] += f" ({precision_phrase(cfg.teacher.trainer)})"
    if cfg.model.source == "fit" and source.needs_teacher:
        steps = int(cfg.teacher.params.net.num_steps) - 2
        mdir = maps_dir(dm, Teacher(None, {}, tdir))
        n = len(dm.manifest["samples"])
        lines.append(f"  teacher maps: {n} images x {steps} network passes — {_cached(mdir / 'maps.npy')}")
        lines.append(f"  pseudo masks: {_cached(teacher_pseudo_dir(cfg, dm, Teacher(None, {}, tdir)))}")
        rounds = int(cfg.mask.get("rounds") or 0)
        fits = 1 + rounds
        if cfg.mask.get("select") == "auto":
            n_cand = len(cfg.mask.get("candidates") or [])
            lines.append(f"  selection: {n_cand} candidates, each its own student (mask.select=auto)")
            fits = n_cand * (1 + rounds)
        elif rounds:
            lines.append(f"  self-training: {rounds} round(s), each a segmenter fit and maps of {n} images")
        lines.append(
            f"  segmenter: {cfg.model.name}, {max_epochs(cfg)} epochs x {counts['train']} images at {size} px, "
            f"{fits} fit(s)"
        )
    elif cfg.model.source == "fit":
        n_fit = len(dm.dataset("train", known_normal=not source.trains_on_unlabelled))
        lines.append(
            f"  segmenter: {cfg.model.name}, {max_epochs(cfg)} epochs x {n_fit} images at {size} px"
            + ("" if source.trains_on_unlabelled else " (known normals with synthetic defects)")
        )
    labelled = source.labelled(cfg, dm.manifest["samples"]) if cfg.model.source == "fit" else None
    if labelled is not None:
        kept = "the others get pseudo targets" if source.needs_teacher else "the others are left out"
        lines.append(f"  labelled: {len(labelled)} defective train images keep their GT masks; {kept}")
    lines.append(f"  test: {counts['test']} images")
    return lines


def announce(cfg: DictConfig, dm) -> None:
    """Log the plan (never stops the run: a plan that cannot be worked out is skipped)."""
    try:
        lines = plan_lines(cfg, dm)
    except Exception as err:  # the plan is information; the run itself reports real problems
        log.debug("no plan: %s", err)
        return
    for line in lines:
        log.info("%s", line)
