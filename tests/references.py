"""Independent references the tests compare the package against (they import nothing from it).

- Metrics, written from the definitions with plain Python/numpy loops: AUROC as the Mann-Whitney pairwise
  probability, AP by looping over thresholds, AUPRO with an own BFS flood fill and an explicit loop over
  every distinct threshold.
- TransFusion inference one image at a time, written out step by step as the official evaluation loop does
  (``utils/EvaluationUtils.py:9-28, 42`` at 4e8e961: t = T-2 .. 1, the sum of the masks divided by T-1; with
  ``model.reverse == "all_steps"`` from t = T-1), with its own loop, schedule, accumulation and smoothing
  (``avg_pool2d``), independent of the batched path.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
import torch.nn.functional as F


def ref_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score_pos > score_neg) + 1/2 P(tie), over all positive/negative pairs."""
    pos = scores[labels]
    neg = scores[~labels]
    wins = 0.0
    for p in pos:
        wins += float(np.sum(p > neg)) + 0.5 * float(np.sum(p == neg))
    return wins / (len(pos) * len(neg))


def ref_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """sum over distinct thresholds (descending) of (R_n - R_{n-1}) * P_n."""
    n_pos = int(labels.sum())
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        sel = scores >= t
        tp = int(np.sum(sel & labels))
        fp = int(np.sum(sel & ~labels))
        recall = tp / n_pos
        ap += (recall - prev_recall) * (tp / (tp + fp))
        prev_recall = recall
    return ap


def ref_components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of one 2-D mask by breadth-first flood fill."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y in range(h):
        for x in range(w):
            if not mask[y, x] or seen[y, x]:
                continue
            comp, queue = [], deque([(y, x)])
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                comp.append((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
            comps.append(comp)
    return comps


def ref_pro_points(preds: np.ndarray, target: np.ndarray) -> list[tuple[float, float]]:
    """(FPR, PRO) at every distinct threshold, with (0,0) first and (1,1) last."""
    target = target.astype(bool)
    regions = []
    for i in range(preds.shape[0]):
        for comp in ref_components(target[i]):
            m = np.zeros_like(target[i])
            for y, x in comp:
                m[y, x] = True
            regions.append((i, m))
    normal = ~target
    n_normal = int(normal.sum())
    points = [(0.0, 0.0)]
    for t in sorted(set(preds.ravel().tolist()), reverse=True):
        pred = preds >= t
        fpr = int(np.sum(pred & normal)) / n_normal
        overlaps = [float(np.sum(pred[i] & m)) / float(np.sum(m)) for i, m in regions]
        points.append((fpr, sum(overlaps) / len(overlaps)))
    points.append((1.0, 1.0))
    return points


def ref_pro_points_images(maps: list[np.ndarray], masks: list[np.ndarray]) -> list[tuple[float, float]]:
    """`ref_pro_points` for images of different sizes: (FPR, PRO) at every distinct threshold, regions per
    image, FPR over the normal pixels of all images."""
    regions = []
    for i, mask in enumerate(masks):
        for comp in ref_components(mask.astype(bool)):
            m = np.zeros(mask.shape, bool)
            for y, x in comp:
                m[y, x] = True
            regions.append((i, m))
    n_normal = sum(int((m == 0).sum()) for m in masks)
    points = [(0.0, 0.0)]
    for t in sorted({float(v) for a in maps for v in a.ravel()}, reverse=True):
        fp = sum(int(((a >= t) & (m == 0)).sum()) for a, m in zip(maps, masks, strict=True))
        pro = [float(((maps[i] >= t) & r).sum()) / float(r.sum()) for i, r in regions]
        points.append((fp / n_normal, sum(pro) / len(pro)))
    points.append((1.0, 1.0))
    return points


def ref_aupro_from_points(points: list[tuple[float, float]], limit: float) -> float:
    """Cut the curve at exactly ``limit`` (linear interpolation), trapezoid area, / limit."""
    xs, ys = [], []
    for k, (x, y) in enumerate(points):
        if x <= limit:
            xs.append(x)
            ys.append(y)
        else:
            x0, y0 = points[k - 1]
            xs.append(limit)
            ys.append(y0 + (y - y0) * (limit - x0) / (x - x0))
            break
    area = 0.0
    for k in range(1, len(xs)):
        area += (xs[k] - xs[k - 1]) * (ys[k] + ys[k - 1]) / 2.0
    return area / limit


@torch.no_grad()
def transfusion_one_by_one(model, image: torch.Tensor) -> torch.Tensor:
    """Anomaly maps ``[B,H,W]`` of a `TransFusionModel` for images in [0,1], one image at a time."""
    maps = []
    k = model.smoothing_kernel
    for i in range(image.shape[0]):
        img = image[i : i + 1]
        x = img * 2 - 1
        mask = torch.zeros_like(x[:, :1])
        probs = []
        betas = torch.linspace(0, 1, model.num_steps, dtype=x.dtype)
        n_calls = model.num_steps - 2 if model.reverse == "official" else model.num_steps - 1
        for step in reversed(range(1, n_calls + 1)):
            t = torch.tensor([step], device=x.device)
            noise, mean, logits = model.net(x, mask, t)
            p = torch.sigmoid(logits).to(x.dtype)
            probs.append(p)
            mask = torch.where(p > 0.5, torch.ones_like(p), torch.zeros_like(p))
            b_t, b_prev = betas[step], betas[step - 1]
            x = x - (b_t - b_prev) / b_t * mask * noise.to(x.dtype) + (b_t - b_prev) * mask * mean.to(x.dtype)
        disc = torch.stack(probs).sum(0)[:, 0] / (model.num_steps - 1)  # official: / T-1 whatever the calls
        recon = ((img.clamp(0, 1) - ((x + 1) / 2).clamp(0, 1)) ** 2).mean(1)
        if k > 1:
            disc = F.avg_pool2d(disc[None], k, stride=1, padding=k // 2, count_include_pad=True)[0]
            recon = F.avg_pool2d(recon[None], k, stride=1, padding=k // 2, count_include_pad=True)[0]
        maps.append(model.map_weight * disc + (1 - model.map_weight) * recon)
    return torch.cat(maps)
