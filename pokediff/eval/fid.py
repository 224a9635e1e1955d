"""FID and KID on feature vectors, through torchmetrics, plus batched feature extraction.

Features are extracted once (and the real split's are cached, see ``reference_stats``), so the torchmetrics
metrics are given an identity ``feature`` module and fed feature vectors instead of images.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm


class PrecomputedFeatures(nn.Module):
    """The torchmetrics ``feature`` network for inputs that already are feature vectors."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@torch.no_grad()
def extract_features(
    images: torch.Tensor | Iterable[torch.Tensor],
    feature_net: nn.Module,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    desc: str = "features",
    progress: bool = True,
    total: int | None = None,
) -> torch.Tensor:
    """Features (N, D) float64 on the CPU of images in [0, 1], given as one tensor or an iterable of batches
    (``total``: their number, for the progress bar)."""
    if device is None:
        param = next(feature_net.parameters(), None)
        device = param.device if param is not None else "cpu"
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
        batches = images.split(batch_size)
        total = len(batches)
    else:
        batches = images
    out = []
    for batch in tqdm(batches, desc=desc, total=total, disable=not progress, leave=False):
        out.append(feature_net(batch.to(device)).double().cpu())
    if not out:
        raise ValueError("no images to extract features from")
    return torch.cat(out)


def _check_pair(real: torch.Tensor, fake: torch.Tensor, metric: str, minimum: int) -> None:
    for name, feats in (("real", real), ("generated", fake)):
        if feats.ndim != 2:
            raise ValueError(f"{metric}: {name} features must be (N, D), got shape {tuple(feats.shape)}")
        if feats.shape[0] < minimum:
            raise ValueError(f"{metric} needs at least {minimum} {name} images, got {feats.shape[0]}")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"{metric}: feature sizes differ (real {real.shape[1]}, generated {fake.shape[1]})")


def frechet_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """FID between two sets of feature vectors (float64 Gaussians; torchmetrics' eigenvalue form)."""
    _check_pair(real_features, fake_features, "FID", minimum=2)
    # sync_on_compute off: the features given are all there is; in a multi-process run (the stage-3 gate runs on the
    # main process only) torchmetrics would otherwise wait for the other processes' features forever
    metric = FrechetInceptionDistance(
        feature=PrecomputedFeatures(real_features.shape[1]), reset_real_features=False, sync_on_compute=False
    )
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    # tiny negative values are round-off of a zero distance
    return max(float(metric.compute()), 0.0)


def kernel_inception_distance(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float, int]:
    """Unbiased KID (cubic polynomial-kernel MMD^2): (mean, std over subsets, subset size used).

    ``subset_size`` is lowered to the smaller set's size, so small evaluations still work.
    """
    _check_pair(real_features, fake_features, "KID", minimum=2)
    size = min(subset_size, real_features.shape[0], fake_features.shape[0])
    with warnings.catch_warnings():
        # the "saves all extracted features" memory warning: here they are held anyway
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=PrecomputedFeatures(real_features.shape[1]),
            subsets=subsets,
            subset_size=size,
            reset_real_features=False,
            sync_on_compute=False,  # as in frechet_distance
        )
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    # torchmetrics draws the subsets with the global RNG: fork it so results are repeatable
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size
