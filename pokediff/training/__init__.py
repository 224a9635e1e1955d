"""Training: stage 1 (VAE), stage 2 (U-Net), stage 3 (text alignment) and the loop pieces they share.

Entry points are imported lazily by ``train_3stage.py`` so that one stage's dependencies never block another.
"""
