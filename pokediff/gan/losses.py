"""GAN losses and the tricks around them: gradient penalty, label smoothing / flips, feature matching."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """WGAN-GP term E[(||grad_x critic(x)||_2 - 1)^2] at random points between real and fake samples.

    ``critic`` maps a batch to one score per sample (class labels etc. bound by the caller). The graph is
    kept so that the penalty trains the critic.
    """
    if real.shape != fake.shape:
        raise ValueError(f"gradient_penalty: real {tuple(real.shape)} and fake {tuple(fake.shape)} differ in shape")
    mix = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), generator=generator, device="cpu").to(real)
    points = torch.lerp(fake.detach(), real.detach(), mix).requires_grad_(True)
    scores = critic(points)
    (grads,) = torch.autograd.grad(scores.sum(), points, create_graph=True)
    return (grads.flatten(1).norm(2, dim=1) - 1.0).pow(2).mean()


def discriminator_targets(
    batch: int,
    real: bool,
    smoothing: bool,
    real_range=(0.7, 1.0),
    fake_range=(0.0, 0.3),
    flip_prob: float = 0.0,
    device=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BCE targets for D: 1/0, or drawn uniformly from the real/fake ranges with ``smoothing``; a
    ``flip_prob`` share of them is swapped to the other side (noisy labels keep D from getting certain)."""

    def draw(rng_range, hard):
        if not smoothing:
            return torch.full((batch,), float(hard))
        low, high = rng_range
        return low + (high - low) * torch.rand(batch, generator=generator)

    own = draw(real_range if real else fake_range, 1.0 if real else 0.0)
    if flip_prob > 0:
        other = draw(fake_range if real else real_range, 0.0 if real else 1.0)
        flip = torch.rand(batch, generator=generator) < flip_prob
        own = torch.where(flip, other, own)
    return own.to(device)


def bce_discriminator_loss(logits_real, logits_fake, targets_real, targets_fake) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits_real, targets_real) + F.binary_cross_entropy_with_logits(
        logits_fake, targets_fake
    )


def bce_generator_loss(logits_fake) -> torch.Tensor:
    """Non-saturating G loss: -log D(G(z)) (strong gradients while D still wins)."""
    return F.binary_cross_entropy_with_logits(logits_fake, torch.ones_like(logits_fake))


def wasserstein_critic_loss(scores_real, scores_fake, drift: float = 0.0) -> torch.Tensor:
    loss = scores_fake.mean() - scores_real.mean()
    if drift > 0:
        loss = loss + drift * scores_real.pow(2).mean()
    return loss


def wasserstein_generator_loss(scores_fake) -> torch.Tensor:
    return -scores_fake.mean()


def feature_matching_loss(features_real: torch.Tensor, features_fake: torch.Tensor) -> torch.Tensor:
    """Squared distance between the batch-mean D features of real and generated images (Salimans et al.)."""
    return F.mse_loss(features_fake.mean(dim=0), features_real.detach().mean(dim=0))


# --- N+1-class discriminator (types + "fake"; logits (B, N+1), the last one "fake")
def n_plus_one_targets(class_labels: torch.Tensor, realness: torch.Tensor, num_logits: int) -> torch.Tensor:
    """Soft targets over the N+1 classes: ``realness`` (the binary target of
    :func:`discriminator_targets`, 1 = real) on the image's type, the rest on "fake". Hard 1/0 targets give
    plain cross-entropy toward the type / toward "fake"; label smoothing and flips carry over unchanged."""
    realness = realness.to(class_labels.device, torch.float)
    targets = torch.zeros(class_labels.shape[0], num_logits, device=class_labels.device)
    targets[torch.arange(class_labels.shape[0], device=class_labels.device), class_labels] = realness
    targets[:, -1] = 1.0 - realness
    return targets


def n_plus_one_discriminator_loss(logits_real, logits_fake, class_labels, targets_real, targets_fake):
    num_logits = logits_real.shape[1]
    return F.cross_entropy(logits_real, n_plus_one_targets(class_labels, targets_real, num_logits)) + F.cross_entropy(
        logits_fake, n_plus_one_targets(class_labels, targets_fake, num_logits)
    )


def n_plus_one_generator_loss(logits_fake, class_labels) -> torch.Tensor:
    """G wants its image classified as the type it was asked for."""
    return F.cross_entropy(logits_fake, class_labels)


def n_plus_one_realness(logits: torch.Tensor) -> torch.Tensor:
    """log P(any type) - log P(fake): the binary real/fake logit hidden in N+1 logits (for logging, GP)."""
    return torch.logsumexp(logits[:, :-1], dim=1) - logits[:, -1]
