"""Synthetic categories in the exact MVTec AD folder layout, for demos, tests and CI without the real data.

Two kinds:

* ``object`` (category ``synthetic``): a bottle top seen from above (shaded, knurled cap with a groove, under
  directional light) on a brushed, uneven background. Position, radius, colour,
  light direction, rotation and sensor noise vary per image. Defects, all on the cap: ``crack``,
  ``missing``, ``scratch``, ``spot``.
* ``texture`` (category ``synthetic_texture``): a plain-weave fabric with fibre noise, random phase and slight
  rotation, filling the image. Defects: ``color``, ``hole``, ``scratch``, ``spot``.

Defects vary in size (a few pixels to a few percent of the image) and contrast (faint and strong, bright and dark
variants), so a global intensity threshold cannot segment them and a model has
to learn the normal appearance. Each mask is exactly the set of pixels the defect changed.

Every image is drawn from its own generator seeded by (seed, kind, split, defect, index), so files are
byte-identical across runs and machines and do not depend on the other counts. Generation of a default
category takes well under a second (vectorised numpy; the loops run over strokes, never over pixels).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from mvtec_seg.errors import UserError
from mvtec_seg.io_utils import build_once, png_bytes

__all__ = ["DEFECT_TYPES", "KINDS", "SYNTHETIC_CATEGORIES", "generate_category", "render_sample"]

KINDS: tuple[str, ...] = ("object", "texture")
DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "object": ("crack", "missing", "scratch", "spot"),
    "texture": ("color", "hole", "scratch", "spot"),
}
# Built-in category names and their kind (the default folder name for each kind).
SYNTHETIC_CATEGORIES: dict[str, str] = {"synthetic": "object", "synthetic_texture": "texture"}
META_FILE = "synthetic.json"
_FORMAT_VERSION = 2

_STAIN_COLOURS = np.array(
    [
        [0.22, 0.13, 0.07],  # dark brown (oil)
        [0.55, 0.12, 0.08],  # rust red
        [0.15, 0.24, 0.42],  # blue ink
        [0.86, 0.86, 0.80],  # white residue
        [0.30, 0.30, 0.28],  # grey dirt
        [0.35, 0.45, 0.15],  # green
    ],
    dtype=np.float32,
)

Array = np.ndarray


# --------------------------------------------------------------------------------------------- primitives
def _grid(size: int) -> tuple[Array, Array]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float | tuple[float, float]) -> Array:
    """Gaussian-filtered white noise with unit standard deviation (structure at a chosen scale)."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma, mode="wrap")
    return field / (field.std() + 1e-8)


def _polyline_distance(points: Array, size: int) -> Array:
    """Distance of every pixel to a polyline [(y, x), ...]; computed only in its bounding box (inf elsewhere)."""
    dist = np.full((size, size), np.inf, dtype=np.float32)
    margin = 4
    y0 = int(max(np.floor(points[:, 0].min()) - margin, 0))
    y1 = int(min(np.ceil(points[:, 0].max()) + margin + 1, size))
    x0 = int(max(np.floor(points[:, 1].min()) - margin, 0))
    x1 = int(min(np.ceil(points[:, 1].max()) + margin + 1, size))
    if y0 >= y1 or x0 >= x1:
        return dist
    py, px = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    best = np.full(py.shape, np.inf, dtype=np.float32)
    for a, b in zip(points[:-1], points[1:], strict=True):  # loop over segments, vectorised over pixels
        d = b - a
        denom = float(d @ d)
        t = ((py - a[0]) * d[0] + (px - a[1]) * d[1]) / denom if denom > 0 else np.zeros_like(py)
        t = np.clip(t, 0.0, 1.0)
        best = np.minimum(best, np.hypot(py - (a[0] + t * d[0]), px - (a[1] + t * d[1])))
    dist[y0:y1, x0:x1] = best
    return dist


