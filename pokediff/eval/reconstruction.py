"""VAE reconstruction quality on real sprites: L1, PSNR and perceptual distance."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


def psnr(x_0_1: torch.Tensor, y_0_1: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1]; identical images give +inf."""
    mse = (x_0_1 - y_0_1).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse)


@torch.no_grad()
def reconstruction_metrics(
    vae: nn.Module,
    batches: Iterable[tuple[torch.Tensor, list[str]]],
    perceptual: nn.Module | None = None,
    encode_text: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None,
    device="cpu",
    progress: bool = True,
) -> dict:
    """Means over images of L1 (on [0, 1]), PSNR (dB) and perceptual distance of ``decode(mode(encode(x)))``.

    ``batches`` yields (pixels (B,3,H,W) in [-1, 1], captions); ``encode_text(captions) -> (embeds, mask)``
    is needed only by a VAE whose decoder cross-attends to text.
    """
    needs_text = getattr(vae, "decoder_cross_attn", None) is not None
    if needs_text and encode_text is None:
        raise ValueError("this VAE's decoder cross-attends to text: pass encode_text to embed the captions")
    l1, peak, dist, count = 0.0, 0.0, 0.0, 0
    for pixels, captions in tqdm(batches, desc="reconstruction", disable=not progress, leave=False):
        x = pixels.to(device=device, dtype=vae.dtype)
        z = vae.encode(x).latent_dist.mode()
        kwargs = {}
        if needs_text:
            embeds, mask = encode_text(list(captions))
            kwargs = {"encoder_hidden_states": embeds.to(vae.dtype), "encoder_attention_mask": mask}
        recon = vae.decode(z, **kwargs).sample[..., : x.shape[-2], : x.shape[-1]].float().clamp(-1, 1)
        x = x.float()
        x01, r01 = x / 2 + 0.5, recon / 2 + 0.5
        l1 += float((x01 - r01).abs().flatten(1).mean(dim=1).sum())
        # cap at 100 dB so one perfect image does not make the mean infinite
        peak += float(psnr(x01, r01).clamp(max=100.0).sum())
        if perceptual is not None:
            dist += float(perceptual(recon, x).sum())
        count += x.shape[0]
    if count == 0:
        raise ValueError("no images to reconstruct")
    return {
        "l1": l1 / count,
        "psnr": peak / count,
        "perceptual": dist / count if perceptual is not None else None,
        "num_images": count,
    }
