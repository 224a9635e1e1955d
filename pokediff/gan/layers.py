"""Small building blocks shared by the GAN models."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def maybe_sn(module: nn.Module, enabled: bool) -> nn.Module:
    return spectral_norm(module) if enabled else module


def layer_norm_2d(channels: int) -> nn.Module:
    # GroupNorm with one group normalises over (C, H, W) per sample: LayerNorm for feature maps that
    # does not tie the module to one spatial size. Per-sample, so it keeps the gradient penalty valid.
    return nn.GroupNorm(1, channels)


def num_doublings(resolution: int, start: int, model: str) -> int:
    """How many 2x steps take ``start`` to ``resolution``; errors name the model and the valid sizes."""
    ratio = resolution / start
    steps = round(math.log2(ratio)) if ratio >= 1 else -1
    if steps < 1 or start * 2**steps != resolution:
        valid = ", ".join(str(start * 2**k) for k in range(1, 6))
        raise ValueError(f"{model}: resolution {resolution} is not {start}x2^k (k >= 1); use one of {valid}, ...")
    return steps


class SelfAttention2d(nn.Module):
    """SAGAN self-attention; ``gamma`` starts at 0 so the block begins as the identity."""

    def __init__(self, channels: int, use_spectral_norm: bool = False):
        super().__init__()
        inner = max(channels // 8, 1)
        self.query = maybe_sn(nn.Conv2d(channels, inner, 1), use_spectral_norm)
        self.key = maybe_sn(nn.Conv2d(channels, inner, 1), use_spectral_norm)
        self.value = maybe_sn(nn.Conv2d(channels, channels, 1), use_spectral_norm)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, HW, inner)
        k = self.key(x).flatten(2).transpose(1, 2)
        v = self.value(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        attended = nn.functional.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))
        return x + self.gamma * attended.squeeze(1).transpose(1, 2).reshape(b, c, h, w)


class GeneratorResBlock(nn.Module):
    """BatchNorm-ReLU-conv twice, plus the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x):
        return x + self.body(x)


class CriticResBlock(nn.Module):
    """LayerNorm-LeakyReLU-conv twice (spectral norm optional), plus the input."""

    def __init__(self, channels: int, use_spectral_norm: bool = True):
        super().__init__()
        self.body = nn.Sequential(
            layer_norm_2d(channels),
            nn.LeakyReLU(0.2),
            maybe_sn(nn.Conv2d(channels, channels, 3, padding=1), use_spectral_norm),
            layer_norm_2d(channels),
            nn.LeakyReLU(0.2),
            maybe_sn(nn.Conv2d(channels, channels, 3, padding=1), use_spectral_norm),
        )

    def forward(self, x):
        return x + self.body(x)
