"""SpriteVAE: a KL autoencoder built from diffusers' Encoder/Decoder blocks, sized for 215x215 sprites.

The encoder downsamples 8x (three stride-2 stages). 215 is not a multiple of 8, so inputs are padded on the
right/bottom to 216 (edge replicate) and the decoder output is cropped back: 215 in -> 27x27 latent -> 215 out.
The decoder can optionally cross-attend to text embeddings (``decoder_cross_attention``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.vae import Decoder, DecoderOutput, DiagonalGaussianDistribution, Encoder
from diffusers.models.modeling_outputs import AutoencoderKLOutput

# Keep `ModelMixin` a module-level name: diffusers finds the load method of a custom component by looking the
# base classes up on the component's module. No pokediff imports here: saved pipelines carry this file as
# vae/sprite_vae.py, which `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` runs on its own.
from diffusers.models.modeling_utils import ModelMixin


class DecoderCrossAttention(nn.Module):
    """Pre-norm residual cross-attention from image features to text tokens.

    The output projection starts at zero, so a fresh block is the identity and the switch cannot hurt at init.
    """

    def __init__(self, channels: int, cross_attention_dim: int, norm_num_groups: int, heads: int = 4):
        super().__init__()
        heads = max(1, min(heads, channels // 8)) if channels >= 8 else 1
        self.norm = nn.GroupNorm(num_groups=norm_num_groups, num_channels=channels, eps=1e-6)
        self.attn = Attention(
            query_dim=channels,
            cross_attention_dim=cross_attention_dim,
            heads=heads,
            dim_head=channels // heads,
            bias=True,
        )
        nn.init.zeros_(self.attn.to_out[0].weight)
        nn.init.zeros_(self.attn.to_out[0].bias)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_bias: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        out = self.attn(q, encoder_hidden_states=text, attention_mask=text_bias)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class SpriteVAE(ModelMixin, ConfigMixin):
    """KL-regularised autoencoder; parameter names match diffusers' ``AutoencoderKL`` (encoder/decoder/quant_conv)."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 8,
        block_out_channels: tuple = (64, 128, 256, 256),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        mid_block_attention: bool = True,
        decoder_cross_attention: bool = False,
        cross_attention_dim: int = 384,
        scaling_factor: float = 1.0,
        sample_size: int = 215,
        latents_mean: list | None = None,
        latents_std: list | None = None,
    ):
        super().__init__()
        n = len(block_out_channels)
        if n < 1:
            raise ValueError("SpriteVAE: block_out_channels must name at least one block")
        for ch in block_out_channels:
            if ch % norm_num_groups:
                raise ValueError(
                    f"SpriteVAE: every block_out_channels entry must be divisible by norm_num_groups="
                    f"{norm_num_groups}; got {list(block_out_channels)}"
                )
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            double_z=True,
            mid_block_add_attention=mid_block_attention,
        )
        self.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=in_channels,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            mid_block_add_attention=mid_block_attention,
        )
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

        # Cross-attention after the mid block (latent resolution) and after the first up block (2x latent):
        # the low resolutions where global "what is this" information helps and attention is cheap.
        self.decoder_cross_attn = None
        if decoder_cross_attention:
            top = block_out_channels[-1]
            dims = [top] + ([list(reversed(block_out_channels))[0]] if n > 1 else [])
            self.decoder_cross_attn = nn.ModuleList(
                [DecoderCrossAttention(c, cross_attention_dim, norm_num_groups) for c in dims]
            )

    # ------------------------------------------------------------------ geometry
    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def latent_size(self, image_size: int | None = None) -> int:
        """Latent side length for an image side length (default: ``sample_size``), e.g. 215 -> 27."""
        size = self.config.sample_size if image_size is None else image_size
        return math.ceil(size / self.downsample_factor)

    # ------------------------------------------------------------------ latent normalisation
    def _channel_stats(self, z: torch.Tensor):
        shape = (1, -1) + (1,) * (z.ndim - 2)
        mean = torch.tensor(self.config.latents_mean, dtype=z.dtype, device=z.device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=z.dtype, device=z.device).view(shape)
        return mean, std

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Posterior latents -> the diffusion model's space: ``(z - latents_mean) * scaling_factor / latents_std``
        per channel when stage 1 stored per-channel statistics (diffusers' SDXL convention), else
        ``z * scaling_factor``."""
        if self.config.latents_mean is None or self.config.latents_std is None:
            return z * self.config.scaling_factor
        mean, std = self._channel_stats(z)
        return (z - mean) * self.config.scaling_factor / std

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of ``scale_latents``: diffusion latents -> what ``decode`` takes."""
        if self.config.latents_mean is None or self.config.latents_std is None:
            return latents / self.config.scaling_factor
        mean, std = self._channel_stats(latents)
        return latents * std / self.config.scaling_factor + mean

    # ------------------------------------------------------------------ encode / decode
    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images (B, C, H, W) in [-1, 1] -> ``AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution)``."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"SpriteVAE.encode expects (B, {self.config.in_channels}, H, W) images, got shape {tuple(x.shape)}"
            )
        f = self.downsample_factor
        pad_h, pad_w = (-x.shape[-2]) % f, (-x.shape[-1]) % f
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        moments = self.quant_conv(self.encoder(x))
        posterior = DiagonalGaussianDistribution(moments)
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    def _text_bias(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        # (B, L) keep-mask -> additive bias (B, 1, L), the same convention UNet2DConditionModel uses.
        if mask is None:
            return None
        return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)

    def decode(
        self,
        z: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        return_dict: bool = True,
        encoder_attention_mask: torch.Tensor | None = None,
    ):
        """Latents (B, latent_channels, h, w) -> ``DecoderOutput(sample)`` in about [-1, 1].

        When ``h, w`` are the latent size of ``sample_size`` (27 for 215) the output is cropped to
        ``sample_size``; other latent sizes decode to ``h * downsample_factor`` pixels.
        """
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"SpriteVAE.decode expects (B, {self.config.latent_channels}, h, w) latents, got shape {tuple(z.shape)}"
            )
        if self.decoder_cross_attn is not None and encoder_hidden_states is None:
            raise ValueError(
                "SpriteVAE.decode: this VAE has decoder_cross_attention=True and needs encoder_hidden_states "
                "(the text embeddings of the captions)"
            )
        dec = self.decoder
        # diffusers' Decoder.forward has no hook for cross-attention, so its parts are called here in its order.
        checkpoint = torch.is_grad_enabled() and dec.gradient_checkpointing

        def call(module, *args):
            return dec._gradient_checkpointing_func(module, *args) if checkpoint else module(*args)

        h = dec.conv_in(self.post_quant_conv(z))
        upscale_dtype = next(iter(dec.up_blocks.parameters())).dtype
        h = call(dec.mid_block, h).to(upscale_dtype)
        bias = None
        if self.decoder_cross_attn is not None:
            bias = self._text_bias(encoder_attention_mask, h.dtype)
            h = self.decoder_cross_attn[0](h, encoder_hidden_states, bias)
        for i, up_block in enumerate(dec.up_blocks):
            h = call(up_block, h)
            if self.decoder_cross_attn is not None and i + 1 < len(self.decoder_cross_attn):
                h = self.decoder_cross_attn[i + 1](h, encoder_hidden_states, bias)
        h = dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))

        size = self.config.sample_size
        if z.shape[-2] == self.latent_size(size) and z.shape[-1] == self.latent_size(size):
            h = h[..., :size, :size]
        if not return_dict:
            return (h,)
        return DecoderOutput(sample=h)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        return_dict: bool = True,
        encoder_attention_mask: torch.Tensor | None = None,
    ):
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        dec = self.decode(
            z, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask
        ).sample
        # decode() crops only for sample_size; crop to the input here so any size round-trips.
        dec = dec[..., : sample.shape[-2], : sample.shape[-1]]
        if not return_dict:
            return (dec,)
        return DecoderOutput(sample=dec)


def build_vae(vae_cfg, resolution: int) -> SpriteVAE:
    """A fresh SpriteVAE from ``pokediff.config.VAEConfig`` for ``resolution`` x ``resolution`` sprites."""
    return SpriteVAE(
        in_channels=vae_cfg.in_channels,
        latent_channels=vae_cfg.latent_channels,
        block_out_channels=tuple(vae_cfg.block_out_channels),
        layers_per_block=vae_cfg.layers_per_block,
        norm_num_groups=vae_cfg.norm_num_groups,
        mid_block_attention=vae_cfg.mid_block_attention,
        decoder_cross_attention=vae_cfg.decoder_cross_attention,
        cross_attention_dim=vae_cfg.cross_attention_dim,
        scaling_factor=vae_cfg.scaling_factor,
        sample_size=resolution,
    )
