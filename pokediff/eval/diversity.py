"""Diversity: mean pairwise perceptual distance among images generated for the same prompt."""

from __future__ import annotations

import itertools
from typing import Sequence

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