def _bezier(p0: Array, p1: Array, p2: Array, n: int = 24) -> Array:
    t = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _random_walk(rng: np.random.Generator, start: Array, steps: int, step_len: float) -> Array:
    """Crack-like polyline: a random walk whose heading drifts smoothly."""
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0.0, 0.45, steps))
    lengths = step_len * rng.uniform(0.6, 1.4, steps)
    moves = np.stack([np.sin(heading) * lengths, np.cos(heading) * lengths], axis=1)
    return np.concatenate([start[None], start[None] + np.cumsum(moves, axis=0)]).astype(np.float32)


def _blob(
    rng: np.random.Generator, size: int, centre: Array, radius: float, irregularity: float = 0.3
) -> tuple[Array, Array]:
    """Irregular elliptical blob: (mask, normalised distance from the centre, < 1 inside)."""
    yy, xx = _grid(size)
    angle = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.55, 1.0)
    dy, dx = yy - centre[0], xx - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    d = np.sqrt((u / radius) ** 2 + (v / (radius * aspect)) ** 2)
    wobble = _smooth_noise(rng, size, max(radius / 2.5, 1.0))
    d = d + irregularity * wobble * np.clip(d, 0.0, 1.5)
    return d < 1.0, d


def _point_in_disk(rng: np.random.Generator, centre: Array, radius: float) -> Array:
    r = radius * np.sqrt(rng.uniform(0, 1))
    a = rng.uniform(0, 2 * np.pi)
    return (centre + r * np.array([np.sin(a), np.cos(a)])).astype(np.float32)


def _blend(layer: Array, mask: Array, target: Array | float, opacity: Array | float) -> None:
    """In place: layer[mask] <- layer*(1-opacity) + target*opacity (opacity > 0 everywhere in mask)."""
    op = opacity[mask][:, None] if isinstance(opacity, np.ndarray) else opacity
    layer[mask] = layer[mask] * (1.0 - op) + np.asarray(target, dtype=np.float32) * op


# ------------------------------------------------------------------------------------------ normal scenes
class _Scene:
    """A normal image as layers, so defects can edit the foreground before noise and compositing."""

    def __init__(self, bg: Array, fg: Array, alpha: Array, support: Array, centre: Array, radius: float):
        self.bg = bg  # [S,S,3] float
        self.fg = fg  # [S,S,3] float
        self.alpha = alpha  # [S,S] coverage of fg
        self.support = support  # where defects may go (fully covered foreground)
        self.centre = centre
        self.radius = radius


def _object_scene(rng: np.random.Generator, size: int) -> _Scene:
    s = size / 128.0
    yy, xx = _grid(size)
    # Background: brushed, unevenly lit conveyor.
    level = rng.uniform(0.22, 0.36)
    tint = np.array([0.97, 1.0, 1.06], dtype=np.float32) * (1 + rng.normal(0, 0.03, 3)).astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    ramp = ((xx - size / 2) * np.cos(ang) + (yy - size / 2) * np.sin(ang)) / size * rng.uniform(0.0, 0.14)
    streaks = _smooth_noise(rng, size, (0.6 * s, 7.0 * s)) * rng.uniform(0.008, 0.02)
    blotches = _smooth_noise(rng, size, 10.0 * s) * rng.uniform(0.008, 0.02)
    bg = (level + ramp + streaks + blotches)[..., None] * tint

    # Bottle top: dome shading, groove, knurled rim, inner ring, directional light.
    centre = (size / 2 + np.clip(rng.normal(0, 2.5 * s, 2), -6 * s, 6 * s)).astype(np.float32)
    radius = float(size * rng.uniform(0.30, 0.345))
    dy, dx = yy - centre[0], xx - centre[1]
    r = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    rho = r / radius
    light = rng.normal(np.deg2rad(225.0), np.deg2rad(6.0))
    rim_zone = 1.0 / (1.0 + np.exp(-(rho - 0.86) / 0.015))
    gray = (
        0.80
        + 0.16 * (1 - np.clip(rho, 0, 1) ** 2)
        - 0.24 * np.exp(-(((rho - 0.80) / 0.03) ** 2))
        + 0.10 * np.exp(-(((rho - 0.93) / 0.05) ** 2))
        - 0.07 * np.exp(-(((rho - 0.45) / 0.04) ** 2))
        + 0.05 * np.cos(24 * theta + rng.uniform(0, 2 * np.pi)) * rim_zone
        + 0.01 * _smooth_noise(rng, size, 2.5 * s)
    )
    gray *= 1.0 + 0.18 * np.clip(rho, 0, 1) * np.cos(theta - light)
    colour = np.array([0.66, 0.50, 0.28], dtype=np.float32)
    colour = colour * (1 + rng.normal(0, 0.04, 3)).astype(np.float32) * rng.uniform(0.88, 1.08)
    fg = gray[..., None] * colour
    alpha = np.clip(radius - r + 0.5, 0.0, 1.0)
    support = r <= radius - 1.5
    return _Scene(
        bg.astype(np.float32), fg.astype(np.float32), alpha.astype(np.float32), support, centre, radius
    )


