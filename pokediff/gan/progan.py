"""Progressive GAN (Karras et al. 2018) with equalized learning rate, pixel norm and minibatch stddev.

Both networks are built up to ``resolution`` from a 4x4 base; ``forward(..., resolution=r, alpha=a)``
runs only the blocks up to ``r`` and, while ``a < 1``, blends the newest block with the upsampled (G) or
downsampled (D) output of the previous resolution: the fade-in. The training schedule (which stage at
which step) lives in :func:`progan_stage` (grow, optionally restart) and :func:`progan_phase` (PokéGAN's
resolution cycling: phases that go down as well as up, each with its own learning rate).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from pokediff.gan.layers import num_doublings


class EqualizedConv2d(nn.Module):
    """Weights drawn from N(0, 1) and scaled by He's constant at run time, so Adam's per-parameter step
    sizes treat every layer alike (the 'equalized learning rate')."""

    def __init__(self, c_in, c_out, kernel_size, padding=0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.scale = math.sqrt(2.0 / (c_in * kernel_size * kernel_size))
        self.padding = padding

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class EqualizedLinear(nn.Module):
    def __init__(self, d_in, d_out, gain=math.sqrt(2.0)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.scale = gain / math.sqrt(d_in)

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


def minibatch_stddev(x: torch.Tensor) -> torch.Tensor:
    """Append the batch's mean feature stddev as one channel: lets D see (lack of) variety."""
    std = x.std(dim=0, unbiased=False).mean().expand(x.shape[0], 1, x.shape[2], x.shape[3])
    return torch.cat([x, std], dim=1)


