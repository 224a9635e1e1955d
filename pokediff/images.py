"""Image grids: the one PNG-grid writer of training samples, GAN samples and evaluation grids."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from pokediff.fileio import atomic_write


def save_image_grid(images: torch.Tensor, path, nrow: Optional[int] = None) -> Path:
    """Float images (N, 3, H, W) in [0, 1] -> one PNG grid (2 px white padding), written atomically.

    ``nrow`` images per row; by default a square-ish grid (ceil(sqrt(N)) per row).
    """
    from PIL import Image
    from torchvision.utils import make_grid

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"save_image_grid expects (N, 3, H, W) images, got shape {tuple(images.shape)}")
    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    grid = make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=1.0)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    path = Path(path)
    with atomic_write(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path