def _texture_scene(rng: np.random.Generator, size: int) -> _Scene:
    s = size / 128.0
    yy, xx = _grid(size)
    period = 9.0 * s * rng.uniform(0.95, 1.05)
    th = rng.normal(0.0, np.deg2rad(2.5))
    u = xx * np.cos(th) + yy * np.sin(th) + rng.uniform(0, period)
    v = -xx * np.sin(th) + yy * np.cos(th) + rng.uniform(0, period)
    fu, fv = (u / period) % 1.0, (v / period) % 1.0
    over = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(bool)
    warp = np.sin(np.pi * fu) ** 0.6 * (0.82 + 0.18 * np.sin(np.pi * fv))  # vertical thread on top
    weft = np.sin(np.pi * fv) ** 0.6 * (0.82 + 0.18 * np.sin(np.pi * fu))  # horizontal thread on top
    weave = np.where(over, warp, weft)
    fibres = np.where(
        over, _smooth_noise(rng, size, (3.0 * s, 0.5 * s)), _smooth_noise(rng, size, (0.5 * s, 3.0 * s))
    )
    gray = (
        0.30
        + 0.42 * weave
        + rng.uniform(0.04, 0.07) * fibres
        + rng.uniform(0.02, 0.05) * _smooth_noise(rng, size, 14.0 * s)
    )
    colour = np.array([0.62, 0.54, 0.40], dtype=np.float32)
    colour = colour * (1 + rng.normal(0, 0.04, 3)).astype(np.float32) * rng.uniform(0.9, 1.1)
    fg = (gray[..., None] * colour).astype(np.float32)
    support = np.zeros((size, size), dtype=bool)
    support[2:-2, 2:-2] = True
    centre = np.array([size / 2, size / 2], dtype=np.float32)
    return _Scene(fg.copy(), fg, np.ones((size, size), np.float32), support, centre, size / 2 - 2)


# ----------------------------------------------------------------------------------------------- defects
def _stroke_mask(scene: _Scene, points: Array, width: float) -> Array:
    return (_polyline_distance(points, scene.support.shape[0]) <= max(width / 2.0, 0.6)) & scene.support


