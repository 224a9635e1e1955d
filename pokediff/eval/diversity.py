"""Diversity: mean pairwise perceptual distance among images generated for the same prompt; and whether the seed or
the prompt sets a sample's silhouette (mask overlap, ``silhouette_overlap``)."""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def mean_pairwise_distance(images_0_1: torch.Tensor, perceptual: nn.Module, batch_size: int = 16) -> float:
    """Mean of ``perceptual(x_i, x_j)`` over all pairs i < j of images (N,3,H,W) in [0, 1] (N >= 2)."""
    if images_0_1.ndim != 4 or images_0_1.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(images_0_1.shape)}")
    n = images_0_1.shape[0]
    if n < 2:
        raise ValueError(f"pairwise diversity needs at least 2 images per prompt, got {n}")
    param = next(perceptual.parameters(), None)
    device = param.device if param is not None else images_0_1.device
    x = images_0_1.to(device) * 2 - 1
    pairs = list(itertools.combinations(range(n), 2))
    total = 0.0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        i = torch.tensor([p[0] for p in chunk], device=device)
        j = torch.tensor([p[1] for p in chunk], device=device)
        total += float(perceptual(x[i], x[j]).sum())
    return total / len(pairs)


def grouped_diversity(groups: Sequence[torch.Tensor], perceptual: nn.Module) -> dict:
    """Mean pairwise distance within each group (one prompt's samples), averaged over groups."""
    if not groups:
        raise ValueError("no sample groups to measure diversity on")
    per_group = [mean_pairwise_distance(g, perceptual) for g in groups]
    mean = sum(per_group) / len(per_group)
    std = (sum((v - mean) ** 2 for v in per_group) / len(per_group)) ** 0.5
    return {"mean": mean, "std": std, "num_groups": len(groups), "per_group": per_group}


def iou_matrix(masks: np.ndarray) -> np.ndarray:
    """Intersection over union of every pair of boolean masks (N, H, W) -> (N, N); two empty masks count as
    identical (IoU 1)."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    flat = masks.reshape(len(masks), -1).astype(np.float64)
    inter = flat @ flat.T
    area = flat.sum(axis=1)
    union = area[:, None] + area[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1.0), 1.0)


def mean_pairwise_iou(masks: np.ndarray) -> float:
    """Mean IoU of boolean masks (N >= 2, H, W) over all pairs i < j."""
    if masks.ndim != 3 or len(masks) < 2:
        raise ValueError(f"masks must be (N >= 2, H, W), got shape {masks.shape}")
    i, j = np.triu_indices(len(masks), k=1)
    return float(iou_matrix(masks)[i, j].mean())


def silhouette_overlap(masks: np.ndarray) -> dict:
    """Sprite masks (P prompts, S seeds, H, W), seed s the same for every prompt -> mean IoU of the pairs of samples
    that share the seed only (``same_seed``), the prompt only (``same_prompt``), or neither (``neither``: the
    overlap two of these samples have by chance, at their own size). A model whose seed sets the silhouette has
    ``same_seed`` well above ``neither``; one whose prompt sets it, ``same_prompt`` above ``neither``."""
    if masks.ndim != 4 or masks.shape[0] < 2 or masks.shape[1] < 2:
        raise ValueError(f"masks must be (P >= 2 prompts, S >= 2 seeds, H, W), got shape {masks.shape}")
    prompts, seeds = masks.shape[:2]
    iou = iou_matrix(masks.reshape(prompts * seeds, *masks.shape[2:]))
    prompt_of = np.repeat(np.arange(prompts), seeds)
    seed_of = np.tile(np.arange(seeds), prompts)
    same_prompt, same_seed = prompt_of[:, None] == prompt_of[None], seed_of[:, None] == seed_of[None]
    return {
        "same_seed": float(iou[same_seed & ~same_prompt].mean()),
        "same_prompt": float(iou[same_prompt & ~same_seed].mean()),
        "neither": float(iou[~same_prompt & ~same_seed].mean()),
    }
