"""Models: sprite VAE, configured U-Net, text encoder resolution, perceptual network, CLIP.

Import the submodules directly (``from pokediff.models.vae import SpriteVAE``): they pull in heavy
dependencies that not every caller needs.
"""
