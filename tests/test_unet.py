"""build_unet: UNet2DConditionModel on 27x27 latents with the text projection built in."""

import pytest
import torch
from tiny import TINY_LATENT_CHANNELS, TINY_TEXT_DIM, TINY_UNET, tiny_unet

from pokediff.config import UNetConfig, config_from_dict
from pokediff.models.unet import build_unet


def _cfg(**changes):
    values = {k.split(".", 1)[1]: v for k, v in TINY_UNET.items()}
    values.update(changes)
    return config_from_dict(UNetConfig, values)


def _run(unet, latents, text, mask, t=500):
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=text, encoder_attention_mask=mask).sample


def test_shapes_and_text_projection():
    unet = tiny_unet(TINY_TEXT_DIM)
    assert isinstance(unet.encoder_hid_proj, torch.nn.Linear)
    assert unet.encoder_hid_proj.in_features == TINY_TEXT_DIM
    assert unet.encoder_hid_proj.out_features == unet.config.cross_attention_dim
    latents = torch.randn(3, TINY_LATENT_CHANNELS, 27, 27)
    out = _run(unet, latents, torch.randn(3, 6, TINY_TEXT_DIM), torch.ones(3, 6, dtype=torch.long))
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_odd_latent_size_three_levels():
    """27 -> 14 -> 7 and back: diffusers forwards the skip sizes to the upsamplers."""
    cfg = _cfg(
        block_out_channels=[8, 16, 16],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    )
    unet = build_unet(cfg, latent_channels=8, latent_size=27, text_dim=TINY_TEXT_DIM).eval()
    assert unet.config.sample_size == 27 and unet.config.in_channels == 8
    out = _run(unet, torch.randn(2, 8, 27, 27), torch.randn(2, 4, TINY_TEXT_DIM), None)
    assert out.shape == (2, 8, 27, 27)


def test_text_conditioning_and_attention_mask():
    unet = tiny_unet(TINY_TEXT_DIM)
    latents = torch.randn(2, TINY_LATENT_CHANNELS, 27, 27)
    text = torch.randn(2, 6, TINY_TEXT_DIM)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    base = _run(unet, latents, text, mask)
    padded_changed = text.clone()
    padded_changed[0, 3:] = torch.randn(3, TINY_TEXT_DIM)
    # masked (padding) tokens do not reach the output ...
    assert torch.allclose(base[0], _run(unet, latents, padded_changed, mask)[0], atol=1e-5)
    # ... real tokens do
    real_changed = text.clone()
    real_changed[0, :3] = torch.randn(3, TINY_TEXT_DIM)
    assert not torch.allclose(base[0], _run(unet, latents, real_changed, mask)[0], atol=1e-4)
    # and the timestep matters
    assert not torch.allclose(base, _run(unet, latents, text, mask, t=10), atol=1e-4)


def test_config_errors():
    with pytest.raises(ValueError, match="same length"):
        build_unet(_cfg(up_block_types=["UpBlock2D"]), 4, 27, TINY_TEXT_DIM)
    with pytest.raises(ValueError, match="CrossAttn"):
        no_text = _cfg(down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2)
        build_unet(no_text, 4, 27, TINY_TEXT_DIM)
    with pytest.raises(ValueError, match="norm_num_groups"):
        build_unet(_cfg(block_out_channels=[12, 20]), 4, 27, TINY_TEXT_DIM)


def test_default_config_builds_with_minilm_width():
    unet = build_unet(UNetConfig(), latent_channels=8, latent_size=27, text_dim=384)
    assert unet.config.encoder_hid_dim == 384 and unet.config.cross_attention_dim == 256
    assert list(unet.config.block_out_channels) == [128, 256, 384]
