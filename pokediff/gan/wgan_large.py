"""Large WGAN-GP: Upsample+Conv generator (transposed conv only for 1x1 -> 4x4) with a residual block
after each stage, critic with spectral norm on every conv, LayerNorm + LeakyReLU residual blocks, and
self-attention at ``attention_resolution`` in both networks. Trained with TTUR and an EMA of G."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from pokediff.gan.layers import (
    CriticResBlock,
    GeneratorResBlock,
    SelfAttention2d,
    layer_norm_2d,
    maybe_sn,
    num_doublings,
)

START_SIZE = 4


class WGANLargeGenerator(ModelMixin, ConfigMixin):
    is_conditional = False

    @register_to_config
    def __init__(self, resolution=64, latent_dim=128, base_channels=96, max_channels=768, attention_resolution=32):
        super().__init__()
        doublings = num_doublings(resolution, START_SIZE, "wgan_large")
        chans = [min(base_channels * 2 ** (doublings - i), max_channels) for i in range(doublings + 1)]
        layers = [
            nn.ConvTranspose2d(latent_dim, chans[0], START_SIZE, 1, 0, bias=False),
            nn.BatchNorm2d(chans[0]),
            nn.ReLU(),
            GeneratorResBlock(chans[0]),
        ]
        size = START_SIZE
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            size *= 2
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                GeneratorResBlock(c_out),
            ]
            if size == attention_resolution:
                layers.append(SelfAttention2d(c_out))
        layers += [nn.BatchNorm2d(chans[-1]), nn.ReLU(), nn.Conv2d(chans[-1], 3, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, class_labels=None) -> torch.Tensor:
        return self.net(z.view(z.shape[0], -1, 1, 1))


class WGANLargeCritic(ModelMixin, ConfigMixin):
    is_conditional = False

    @register_to_config
    def __init__(self, resolution=64, base_channels=96, max_channels=768, attention_resolution=32, spectral_norm=True):
        super().__init__()
        doublings = num_doublings(resolution, START_SIZE, "wgan_large")
        chans = [min(base_channels * 2**i, max_channels) for i in range(doublings + 1)]
        layers = [maybe_sn(nn.Conv2d(3, chans[0], 3, padding=1), spectral_norm), nn.LeakyReLU(0.2)]
        size = resolution
        if size == attention_resolution:
            layers.append(SelfAttention2d(chans[0], spectral_norm))
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            size //= 2
            layers += [
                maybe_sn(nn.Conv2d(c_in, c_out, 4, 2, 1), spectral_norm),
                layer_norm_2d(c_out),
                nn.LeakyReLU(0.2),
                CriticResBlock(c_out, spectral_norm),
            ]
            if size == attention_resolution:
                layers.append(SelfAttention2d(c_out, spectral_norm))
        self.features = nn.Sequential(*layers)
        self.head = maybe_sn(nn.Conv2d(chans[-1], 1, START_SIZE), spectral_norm)

    def forward(self, x, class_labels=None, return_features=False):
        h = self.features(x)
        scores = self.head(h).flatten()
        return (scores, h.mean(dim=(2, 3))) if return_features else scores
