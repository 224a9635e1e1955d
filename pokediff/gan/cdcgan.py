"""Conditional DCGAN on the primary type: the type embedding is concatenated to the noise in G, and D is
a projection discriminator (Miyato & Koyama 2018): score = head(h) + <embed(y), sum-pooled h>, or
(``model.discriminator=n_plus_one``, PokéGAN's next step) a classifier into the N types plus "fake"."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from pokediff.gan.dcgan import build_dcgan_discriminator_features, build_dcgan_generator_body, start_size
from pokediff.gan.layers import maybe_sn


def _check_labels(class_labels, batch: int, num_classes: int, who: str) -> torch.Tensor:
    if class_labels is None:
        raise ValueError(f"{who} is conditional: pass class_labels (type ids, shape ({batch},))")
    if class_labels.shape != (batch,):
        raise ValueError(f"{who}: class_labels must have shape ({batch},), got {tuple(class_labels.shape)}")
    if class_labels.numel() and (int(class_labels.min()) < 0 or int(class_labels.max()) >= num_classes):
        raise ValueError(f"{who}: class_labels must be in [0, {num_classes}), got {class_labels.tolist()}")
    return class_labels


class ConditionalDCGANGenerator(ModelMixin, ConfigMixin):
    is_conditional = True

    @register_to_config
    def __init__(
        self,
        resolution=96,
        latent_dim=50,
        base_channels=64,
        max_channels=512,
        dropout=0.0,
        num_classes=18,
        class_embed_dim=16,
    ):
        super().__init__()
        self.class_embedding = nn.Embedding(num_classes, class_embed_dim)
        self.net = build_dcgan_generator_body(
            latent_dim + class_embed_dim, resolution, base_channels, max_channels, dropout
        )

    def forward(self, z: torch.Tensor, class_labels=None) -> torch.Tensor:
        labels = _check_labels(class_labels, z.shape[0], self.config.num_classes, "ConditionalDCGANGenerator")
        inputs = torch.cat([z.view(z.shape[0], -1), self.class_embedding(labels)], dim=1)
        return self.net(inputs[:, :, None, None])


class ProjectionDiscriminator(ModelMixin, ConfigMixin):
    is_conditional = True

    @register_to_config
    def __init__(self, resolution=96, base_channels=64, max_channels=1024, spectral_norm=True, num_classes=18):
        super().__init__()
        self.features, channels = build_dcgan_discriminator_features(
            resolution, base_channels, max_channels, spectral_norm
        )
        self.head = maybe_sn(nn.Conv2d(channels, 1, start_size(resolution)[0]), spectral_norm)
        self.class_projection = maybe_sn(nn.Embedding(num_classes, channels), spectral_norm)

    def forward(self, x, class_labels=None, return_features=False):
        labels = _check_labels(class_labels, x.shape[0], self.config.num_classes, "ProjectionDiscriminator")
        h = self.features(x)
        pooled = h.sum(dim=(2, 3))
        logits = self.head(h).flatten() + (self.class_projection(labels) * pooled).sum(dim=1)
        return (logits, h.mean(dim=(2, 3))) if return_features else logits


class NPlusOneDiscriminator(ModelMixin, ConfigMixin):
    """A classifier into ``num_classes`` types plus one "fake" class (the last logit): real sprites are
    trained toward their type, generated ones toward "fake", and G toward the type it was asked for (the
    losses are in :mod:`pokediff.gan.losses`). The image alone decides; ``class_labels`` are only checked."""

    is_conditional = True

    @register_to_config
    def __init__(self, resolution=96, base_channels=64, max_channels=1024, spectral_norm=True, num_classes=18):
        super().__init__()
        self.features, channels = build_dcgan_discriminator_features(
            resolution, base_channels, max_channels, spectral_norm
        )
        self.head = maybe_sn(nn.Conv2d(channels, num_classes + 1, start_size(resolution)[0]), spectral_norm)

    def forward(self, x, class_labels=None, return_features=False):
        if class_labels is not None:
            _check_labels(class_labels, x.shape[0], self.config.num_classes, "NPlusOneDiscriminator")
        h = self.features(x)
        logits = self.head(h).flatten(1)  # (B, num_classes + 1)
        return (logits, h.mean(dim=(2, 3))) if return_features else logits
