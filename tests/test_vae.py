"""SpriteVAE: geometry (215 -> 27 -> 215), diffusers compatibility, the decoder cross-attention switch."""

import pytest
import torch
from diffusers import AutoencoderKL
from tiny import TINY_LATENT_CHANNELS, TINY_TEXT_DIM, TINY_VAE, tiny_vae

from pokediff.config import VAEConfig, config_from_dict
from pokediff.models.vae import SpriteVAE, build_vae


def test_215_in_27_latent_215_out():
    vae = tiny_vae()
    x = torch.rand(2, 3, 215, 215) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        assert posterior.mean.shape == (2, TINY_LATENT_CHANNELS, 27, 27)
        assert posterior.logvar.shape == (2, TINY_LATENT_CHANNELS, 27, 27)
        assert vae.decode(posterior.mode()).sample.shape == (2, 3, 215, 215)
        assert vae(x).sample.shape == (2, 3, 215, 215)
    assert vae.latent_size() == 27 and vae.downsample_factor == 8


def test_other_sizes_round_trip_shape():
    vae = tiny_vae()
    with torch.no_grad():
        assert vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape[-1] == 8
        assert vae(torch.zeros(1, 3, 64, 64)).sample.shape == (1, 3, 64, 64)
        assert vae(torch.zeros(1, 3, 70, 70)).sample.shape == (1, 3, 70, 70)
        # a latent that is not sample_size's decodes to 8x its size
        assert vae.decode(torch.zeros(1, TINY_LATENT_CHANNELS, 8, 8)).sample.shape == (1, 3, 64, 64)


def test_posterior_sampling_seeded_and_mode():
    vae = tiny_vae()
    x = torch.rand(1, 3, 215, 215) * 2 - 1
    with torch.no_grad():
        a = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
        b = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
        c = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(4)).sample
        mode = vae(x, sample_posterior=False).sample
        expected = vae.decode(vae.encode(x).latent_dist.mean).sample
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.allclose(mode, expected)
    kl = vae.encode(x).latent_dist.kl()
    assert kl.shape == (1,) and torch.isfinite(kl).all()


def test_weights_are_autoencoder_kl_compatible():
    """Same parameter names and maths as diffusers' AutoencoderKL (minus the pad/crop)."""
    vae = tiny_vae()
    cfg = vae.config
    reference = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
    ).eval()
    reference.load_state_dict(vae.state_dict(), strict=True)
    z = torch.randn(1, TINY_LATENT_CHANNELS, 27, 27)
    x = torch.rand(1, 3, 216, 216) * 2 - 1
    with torch.no_grad():
        ours, theirs = vae.decode(z).sample, reference.decode(z).sample
        assert theirs.shape[-1] == 216 and ours.shape[-1] == 215
        assert torch.allclose(ours, theirs[..., :215, :215], atol=1e-5)
        assert torch.allclose(vae.encode(x).latent_dist.mean, reference.encode(x).latent_dist.mean, atol=1e-5)


def test_decoder_cross_attention_switch():
    plain, cross = tiny_vae(False), tiny_vae(True)
    assert plain.decoder_cross_attn is None
    assert len(cross.decoder_cross_attn) == 2
    assert sum(p.numel() for p in cross.parameters()) > sum(p.numel() for p in plain.parameters())
    z = torch.randn(2, TINY_LATENT_CHANNELS, 27, 27)
    text_a, text_b = torch.randn(2, 5, TINY_TEXT_DIM), torch.randn(2, 5, TINY_TEXT_DIM)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        cross.decode(z)
    with torch.no_grad():
        # zero-initialised output projection: a fresh switch starts as the plain decoder
        a = cross.decode(z, encoder_hidden_states=text_a, encoder_attention_mask=mask).sample
        assert torch.allclose(a, cross.decode(z, encoder_hidden_states=text_b).sample)
        for block in cross.decoder_cross_attn:
            torch.nn.init.normal_(block.attn.to_out[0].weight, std=0.2)
        a = cross.decode(z, encoder_hidden_states=text_a, encoder_attention_mask=mask).sample
        b = cross.decode(z, encoder_hidden_states=text_b, encoder_attention_mask=mask).sample
        assert a.shape == (2, 3, 215, 215)
        assert not torch.allclose(a, b, atol=1e-4)
        # masked-out tokens must not matter
        text_c = text_a.clone()
        text_c[0, 3:] = 5.0
        c = cross.decode(z, encoder_hidden_states=text_c, encoder_attention_mask=mask).sample
        assert torch.allclose(a[0], c[0], atol=1e-5)
        assert cross(torch.zeros(1, 3, 215, 215), encoder_hidden_states=text_a[:1]).sample.shape == (1, 3, 215, 215)


def test_save_load_round_trip_safetensors(tmp_path):
    vae = tiny_vae(True)
    vae.register_to_config(scaling_factor=0.75)
    vae.save_pretrained(tmp_path / "vae")
    files = {p.name for p in (tmp_path / "vae").iterdir()}
    assert "diffusion_pytorch_model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    loaded = SpriteVAE.from_pretrained(tmp_path / "vae")
    assert loaded.config.scaling_factor == 0.75 and loaded.config.decoder_cross_attention
    for (k, v), (k2, v2) in zip(vae.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_build_vae_mirrors_config():
    cfg = config_from_dict(VAEConfig, {k.split(".", 1)[1]: v for k, v in TINY_VAE.items()})
    vae = build_vae(cfg, resolution=215)
    assert vae.config.sample_size == 215
    for name in ("latent_channels", "layers_per_block", "norm_num_groups", "decoder_cross_attention", "scaling_factor"):
        assert vae.config[name] == getattr(cfg, name)
    assert list(vae.config.block_out_channels) == cfg.block_out_channels


def test_bad_inputs():
    vae = tiny_vae()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.zeros(3, 215, 215))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, TINY_LATENT_CHANNELS + 1, 27, 27))
    with pytest.raises(ValueError, match="norm_num_groups"):
        SpriteVAE(block_out_channels=(8, 12), norm_num_groups=8)


def test_gradient_checkpointing_gives_same_gradients():
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    text = torch.randn(1, 3, TINY_TEXT_DIM)
    grads = []
    for checkpointing in (False, True):
        vae = tiny_vae(True).train()
        if checkpointing:
            vae.enable_gradient_checkpointing()
            assert vae.decoder.gradient_checkpointing and vae.encoder.gradient_checkpointing
        vae(x, sample_posterior=False, encoder_hidden_states=text).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in vae.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
