"""Memorisation check: how close is each sample to its nearest training image?

Cosine similarity of the same features FID uses. Real held-out images give the natural level: a sample
much closer to a training image than any real held-out image is, is a likely copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nearest_neighbours(query: torch.Tensor, reference: torch.Tensor, exclude_self: bool = False):
    """(similarity, index) of each query row's most similar reference row (cosine).

    ``exclude_self``: query and reference are the same set; a row may not be its own neighbour.
    """
    if query.ndim != 2 or reference.ndim != 2 or query.shape[1] != reference.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D); got {tuple(query.shape)} and {tuple(reference.shape)}")
    if exclude_self and (len(reference) < 2 or query.shape != reference.shape):
        raise ValueError("exclude_self needs the same set (of at least 2 rows) as query and reference")
    sims = F.normalize(query.double(), dim=1) @ F.normalize(reference.double(), dim=1).T
    if exclude_self:
        sims.fill_diagonal_(float("-inf"))
    return sims.max(dim=1)


def memorization_metrics(
    fake: torch.Tensor,
    train: torch.Tensor,
    real: torch.Tensor,
    real_is_train: bool,
    train_names: list[str],
    top: int = 4,
) -> tuple[dict, list[dict]]:
    """Metrics and the ``top`` samples closest to a training image (sample index, file, similarity).

    ``real``: held-out real features for the natural level; with ``real_is_train`` (the train protocol) each
    training image's nearest *other* training image stands in.
    """
    fake_sim, fake_idx = nearest_neighbours(fake, train)
    real_sim, _ = nearest_neighbours(real, train, exclude_self=real_is_train)
    metrics = {
        "nn_train_similarity_mean": float(fake_sim.mean()),
        "nn_train_similarity_max": float(fake_sim.max()),
        "nn_train_similarity_real_mean": float(real_sim.mean()),
        "nn_train_similarity_real_max": float(real_sim.max()),
        # samples closer to a training image than the closest real held-out image is
        "nn_train_closer_than_real_max": float((fake_sim > real_sim.max()).double().mean()),
    }
    order = torch.argsort(fake_sim, descending=True)[:top]
    closest = [
        {"sample": int(i), "train_file": train_names[int(fake_idx[i])], "similarity": float(fake_sim[i])} for i in order
    ]
    return metrics, closest