def progan_channels(size: int, resolution: int, base: int, cap: int) -> int:
    return min(base * resolution // size, cap)


def progan_stage(step: int, resolutions: list[int], steps_per_stage: int, fade_in: float, cycle: bool):
    """(resolution, alpha) at a generator step. Each stage lasts ``steps_per_stage``; a stage that adds a
    block fades it in over its first ``fade_in`` fraction. With ``cycle`` the schedule restarts at the
    first resolution after the last one (the blocks are trained by then, so no fade-in)."""
    index = step // steps_per_stage
    if index >= len(resolutions):
        if not cycle:
            return resolutions[-1], 1.0
        return resolutions[index % len(resolutions)], 1.0
    alpha = 1.0
    if index > 0 and fade_in > 0:
        alpha = min(1.0, (step - index * steps_per_stage) / (fade_in * steps_per_stage))
    return resolutions[index], alpha


def progan_phase(step: int, phases: list, fade_in: float, cycle: bool) -> tuple[int, float, float]:
    """(resolution, alpha, lr) at a generator step of a PokéGAN-style schedule: ``phases`` of
    (resolution, steps, lr) run in order, going down as well as up. A phase whose resolution is above the
    previous phase's fades its new block in over its first ``fade_in`` fraction; going down needs no
    fade-in (the smaller blocks are trained). After the last phase: stay there, or with ``cycle`` start
    again at the first (fading in if that goes up)."""
    total = sum(steps for _, steps, _ in phases)
    if step >= total and not cycle:
        resolution, _, lr = phases[-1]
        return resolution, 1.0, lr
    wrapped = step >= total
    step %= total
    start = 0
    for index, (resolution, steps, lr) in enumerate(phases):
        if step < start + steps:
            break
        start += steps
    previous = phases[index - 1][0] if index > 0 else (phases[-1][0] if wrapped else resolution)
    alpha = 1.0
    if resolution > previous and fade_in > 0:
        alpha = min(1.0, (step - start) / (fade_in * steps))
    return resolution, alpha, lr


class ProGANGenerator(ModelMixin, ConfigMixin):
    is_conditional = False

    @register_to_config
    def __init__(self, resolution=128, start_resolution=32, latent_dim=512, base_channels=64, max_channels=512):
        super().__init__()
        num_doublings(resolution, 4, "progan")
        num_doublings(start_resolution, 4, "progan (start_resolution)")
        if start_resolution > resolution:
            raise ValueError(f"progan: start_resolution {start_resolution} exceeds resolution {resolution}")
        ch = lambda s: progan_channels(s, resolution, base_channels, max_channels)  # noqa: E731
        self.input = EqualizedLinear(latent_dim, ch(4) * 16, gain=math.sqrt(2.0) / 4)
        self.input_conv = EqualizedConv2d(ch(4), ch(4), 3, padding=1)
        self.blocks = nn.ModuleDict()
        self.to_rgb = nn.ModuleDict()
        size = 4
        while size < resolution:
            size *= 2
            self.blocks[str(size)] = nn.ModuleList(
                [
                    EqualizedConv2d(ch(size // 2), ch(size), 3, padding=1),
                    EqualizedConv2d(ch(size), ch(size), 3, padding=1),
                ]
            )
        size = start_resolution
        while size <= resolution:
            self.to_rgb[str(size)] = EqualizedConv2d(ch(size), 3, 1)
            size *= 2

    def _check(self, resolution):
        if resolution is None:
            return self.config.resolution
        if str(resolution) not in self.to_rgb:
            raise ValueError(
                f"ProGANGenerator: resolution {resolution} is not a stage between "
                f"{self.config.start_resolution} and {self.config.resolution}"
            )
        return resolution

    def forward(self, z: torch.Tensor, class_labels=None, resolution=None, alpha: float = 1.0) -> torch.Tensor:
        resolution = self._check(resolution)
        h = self.input(pixel_norm(z.view(z.shape[0], -1))).view(z.shape[0], -1, 4, 4)
        h = pixel_norm(F.leaky_relu(self.input_conv(pixel_norm(F.leaky_relu(h, 0.2))), 0.2))
        previous = h
        size = 4
        while size < resolution:
            size *= 2
            previous = h
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            for conv in self.blocks[str(size)]:
                h = pixel_norm(F.leaky_relu(conv(h), 0.2))
        rgb = self.to_rgb[str(resolution)](h)
        if alpha < 1.0 and resolution > self.config.start_resolution:
            old = F.interpolate(self.to_rgb[str(resolution // 2)](previous), scale_factor=2, mode="nearest")
            rgb = torch.lerp(old, rgb, alpha)
        return rgb


class ProGANDiscriminator(ModelMixin, ConfigMixin):
    is_conditional = False

    @register_to_config
    def __init__(self, resolution=128, start_resolution=32, base_channels=64, max_channels=512):
        super().__init__()
        num_doublings(resolution, 4, "progan")
        ch = lambda s: progan_channels(s, resolution, base_channels, max_channels)  # noqa: E731
        self.from_rgb = nn.ModuleDict()
        self.blocks = nn.ModuleDict()
        size = start_resolution
        while size <= resolution:
            self.from_rgb[str(size)] = EqualizedConv2d(3, ch(size), 1)
            size *= 2
        size = resolution
        while size > 4:
            self.blocks[str(size)] = nn.ModuleList(
                [
                    EqualizedConv2d(ch(size), ch(size), 3, padding=1),
                    EqualizedConv2d(ch(size), ch(size // 2), 3, padding=1),
                ]
            )
            size //= 2
        self.final_conv = EqualizedConv2d(ch(4) + 1, ch(4), 3, padding=1)
        self.final_dense = EqualizedConv2d(ch(4), ch(4), 4)
        self.head = EqualizedLinear(ch(4), 1, gain=1.0)

    def _block(self, h, size):
        for conv in self.blocks[str(size)]:
            h = F.leaky_relu(conv(h), 0.2)
        return F.avg_pool2d(h, 2)

    def forward(self, x, class_labels=None, return_features=False, alpha: float = 1.0, resolution=None):
        size = x.shape[-1]
        if resolution is not None and resolution != size:
            raise ValueError(f"ProGANDiscriminator: images are {size}px but resolution={resolution} was given")
        if str(size) not in self.from_rgb:
            raise ValueError(
                f"ProGANDiscriminator: image size {size} is not a stage between "
                f"{self.config.start_resolution} and {self.config.resolution}"
            )
        h = F.leaky_relu(self.from_rgb[str(size)](x), 0.2)
        if size > 4:
            h = self._block(h, size)
            if alpha < 1.0 and x.shape[-1] > self.config.start_resolution:
                old = F.leaky_relu(self.from_rgb[str(size // 2)](F.avg_pool2d(x, 2)), 0.2)
                h = torch.lerp(old, h, alpha)
            size //= 2
        while size > 4:
            h = self._block(h, size)
            size //= 2
        h = F.leaky_relu(self.final_conv(minibatch_stddev(h)), 0.2)
        features = F.leaky_relu(self.final_dense(h), 0.2).flatten(1)
        scores = self.head(features).flatten()
        return (scores, features) if return_features else scores
