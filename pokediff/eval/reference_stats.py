"""Features of a real split, cached on disk under a key that changes when the images or preprocessing do."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from pokediff.data import SpriteDataset, collate_sprites
from pokediff.fileio import atomic_write

from .fid import extract_features

logger = logging.getLogger(__name__)

CACHE_ENV = "POKEDIFF_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$POKEDIFF_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/pokediff`` (``~/.cache/pokediff``), + ``/eval``."""
    root = os.environ.get(CACHE_ENV)
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pokediff"
    return Path(root).expanduser() / "eval"


def feature_net_name(feature_net: nn.Module) -> str:
    return getattr(feature_net, "name", type(feature_net).__name__)


def _entry_digest(entry) -> tuple[str, str]:
    """(file name, sha256 of the encoded image bytes) of an undecoded ``datasets.Image`` entry."""
    if isinstance(entry, dict):
        data = entry.get("bytes")
        path = entry.get("path") or ""
        if data is None:
            if not path or not Path(path).is_file():
                raise FileNotFoundError(f"reference image file is missing: {path or '<no path>'}")
            data = Path(path).read_bytes()
        return os.path.basename(path), hashlib.sha256(data).hexdigest()
    # a decoded PIL image (a dataset cast with decode=True): hash the pixels
    return getattr(entry, "filename", "") or "", hashlib.sha256(entry.tobytes()).hexdigest()


def dataset_fingerprint(hf_split: datasets.Dataset, data_cfg, split_name: str, feature_name: str) -> str:
    """Hash of the split's file names + image bytes, the preprocessing (resolution, background, trim),
    the split name and the feature network."""
    h = hashlib.sha256()
    settings = {
        "split": split_name,
        "resolution": int(data_cfg.resolution),
        "background": [int(c) for c in data_cfg.background],
        "trim": bool(data_cfg.trim),
        "features": feature_name,
        "rows": len(hf_split),
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for entry in hf_split[data_cfg.image_column]:
        name, digest = _entry_digest(entry)
        h.update(f"{name}:{digest}\n".encode())
    return h.hexdigest()[:24]


def real_image_batches(hf_split: datasets.Dataset, data_cfg, batch_size: int = 50):
    """Batches (B,3,R,R) in [0,1] of a split, preprocessed as for training without augmentation."""
    loader = DataLoader(
        SpriteDataset(hf_split, data_cfg, train=False),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_sprites,
        num_workers=data_cfg.num_workers,
    )
    for batch in loader:
        yield (batch["pixel_values"] + 1) / 2


@dataclass
class ReferenceFeatures:
    features: torch.Tensor  # (N, D) float64
    key: str
    path: Path
    cached: bool  # True when read from the cache instead of computed


def reference_features(
    hf_split: datasets.Dataset,
    data_cfg,
    split_name: str,
    feature_net: nn.Module,
    resolution: int | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 50,
    device=None,
    progress: bool = True,
) -> ReferenceFeatures:
    """Features of every image of ``hf_split`` at ``resolution`` (default: ``data_cfg.resolution``), from the
    cache when the key matches, else computed and written atomically (safetensors)."""
    if len(hf_split) < 2:
        raise ValueError(f"the '{split_name}' split has {len(hf_split)} images; FID/KID need at least 2")
    if resolution is not None and int(resolution) != int(data_cfg.resolution):
        data_cfg = replace(data_cfg, resolution=int(resolution))
    name = feature_net_name(feature_net)
    key = dataset_fingerprint(hf_split, data_cfg, split_name, name)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"reference-{split_name}-{key}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                features = f.get_tensor("features")
        except (SafetensorError, OSError) as err:  # truncated or overwritten: a cache, so rebuild it
            logger.warning("feature cache %s is unreadable (%s): computing the features again", path, err)
            features = None
        if features is not None and features.shape[0] == len(hf_split):
            return ReferenceFeatures(features.double(), key, path, cached=True)
    features = extract_features(
        real_image_batches(hf_split, data_cfg, batch_size),
        feature_net,
        device=device,
        desc=f"real '{split_name}' features",
        progress=progress,
        total=-(-len(hf_split) // batch_size),
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"split": split_name, "key": key, "feature_net": name, "resolution": str(data_cfg.resolution)}
    with atomic_write(path) as tmp:
        save_file({"features": features.contiguous()}, tmp, metadata=metadata)
    return ReferenceFeatures(features, key, path, cached=False)
