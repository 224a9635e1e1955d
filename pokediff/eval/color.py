"""Colour agreement without a learned judge: the sprite's dominant colour, named with the dataset's words.

Each sprite pixel gets one of ``pokediff.data.COLOR_NAMES`` by hue/saturation/value rules; the most
frequent name wins. Sprite pixels are the opaque ones of an RGBA image, or, for RGB images on a flat
background, everything except the near-background region connected to the border (so white inside an
outlined sprite still counts).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from pokediff.data import COLOR_NAMES

_COLOR_RE = re.compile(r"\b(" + "|".join(COLOR_NAMES) + r")\b", re.IGNORECASE)
_BACKGROUND_TOLERANCE = 24 / 255  # max per-channel distance of (noisy) generated background to the true one
_ALPHA_OPAQUE = 0.5
# thresholds chosen on the bundled sprites' dex colours (agreement ~0.62 vs 0.17 for the majority colour)
ACHROMATIC_SATURATION = 0.18
WHITE_VALUE = 0.9
BLACK_VALUE = 0.25
# every sprite has dark outlines and gray shading, so achromatic pixels count half towards the vote
ACHROMATIC_WEIGHT = 0.5


def color_in_text(text: str) -> str | None:
    """The first of the dataset's colour words in ``text`` ("A red fire type..." -> "red"), or None."""
    match = _COLOR_RE.search(text or "")
    return match.group(1).lower() if match else None


def target_color(row: dict, caption: str) -> str | None:
    """The colour a prompt asks for: the metadata row's colour when it is one of ours, else one named in the caption."""
    color = str(row.get("color") or "").strip().lower()
    return color if color in COLOR_NAMES else color_in_text(caption)


def _as_array(image) -> np.ndarray:
    """(H, W, C) float in [0, 1], C = 3 or 4, from a PIL image, a (C,H,W) tensor in [0,1] or an HWC array."""
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
        return np.asarray(image, dtype=np.float32) / 255.0
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (3, 4):
            raise ValueError(f"image tensor must be (3|4, H, W) in [0, 1], got shape {tuple(image.shape)}")
        return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"image array must be (H, W, 3|4), got shape {array.shape}")
    return array.astype(np.float32) / (255.0 if array.dtype == np.uint8 else 1.0)


def sprite_mask(array: np.ndarray, background: Sequence[int] = (255, 255, 255)) -> np.ndarray:
    """Boolean (H, W) mask of the sprite's pixels (see the module docstring)."""
    if array.shape[2] == 4:
        return array[..., 3] >= _ALPHA_OPAQUE
    bg = np.asarray(background, dtype=np.float32) / 255.0
    near_bg = np.abs(array[..., :3] - bg).max(axis=2) <= _BACKGROUND_TOLERANCE
    labels, _ = ndimage.label(near_bg)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    border = border[border > 0]
    return ~np.isin(labels, border)


