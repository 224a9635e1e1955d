"""Small WGAN-GP at 64x64: transposed-conv generator with BatchNorm, critic with LayerNorm (BatchNorm
would couple the samples of a batch and break the per-sample gradient penalty)."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from pokediff.gan.layers import layer_norm_2d, num_doublings

START_SIZE = 4


class WGANSmallGenerator(ModelMixin, ConfigMixin):
    is_conditional = False

    @register_to_config
    def __init__(self, resolution=64, latent_dim=128, base_channels=64, max_channels=512):
        super().__init__()
        doublings = num_doublings(resolution, START_SIZE, "wgan_small")
        # channels at 4x4, 8x8, ... up to resolution/2; the last transposed conv writes RGB.
        chans = [min(base_channels * 2 ** (doublings - 1 - i), max_channels) for i in range(doublings)]
        layers = [
            nn.ConvTranspose2d(latent_dim, chans[0], START_SIZE, 1, 0, bias=False),
            nn.BatchNorm2d(chans[0]),
            nn.ReLU(),
        ]
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        layers += [nn.ConvTranspose2d(chans[-1], 3, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, class_labels=None) -> torch.Tensor:
        return self.net(z.view(z.shape[0], -1, 1, 1))


class WGANSmallCritic(ModelMixin, ConfigMixin):
    is_conditional = False

    @register_to_config
    def __init__(self, resolution=64, base_channels=64, max_channels=512):
        super().__init__()
        doublings = num_doublings(resolution, START_SIZE, "wgan_small")
        chans = [min(base_channels * 2**i, max_channels) for i in range(doublings)]
        layers = [nn.Conv2d(3, chans[0], 4, 2, 1), nn.LeakyReLU(0.2)]  # no norm on the RGB input layer
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), layer_norm_2d(c_out), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(chans[-1], 1, START_SIZE)

    def forward(self, x, class_labels=None, return_features=False):
        h = self.features(x)
        scores = self.head(h).flatten()
        return (scores, h.mean(dim=(2, 3))) if return_features else scores
