"""PatchGAN discriminator for stage 1's adversarial term (as Stable Diffusion's VAE, after pix2pix)."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class PatchDiscriminator(ModelMixin, ConfigMixin):
    """Real-vs-reconstruction logits on overlapping patches: (B, 3, H, W) in [-1, 1] -> (B, 1, h, w).

    Strided 4x4 convolutions (``num_downsamples`` halvings), then two stride-1 layers, as pix2pix's
    NLayerDiscriminator. Spectral norm instead of batch norm: the hinge loss stays stable with batches of 16 and
    without running statistics to carry between real and fake.
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, base_channels: int = 32, num_downsamples: int = 2):
        super().__init__()
        layers, channels = [], in_channels
        for i in range(num_downsamples):
            out = base_channels * 2**i
            layers += [spectral_norm(nn.Conv2d(channels, out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            channels = out
        layers += [spectral_norm(nn.Conv2d(channels, channels * 2, 4, padding=1)), nn.LeakyReLU(0.2)]
        layers += [spectral_norm(nn.Conv2d(channels * 2, 1, 4, padding=1))]
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)
