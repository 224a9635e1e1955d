"""Model name -> (generator, discriminator) built from a :class:`GanModelConfig`; class lookup for loading."""

from __future__ import annotations

from pokediff.gan.cdcgan import ConditionalDCGANGenerator, NPlusOneDiscriminator, ProjectionDiscriminator
from pokediff.gan.config import MODEL_NAMES, GanConfig, progan_start_resolution
from pokediff.gan.dcgan import DCGANDiscriminator, DCGANGenerator
from pokediff.gan.progan import ProGANDiscriminator, ProGANGenerator
from pokediff.gan.vitgan import ViTGANDiscriminator, ViTGANGenerator
from pokediff.gan.wgan_large import WGANLargeCritic, WGANLargeGenerator
from pokediff.gan.wgan_small import WGANSmallCritic, WGANSmallGenerator

MODEL_CLASSES = {
    cls.__name__: cls
    for cls in (
        DCGANGenerator,
        DCGANDiscriminator,
        ConditionalDCGANGenerator,
        ProjectionDiscriminator,
        NPlusOneDiscriminator,
        WGANSmallGenerator,
        WGANSmallCritic,
        WGANLargeGenerator,
        WGANLargeCritic,
        ProGANGenerator,
        ProGANDiscriminator,
        ViTGANGenerator,
        ViTGANDiscriminator,
    )
}


def build_models(cfg: GanConfig):
    """The untrained (generator, discriminator) pair that ``cfg.model.name`` names."""
    m = cfg.model
    res, z = m.resolution, m.latent_dim
    if m.name == "dcgan":
        return (
            DCGANGenerator(res, z, m.g_features, m.g_max_features, m.g_dropout),
            DCGANDiscriminator(res, m.d_features, m.d_max_features, m.spectral_norm),
        )
    if m.name == "cdcgan":
        discriminator_class = NPlusOneDiscriminator if m.discriminator == "n_plus_one" else ProjectionDiscriminator
        return (
            ConditionalDCGANGenerator(
                res, z, m.g_features, m.g_max_features, m.g_dropout, m.num_classes, m.class_embed_dim
            ),
            discriminator_class(res, m.d_features, m.d_max_features, m.spectral_norm, m.num_classes),
        )
    if m.name == "wgan_small":
        return (
            WGANSmallGenerator(res, z, m.g_features, m.g_max_features),
            WGANSmallCritic(res, m.d_features, m.d_max_features),
        )
    if m.name == "wgan_large":
        return (
            WGANLargeGenerator(res, z, m.g_features, m.g_max_features, m.attention_resolution),
            WGANLargeCritic(res, m.d_features, m.d_max_features, m.attention_resolution, m.spectral_norm),
        )
    if m.name == "vitgan":
        return (
            ViTGANGenerator(
                res, z, m.patch_size, m.g_features, m.g_depth, m.num_heads, decoder_channels=m.decoder_channels
            ),
            # overlapping patches: each D token sees a quarter patch beyond its borders on every side
            ViTGANDiscriminator(
                res,
                m.patch_size,
                max(m.patch_size // 4, 1),
                m.d_features,
                m.d_depth,
                m.num_heads,
                spectral_norm=m.spectral_norm,
            ),
        )
    if m.name == "progan":
        start = progan_start_resolution(cfg)
        return (
            ProGANGenerator(res, start, z, m.g_features, m.g_max_features),
            ProGANDiscriminator(res, start, m.d_features, m.d_max_features),
        )
    raise ValueError(f"unknown GAN model '{m.name}'; choose one of {', '.join(MODEL_NAMES)}")


def model_from_config(class_name: str, config: dict):
    """Rebuild a model saved by :mod:`pokediff.gan.checkpoint` from its class name and init config."""
    if class_name not in MODEL_CLASSES:
        raise ValueError(f"unknown GAN model class '{class_name}'; known: {', '.join(MODEL_CLASSES)}")
    cls = MODEL_CLASSES[class_name]
    return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
