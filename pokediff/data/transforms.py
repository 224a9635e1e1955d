"""Sprite preprocessing: alpha compositing, trim, aspect-preserving pad + resize, augmentation, [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2


def to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit grayscale ("I;16", "I") scaled to 8-bit "L"; other modes unchanged.

    PIL's ``convert("RGB")`` clips such images at 255 instead of scaling them, so a 16-bit sprite would come
    out almost white.
    """
    if not (image.mode.startswith("I;16") or image.mode == "I"):
        return image
    array = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or array.max(initial=0) > 255:  # "I" from a 16-bit PNG holds 0..65535
        array = array / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), mode="L")


def composite_on_background(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """RGB image with any transparency blended onto ``background``.

    ``convert("RGB")`` on RGBA just drops alpha, which leaves whatever colour the transparent pixels
    happen to hold (often black): the sprite's background must be the configured colour instead.
    """
    background = tuple(int(c) for c in background)
    image = to_8bit(image)
    if image.mode in ("P", "LA", "L") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "LA":
        image = image.convert("RGBA")
    if image.mode != "RGBA":
        return image.convert("RGB")
    canvas = Image.new("RGBA", image.size, background + (255,))
    return Image.alpha_composite(canvas, image).convert("RGB")


def alpha_bbox(image: Image.Image):
    """Bounding box (left, top, right, bottom) of the non-transparent pixels, or None."""
    if image.mode != "RGBA":
        return None
    return image.getchannel("A").getbbox()


def trim_to_alpha(image: Image.Image) -> Image.Image:
    box = alpha_bbox(image)
    return image.crop(box) if box else image


def pad_to_square_and_resize(image: Image.Image, size: int, background=(255, 255, 255)) -> Image.Image:
    """Fit the longer side to ``size`` keeping the aspect ratio, centre it on a square of ``background``."""
    w, h = image.size
    scale = size / max(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if (new_w, new_h) == (size, size):
        return image
    mode = image.mode
    fill = tuple(int(c) for c in background) + ((0,) if mode == "RGBA" else ())
    canvas = Image.new(mode, (size, size), fill)
    canvas.paste(image, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def to_tensor_minus1_1(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class SpriteTransform:
    """PIL sprite (any mode) -> float tensor (3, R, R) in [-1, 1]; augments only when ``train``."""

    def __init__(self, data_cfg, train: bool = False):
        self.resolution = int(data_cfg.resolution)
        self.background = tuple(int(c) for c in data_cfg.background)
        self.trim = bool(data_cfg.trim)
        self.train = bool(train) and bool(data_cfg.augment)
        aug = data_cfg.augmentation
        self.hflip = v2.RandomHorizontalFlip(p=aug.hflip) if self.train and aug.hflip > 0 else None
        self.rotation = aug.rotation if self.train and aug.rotation > 0 else 0.0
        self.color_jitter = None
        if self.train and any(aug.color_jitter):
            b, c, s, h = aug.color_jitter
            self.color_jitter = v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)

    def _augment(self, image: Image.Image) -> Image.Image:
        """Flip, rotate and colour-jitter the sprite before compositing: jitter must not tint the background
        (a shifted white falls outside the RGBA keying tolerance), and rotated corners stay transparent."""
        if self.hflip is not None:
            image = self.hflip(image)
        if self.rotation:
            fill = list(self.background) + ([0] if image.mode == "RGBA" else [])
            image = v2.RandomRotation(self.rotation, interpolation=v2.InterpolationMode.BILINEAR, fill=fill)(image)
        if self.color_jitter is not None:
            if image.mode == "RGBA":
                alpha = image.getchannel("A")
                image = self.color_jitter(image.convert("RGB"))
                image.putalpha(alpha)
            else:
                image = self.color_jitter(image)
        return image

    def prepare(self, image: Image.Image) -> Image.Image:
        """The deterministic part: 8-bit, trimmed, padded and resized to R x R (RGBA kept); safe to cache."""
        image = to_8bit(image)
        if self.trim:
            image = trim_to_alpha(image)
        if image.mode not in ("RGBA", "RGB"):
            image = image.convert("RGBA") if "transparency" in image.info or "A" in image.mode else image.convert("RGB")
        return pad_to_square_and_resize(image, self.resolution, self.background)

    def finish(self, prepared: Image.Image) -> torch.Tensor:
        """Augment (train only), composite and convert an image from ``prepare``; never modifies it."""
        image = self._augment(prepared) if self.train else prepared
        return to_tensor_minus1_1(composite_on_background(image, self.background))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.finish(self.prepare(image))
