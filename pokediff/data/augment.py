"""DiffAugment (Zhao et al., 2020): differentiable colour / translation / cutout for GAN training.

Pass the same ``generator`` state to augment real and fake batches with identical draws.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rand(shape, x, generator):
    return torch.rand(shape, generator=generator, device=generator.device if generator is not None else x.device).to(x)


def rand_brightness(x, generator=None):
    return x + (_rand((x.size(0), 1, 1, 1), x, generator) - 0.5)


def rand_saturation(x, generator=None):
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_rand((x.size(0), 1, 1, 1), x, generator) * 2) + mean


def rand_contrast(x, generator=None):
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_rand((x.size(0), 1, 1, 1), x, generator) + 0.5) + mean


def rand_translation(x, generator=None, ratio=0.125):
    b, _, h, w = x.shape
    shift_x, shift_y = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = (_rand((b, 1, 1), x, generator) * (2 * shift_x + 1)).long() - shift_x
    ty = (_rand((b, 1, 1), x, generator) * (2 * shift_y + 1)).long() - shift_y
    grid_b, grid_x, grid_y = torch.meshgrid(
        torch.arange(b, device=x.device),
        torch.arange(h, device=x.device),
        torch.arange(w, device=x.device),
        indexing="ij",
    )
    grid_x = torch.clamp(grid_x + tx + 1, 0, h + 1)
    grid_y = torch.clamp(grid_y + ty + 1, 0, w + 1)
    x_pad = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return x_pad.permute(0, 2, 3, 1).contiguous()[grid_b, grid_x, grid_y].permute(0, 3, 1, 2)


def rand_cutout(x, generator=None, ratio=0.5):
    b, _, h, w = x.shape
    cut_h, cut_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    off_x = (_rand((b, 1, 1), x, generator) * (h + (1 - cut_h % 2))).long()
    off_y = (_rand((b, 1, 1), x, generator) * (w + (1 - cut_w % 2))).long()
    grid_b, grid_x, grid_y = torch.meshgrid(
        torch.arange(b, device=x.device),
        torch.arange(cut_h, device=x.device),
        torch.arange(cut_w, device=x.device),
        indexing="ij",
    )
    grid_x = torch.clamp(grid_x + off_x - cut_h // 2, min=0, max=h - 1)
    grid_y = torch.clamp(grid_y + off_y - cut_w // 2, min=0, max=w - 1)
    mask = torch.ones(b, h, w, dtype=x.dtype, device=x.device)
    mask[grid_b, grid_x, grid_y] = 0
    return x * mask.unsqueeze(1)


AUGMENT_FNS = {
    "color": [rand_brightness, rand_saturation, rand_contrast],
    "translation": [rand_translation],
    "cutout": [rand_cutout],
}


def diff_augment(x: torch.Tensor, policy: str = "color,translation,cutout", generator=None) -> torch.Tensor:
    """Apply the comma-separated ``policy`` to a batch (B, C, H, W); differentiable w.r.t. ``x``."""
    if not policy:
        return x
    for name in policy.split(","):
        name = name.strip()
        if name not in AUGMENT_FNS:
            raise ValueError(f"unknown DiffAugment policy '{name}'; choose from {sorted(AUGMENT_FNS)}")
        for fn in AUGMENT_FNS[name]:
            x = fn(x, generator=generator)
    return x
