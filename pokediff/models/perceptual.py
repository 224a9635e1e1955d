"""Perceptual distance: classic `lpips` when its backbone is on disk, else packaged ST-LPIPS (offline).

`lpips` ships only its linear heads and downloads the torchvision backbone on first use, which fails
offline. `stlpips-pytorch` ships complete shift-tolerant weights but imports IPython and torchsummary
without declaring them, and loads weights with a bare torch.load; this adapter hides both.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch import nn

BACKENDS = ("auto", "lpips", "stlpips")
NETS = ("alex", "vgg")


def _torchvision_backbone_file(net: str) -> Path:
    from torchvision import models

    weights = models.AlexNet_Weights.IMAGENET1K_V1 if net == "alex" else models.VGG16_Weights.IMAGENET1K_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def lpips_backbone_available(net: str = "alex") -> bool:
    return importlib.util.find_spec("lpips") is not None and _torchvision_backbone_file(net).is_file()


def _importable(name: str) -> bool:
    """Whether ``import name`` would find a module; a finder that refuses the name (ImportError) means no."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without __spec__
        return False


def _import_stlpips():
    """Import ``stlpips_pytorch.stlpips`` whether or not IPython / torchsummary are installed.

    That module imports both at module level but never uses them for inference. Where one is missing, a stub
    with a real ``ModuleSpec`` stands in for the duration of the import only, so ``sys.modules`` is left as
    it was and a later ``find_spec``/``import`` of the real package behaves normally.
    """
    stubbed = []
    for name in ("IPython", "torchsummary"):
        if name in sys.modules or _importable(name):
            continue
        stub = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, loader=None))
        stub.embed = stub.summary = lambda *a, **k: None
        sys.modules[name] = stub
        stubbed.append(name)
    try:
        from stlpips_pytorch import stlpips
    except ImportError as err:
        raise ImportError("the offline perceptual network needs `pip install stlpips-pytorch`") from err
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)
    return stlpips


def _build_stlpips(net: str) -> nn.Module:
    stlpips = _import_stlpips()
    weights = Path(stlpips.__file__).parent / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"
    if not weights.is_file():
        raise FileNotFoundError(f"ST-LPIPS weights not found at {weights}")
    model = stlpips.LPIPS(net=net, variant="shift_tolerant", pretrained=False, verbose=False)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # `lins.K` are aliases of `linK` in that package; anything else missing means broken weights
    real_missing = [k for k in missing if not (k.startswith("lins.") and k.replace("lins.", "lin", 1) in state)]
    if real_missing or unexpected:
        raise RuntimeError(f"ST-LPIPS weights {weights} do not match: missing {real_missing}, unexpected {unexpected}")
    return model


def _build_lpips(net: str) -> nn.Module:
    import lpips

    return lpips.LPIPS(net=net, verbose=False)


def resolve_backend(backend: str = "auto", net: str = "alex") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"perceptual.backend must be one of {BACKENDS}, got '{backend}'")
    if net not in NETS:
        raise ValueError(f"perceptual.net must be one of {NETS}, got '{net}'")
    if backend == "auto":
        return "lpips" if lpips_backbone_available(net) else "stlpips"
    if backend == "lpips" and not lpips_backbone_available(net):
        raise FileNotFoundError(
            f"lpips needs the torchvision {net} backbone at {_torchvision_backbone_file(net)}, which is not "
            "present (it downloads on first use, impossible offline); use perceptual.backend=stlpips"
        )
    return backend


class PerceptualLoss(nn.Module):
    """Frozen LPIPS-style distance; ``forward(x, y)`` on (B, 3, H, W) in [-1, 1] -> (B,)."""

    def __init__(self, backend: str = "auto", net: str = "alex"):
        super().__init__()
        self.backend = resolve_backend(backend, net)
        self.net_name = net
        self.net = _build_lpips(net) if self.backend == "lpips" else _build_stlpips(net)
        self.net.eval().requires_grad_(False)

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.net_name}"

    def train(self, mode: bool = True):
        # the network stays in eval mode (dropout off) even inside a training model
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"perceptual inputs must both be (B, 3, H, W); got {tuple(x.shape)} and {tuple(y.shape)}")
        return self.net(x, y).flatten(1).mean(dim=1)


def load_perceptual(perceptual_cfg) -> PerceptualLoss:
    return PerceptualLoss(backend=perceptual_cfg.backend, net=perceptual_cfg.net)
