"""DCGAN at 96x96: transposed-conv generator (BatchNorm) and strided-conv discriminator (spectral norm).

With the defaults: G maps a 50-d latent to 512x6x6, then upsamples 512->512->256->128->64 and ends in a
3x3 conv + tanh; D is a 3x3 conv + LeakyReLU, then downsamples 64->128->256->512->1024 and ends in a 6x6
conv. Other resolutions work too: the first map is ``resolution / 2^k`` for the largest k leaving 4..7
pixels (96 -> 6x6, 64 -> 4x4, 24 -> 6x6, 16 -> 4x4).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from pokediff.gan.layers import maybe_sn


def start_size(resolution: int) -> tuple[int, int]:
    """(size of the first feature map, number of 2x upsamplings to reach ``resolution``)."""
    size, doublings = resolution, 0
    while size % 2 == 0 and size // 2 >= 4:
        size, doublings = size // 2, doublings + 1
    if doublings < 1 or size > 7:
        raise ValueError(f"dcgan: resolution {resolution} must be (4..7) x 2^k with k >= 1, e.g. 96, 64, 48, 32")
    return size, doublings


def generator_channels(doublings: int, base: int, cap: int) -> list[int]:
    """Channels at each size, from the 6x6 map to the full resolution (halving towards the output)."""
    return [min(base * 2 ** (doublings - i), cap) for i in range(doublings + 1)]


def discriminator_channels(doublings: int, base: int, cap: int) -> list[int]:
    return [min(base * 2**i, cap) for i in range(doublings + 1)]


def build_dcgan_generator_body(in_dim, resolution, base, cap, dropout) -> nn.Sequential:
    first, doublings = start_size(resolution)
    chans = generator_channels(doublings, base, cap)
    layers = [
        nn.ConvTranspose2d(in_dim, chans[0], first, 1, 0, bias=False),
        nn.BatchNorm2d(chans[0]),
        nn.ReLU(),
    ]
    for c_in, c_out in zip(chans[:-1], chans[1:]):
        layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    layers += [nn.Conv2d(chans[-1], 3, 3, padding=1), nn.Tanh()]
    return nn.Sequential(*layers)


def build_dcgan_discriminator_features(resolution, base, cap, use_sn) -> tuple[nn.Sequential, int]:
    """Everything up to (not including) the final 6x6 conv; returns the module and its channel count."""
    _, doublings = start_size(resolution)
    chans = discriminator_channels(doublings, base, cap)
    layers = [maybe_sn(nn.Conv2d(3, chans[0], 3, padding=1), use_sn), nn.LeakyReLU(0.2)]
    for c_in, c_out in zip(chans[:-1], chans[1:]):
        layers += [maybe_sn(nn.Conv2d(c_in, c_out, 4, 2, 1), use_sn), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers), chans[-1]


class DCGANGenerator(ModelMixin, ConfigMixin):
    is_conditional = False

    @register_to_config
    def __init__(self, resolution=96, latent_dim=50, base_channels=64, max_channels=512, dropout=0.0):
        super().__init__()
        self.net = build_dcgan_generator_body(latent_dim, resolution, base_channels, max_channels, dropout)

    def forward(self, z: torch.Tensor, class_labels=None) -> torch.Tensor:
        return self.net(z.view(z.shape[0], -1, 1, 1))


class DCGANDiscriminator(ModelMixin, ConfigMixin):
    is_conditional = False

    @register_to_config
    def __init__(self, resolution=96, base_channels=64, max_channels=1024, spectral_norm=True):
        super().__init__()
        self.features, channels = build_dcgan_discriminator_features(
            resolution, base_channels, max_channels, spectral_norm
        )
        self.head = maybe_sn(nn.Conv2d(channels, 1, start_size(resolution)[0]), spectral_norm)

    def forward(self, x, class_labels=None, return_features=False):
        h = self.features(x)
        logits = self.head(h).flatten()
        return (logits, h.mean(dim=(2, 3))) if return_features else logits