def _scratch(rng: np.random.Generator, sc: _Scene, s: float) -> Array:
    """1-3 thin curved lines, bright or dark, from faint to clear."""
    mask = np.zeros(sc.support.shape, dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        p0 = _point_in_disk(rng, sc.centre, 0.8 * sc.radius)
        length = rng.uniform(0.25, 0.9) * sc.radius
        a = rng.uniform(0, 2 * np.pi)
        p2 = p0 + length * np.array([np.sin(a), np.cos(a)], dtype=np.float32)
        normal = np.array([np.cos(a), -np.sin(a)], dtype=np.float32)
        p1 = (p0 + p2) / 2 + normal * length * rng.uniform(-0.3, 0.3)
        m = _stroke_mask(sc, _bezier(p0, p1, p2), rng.uniform(2.4, 4.0) * s)
        strength = rng.uniform(0.45, 0.85) * rng.uniform(0.85, 1.0, m.sum()).astype(np.float32)
        op = np.zeros(m.shape, np.float32)
        op[m] = strength
        _blend(sc.fg, m, 1.0 if rng.random() < 0.6 else 0.0, op)
        mask |= m
    return mask


def _crack(rng: np.random.Generator, sc: _Scene, s: float) -> Array:
    """Dark random-walk polyline, sometimes with a branch."""
    start = _point_in_disk(rng, sc.centre, 0.75 * sc.radius)
    walk = _random_walk(rng, start, int(rng.integers(8, 30)), 2.5 * s)
    width = rng.uniform(2.4, 3.6) * s
    mask = _stroke_mask(sc, walk, width)
    if rng.random() < 0.4:
        branch = _random_walk(rng, walk[len(walk) // 2], int(rng.integers(4, 12)), 2.0 * s)
        mask |= _stroke_mask(sc, branch, width * 0.8)
    _blend(sc.fg, mask, 0.03, float(rng.uniform(0.6, 0.9)))
    return mask


def _spot(rng: np.random.Generator, sc: _Scene, s: float) -> Array:
    """1-3 coloured stains with an irregular edge; opacity from faint to strong, fading to the edge."""
    mask = np.zeros(sc.support.shape, dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        c = _point_in_disk(rng, sc.centre, 0.8 * sc.radius)
        m, d = _blob(rng, sc.support.shape[0], c, rng.uniform(4.0, 12.0) * s)
        m &= sc.support
        colour = _STAIN_COLOURS[rng.integers(len(_STAIN_COLOURS))] * rng.uniform(0.85, 1.15)
        opacity = rng.uniform(0.6, 0.9) * (0.75 + 0.25 * np.clip(1 - d, 0, 1))
        _blend(sc.fg, m, colour, opacity)
        mask |= m
    return mask


def _missing(rng: np.random.Generator, sc: _Scene, s: float) -> Array:
    """A bite out of the cap's edge: the background shows through."""
    a = rng.uniform(0, 2 * np.pi)
    c = sc.centre + sc.radius * rng.uniform(0.85, 1.05) * np.array([np.sin(a), np.cos(a)], dtype=np.float32)
    m, _ = _blob(rng, sc.support.shape[0], c, rng.uniform(0.15, 0.38) * sc.radius, irregularity=0.2)
    m &= sc.alpha >= 0.5
    sc.alpha[m] = 0.0
    return m


def _hole(rng: np.random.Generator, sc: _Scene, s: float) -> Array:
    """A torn hole: dark backing shows through the weave, with some texture left."""
    c = _point_in_disk(rng, sc.centre, 0.85 * sc.radius)
    m, _ = _blob(rng, sc.support.shape[0], c, rng.uniform(2.5, 9.0) * s, irregularity=0.4)
    m &= sc.support
    dark = np.array([0.06, 0.05, 0.04], dtype=np.float32) * rng.uniform(0.5, 2.5)
    _blend(sc.fg, m, dark, float(rng.uniform(0.55, 0.95)))
    return m


def _color(rng: np.random.Generator, sc: _Scene, s: float) -> Array:
    """A dyed patch: per-channel gain change that keeps the texture (often subtle)."""
    c = _point_in_disk(rng, sc.centre, 0.8 * sc.radius)
    m, _ = _blob(rng, sc.support.shape[0], c, rng.uniform(5.0, 15.0) * s, irregularity=0.3)
    m &= sc.support
    direction = rng.normal(0, 1, 3)
    direction /= np.linalg.norm(direction) + 1e-8
    gain = (1.0 + direction * rng.uniform(0.15, 0.4)).astype(np.float32)
    sc.fg[m] = sc.fg[m] * gain
    return m


_DEFECTS: dict[str, Callable[[np.random.Generator, _Scene, float], Array]] = {
    "crack": _crack,
    "missing": _missing,
    "scratch": _scratch,
    "spot": _spot,
    "hole": _hole,
    "color": _color,
}
_SCENES: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "object": _object_scene,
    "texture": _texture_scene,
}


def _finish(rng: np.random.Generator, sc: _Scene) -> Array:
    """Composite, apply exposure jitter and sensor noise, quantise to uint8."""
    a = sc.alpha[..., None]
    img = sc.bg * (1 - a) + sc.fg * a
    img = img * rng.uniform(0.95, 1.05) + rng.normal(0, rng.uniform(0.006, 0.015), img.shape)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _rng(seed: int, kind: str, split: str, defect: str, index: int) -> np.random.Generator:
    key = zlib.crc32(f"{kind}/{split}/{defect}".encode())
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, key, int(index)])


def render_sample(
    kind: str, defect: str, seed: int, index: int, image_size: int = 128, split: str = "test"
) -> tuple[Array, Array]:
    """One image (uint8 [S,S,3]) and its mask (uint8 [S,S], 0/255; zeros for ``good``)."""
    _check_kind(kind)
    if defect != "good" and defect not in DEFECT_TYPES[kind]:
        raise ValueError(f"unknown defect {defect!r} for kind {kind!r}; expected one of {DEFECT_TYPES[kind]}")
    rng = _rng(seed, kind, split, defect, index)
    s = image_size / 128.0
    min_area = max(4, int(round(6 * s * s)))
    while True:  # redraw the rare defect that falls (almost) entirely off the support
        scene = _SCENES[kind](rng, image_size)
        if defect == "good":
            mask = np.zeros((image_size, image_size), dtype=bool)
            break
        mask = _DEFECTS[defect](rng, scene, s)
        if mask.sum() >= min_area:
            break
    return _finish(rng, scene), mask.astype(np.uint8) * 255


# ------------------------------------------------------------------------------------------------ layout
def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown synthetic kind {kind!r} — use one of {', '.join(KINDS)}")


def generate_category(
    root: Path | str,
    name: str | None = None,
    kind: str = "object",
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 60,
    n_test_good: int = 12,
    n_test_per_defect: int = 10,
) -> Path:
    """Write a synthetic category in MVTec layout under ``root/name`` (once) and return that folder.

    ``name`` defaults to ``synthetic`` for objects and ``synthetic_texture`` for textures. The tree is built
    in a temporary sibling and renamed into place under an inter-process lock, so parallel jobs may call this
    together. An existing folder generated with other settings is an error rather than silently reused.
    """
    _check_kind(kind)
    if name is None:
        name = "synthetic" if kind == "object" else "synthetic_texture"
    if image_size < 16:
        raise UserError(
            f"synthetic image_size={image_size} is too small — use 16 or more (128 is the default)"
        )
    if n_train < 1 or n_test_good < 0 or n_test_per_defect < 1:
        raise UserError("synthetic data needs n_train >= 1, n_test_good >= 0 and n_test_per_defect >= 1")
    params = {
        "format": _FORMAT_VERSION,
        "kind": kind,
        "seed": int(seed),
        "image_size": int(image_size),
        "n_train": int(n_train),
        "n_test_good": int(n_test_good),
        "n_test_per_defect": int(n_test_per_defect),
    }
    target = Path(root) / name

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        jobs: list[tuple[str, str, int]] = [("train", "good", i) for i in range(n_train)]
        jobs += [("test", "good", i) for i in range(n_test_good)]
        jobs += [("test", d, i) for d in DEFECT_TYPES[kind] for i in range(n_test_per_defect)]
        for split, defect, i in jobs:
            image, mask = render_sample(kind, defect, seed, i, image_size, split)
            img_dir = tmp / split / defect
            img_dir.mkdir(parents=True, exist_ok=True)
            (img_dir / f"{i:03d}.png").write_bytes(png_bytes(image))
            if defect != "good":
                gt_dir = tmp / "ground_truth" / defect
                gt_dir.mkdir(parents=True, exist_ok=True)
                (gt_dir / f"{i:03d}_mask.png").write_bytes(png_bytes(mask))
        (tmp / META_FILE).write_text(json.dumps({**params, "name": name}, indent=2) + "\n")

    build_once(target, build, verify=False)  # data: edits are the user's, read as any data's
    meta_path = target / META_FILE
    if meta_path.is_file():
        found = json.loads(meta_path.read_text())
        diff = {k: (found.get(k), v) for k, v in params.items() if found.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}={old} (wanted {new})" for k, (old, new) in diff.items())
            raise UserError(
                f"synthetic data at {target} was generated with other settings: {detail} — delete that folder "
                f"to regenerate it, or point data.root somewhere else"
            )
    return target
