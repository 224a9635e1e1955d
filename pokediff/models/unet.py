"""The denoiser: a configured ``diffusers.UNet2DConditionModel`` on 27x27 sprite latents.

The text projection lives inside the U-Net (``encoder_hid_dim`` = text encoder width -> ``cross_attention_dim``,
diffusers' ``encoder_hid_proj``), so any BERT-sized encoder plugs in without an extra module.
Odd latent sizes (27 -> 14 -> 7) work because diffusers forwards the skip sizes to its upsamplers.
"""

from __future__ import annotations

from diffusers import UNet2DConditionModel

from pokediff.config import ConfigError


def build_unet(unet_cfg, latent_channels: int, latent_size: int, text_dim: int) -> UNet2DConditionModel:
    """A fresh U-Net from ``pokediff.config.UNetConfig``; ``text_dim`` is the text encoder's hidden size."""
    down, up = list(unet_cfg.down_block_types), list(unet_cfg.up_block_types)
    channels = list(unet_cfg.block_out_channels)
    if not (len(down) == len(up) == len(channels)):
        raise ConfigError(
            f"unet: down_block_types ({len(down)}), up_block_types ({len(up)}) and block_out_channels "
            f"({len(channels)}) must have the same length"
        )
    if not any("CrossAttn" in b for b in down + up):
        raise ConfigError("unet: no CrossAttn block in down_block_types/up_block_types; the text would be ignored")
    for ch in channels:
        if ch % unet_cfg.norm_num_groups:
            raise ConfigError(
                f"unet: block_out_channels {channels} must all be divisible by "
                f"norm_num_groups={unet_cfg.norm_num_groups}"
            )
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(channels),
        layers_per_block=unet_cfg.layers_per_block,
        norm_num_groups=unet_cfg.norm_num_groups,
        # diffusers' historic naming: for this class `attention_head_dim` is the number of heads per block.
        attention_head_dim=unet_cfg.attention_head_dim,
        cross_attention_dim=unet_cfg.cross_attention_dim,
        encoder_hid_dim=text_dim,
        encoder_hid_dim_type="text_proj",
        dropout=unet_cfg.dropout,
    )
