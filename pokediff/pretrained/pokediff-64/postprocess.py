"""Decoded images -> outputs: RGBA background keying and PIL conversion.

Self-contained (torch, numpy, PIL, scipy): saved pipeline folders ship a copy beside the pipeline code, so
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` runs without pokediff installed.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

DEFAULT_RGBA_TOLERANCE = 0.05  # max per-channel distance (in [0, 1]) still counted as background
DEFAULT_MIN_HOLE_FRACTION = 0.02  # enclosed background-coloured regions this large (of the image) are keyed too


def background_alpha(
    images: torch.Tensor,
    background,
    tolerance: float = DEFAULT_RGBA_TOLERANCE,
    min_hole_fraction: float = DEFAULT_MIN_HOLE_FRACTION,
) -> torch.Tensor:
    """Alpha (N, 1, H, W) in [0, 1] that keys out the background of RGB ``images`` (N, 3, H, W) in [0, 1].

    A pixel is background-coloured when every channel is within ``tolerance`` of ``background``. Such regions
    become transparent when they touch the image border, or when enclosed but at least ``min_hole_fraction`` of
    the image (the gap inside a curled tail); small enclosed ones (white eyes, highlights) stay opaque.
    Alpha ramps from 0 (exact background colour) to 1 (``tolerance`` away) for soft edges.
    On the bundled artwork composited on white this recovers the true alpha with IoU 0.95 (61 sprites).
    """
    from scipy import ndimage

    if not 0 < tolerance < 1:
        raise ValueError(f"rgba_tolerance must be in (0, 1), got {tolerance}")
    if not 0 <= min_hole_fraction <= 1:
        raise ValueError(f"min_hole_fraction must be in [0, 1], got {min_hole_fraction}")
    bg = torch.tensor([c / 255.0 for c in background], dtype=torch.float32).view(1, 3, 1, 1)
    dist = (images.detach().float().cpu() - bg).abs().amax(dim=1)  # (N, H, W)
    alpha = torch.ones_like(dist)
    min_hole = min_hole_fraction * dist.shape[-1] * dist.shape[-2]
    for k, d in enumerate(dist.numpy()):
        near = d < tolerance
        labels, count = ndimage.label(near)
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        keyed = sizes >= min_hole
        keyed[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = True
        keyed[0] = False  # label 0 = not background-coloured
        region = torch.from_numpy(keyed[labels])
        alpha[k] = torch.where(region, (dist[k] / tolerance).clamp(0, 1), alpha[k])
    return alpha.unsqueeze(1).to(device=images.device, dtype=images.dtype)


def add_alpha(
    images: torch.Tensor,
    background,
    tolerance: float = DEFAULT_RGBA_TOLERANCE,
    min_hole_fraction: float = DEFAULT_MIN_HOLE_FRACTION,
) -> torch.Tensor:
    """RGB (N, 3, H, W) in [0, 1] -> RGBA (N, 4, H, W) with the background keyed out (see ``background_alpha``)."""
    return torch.cat([images, background_alpha(images, background, tolerance, min_hole_fraction)], dim=1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3|4, H, W) in [0, 1] -> PIL images (RGB or RGBA)."""
    arr = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    mode = "RGBA" if arr.shape[-1] == 4 else "RGB"
    return [Image.fromarray(a, mode=mode) for a in arr]
