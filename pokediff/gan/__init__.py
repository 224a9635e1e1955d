"""GAN baselines (DCGAN, WGAN-GP small/large, progressive GAN, conditional DCGAN, ViTGAN) on the shared data layer.

Entry points: ``python -m pokediff.gan.train``, ``pokediff.gan.generate`` (CLI and
:func:`~pokediff.gan.generate.sample_from_checkpoint`), ``pokediff.gan.plot_losses``, ``pokediff.gan.make_gifs``.
"""

from pokediff.gan.checkpoint import is_gan_checkpoint
from pokediff.gan.config import MODEL_NAMES, GanConfig, load_gan_config

__all__ = ["MODEL_NAMES", "GanConfig", "is_gan_checkpoint", "load_gan_config"]