def classify_pixels(rgb: np.ndarray) -> np.ndarray:
    """(M, 3) RGB in [0, 1] -> (M,) indices into COLOR_NAMES."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    v = rgb.max(axis=1)
    c = v - rgb.min(axis=1)
    s = np.where(v > 0, c / np.maximum(v, 1e-6), 0.0)
    safe_c = np.maximum(c, 1e-6)
    hue = (
        np.where(v == r, ((g - b) / safe_c) % 6, np.where(v == g, (b - r) / safe_c + 2, (r - g) / safe_c + 4)) * 60.0
    )  # degrees
    idx = {name: i for i, name in enumerate(COLOR_NAMES)}
    out = np.empty(len(rgb), dtype=np.int64)

    chromatic_hue = np.select(
        [
            (hue < 15) | (hue >= 340),
            hue < 42,
            hue < 70,
            hue < 165,
            hue < 255,
            hue < 290,
        ],
        [idx["red"], -1, idx["yellow"], idx["green"], idx["blue"], idx["purple"]],
        default=-2,  # 290..340: magenta, purple or pink
    )
    # orange hues: vivid and bright -> red (the dex files orange sprites as red), otherwise brown
    orange = chromatic_hue == -1
    chromatic_hue = np.where(orange & (s > 0.65) & (v > 0.75), idx["red"], chromatic_hue)
    chromatic_hue = np.where(orange & ~((s > 0.65) & (v > 0.75)), idx["brown"], chromatic_hue)
    magenta = chromatic_hue == -2
    chromatic_hue = np.where(magenta & (v > 0.7) & (s < 0.6), idx["pink"], chromatic_hue)
    chromatic_hue = np.where(magenta & ~((v > 0.7) & (s < 0.6)), idx["purple"], chromatic_hue)
    # light, soft reds are pink; dark reds and dark yellows read as brown
    reds = chromatic_hue == idx["red"]
    chromatic_hue = np.where(reds & (v > 0.75) & (s < 0.5), idx["pink"], chromatic_hue)
    chromatic_hue = np.where(reds & (v < 0.45) & ((hue < 15) | (hue >= 340)) & (s < 0.7), idx["brown"], chromatic_hue)
    yellows = chromatic_hue == idx["yellow"]
    chromatic_hue = np.where(yellows & (v < 0.55), idx["brown"], chromatic_hue)

    achromatic = s < ACHROMATIC_SATURATION
    out[:] = chromatic_hue
    out = np.where(achromatic & (v >= WHITE_VALUE), idx["white"], out)
    out = np.where(achromatic & (v < WHITE_VALUE), idx["gray"], out)
    out = np.where((v < BLACK_VALUE) | (achromatic & (v < BLACK_VALUE + 0.12)), idx["black"], out)
    return out


def color_histogram(image, background: Sequence[int] = (255, 255, 255)) -> dict[str, float]:
    """Fraction of the sprite's pixels named by each colour word."""
    array = _as_array(image)
    mask = sprite_mask(array, background)
    pixels = array[..., :3][mask]
    if len(pixels) == 0:
        return dict.fromkeys(COLOR_NAMES, 0.0)
    counts = np.bincount(classify_pixels(pixels), minlength=len(COLOR_NAMES))
    return {name: float(n) / len(pixels) for name, n in zip(COLOR_NAMES, counts)}


def dominant_color(image, background: Sequence[int] = (255, 255, 255)) -> str | None:
    """The most frequent colour word among the sprite's pixels, or None for an empty sprite."""
    hist = color_histogram(image, background)
    if not any(hist.values()):
        return None
    votes = {n: f * (ACHROMATIC_WEIGHT if n in ("black", "gray", "white") else 1.0) for n, f in hist.items()}
    return max(votes, key=votes.get)


def agreement_from_predictions(predicted: Sequence[str | None], target_colors: Sequence[str | None]) -> dict:
    """Fraction of predicted colours equal to the target colour (entries without a target are skipped).

    Returns {"accuracy", "num_scored", "confusion": {target: {predicted: count}}}; accuracy is None when no
    entry had a target colour.
    """
    if len(predicted) != len(target_colors):
        raise ValueError(f"{len(predicted)} predictions but {len(target_colors)} target colours")
    unknown = {c for c in target_colors if c is not None and c not in COLOR_NAMES}
    if unknown:
        raise ValueError(f"unknown colour words {sorted(unknown)}; expected one of {COLOR_NAMES}")
    hits, scored = 0, 0
    confusion: dict[str, Counter] = {}
    for guess, target in zip(predicted, target_colors):
        if target is None:
            continue
        scored += 1
        hits += guess == target
        confusion.setdefault(target, Counter())[guess or "none"] += 1
    return {
        "accuracy": hits / scored if scored else None,
        "num_scored": scored,
        "confusion": {t: dict(c) for t, c in sorted(confusion.items())},
    }


def color_agreement(images, target_colors: Sequence[str | None], background: Sequence[int] = (255, 255, 255)) -> dict:
    """``agreement_from_predictions`` of the images' dominant colours (see there for the result)."""
    if len(images) != len(target_colors):
        raise ValueError(f"{len(images)} images but {len(target_colors)} target colours")
    predicted = [dominant_color(im, background) if t is not None else None for im, t in zip(images, target_colors)]
    return agreement_from_predictions(predicted, target_colors)
