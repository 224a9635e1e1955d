#!/usr/bin/env python
"""The KID floor a VAE sets: KID and FID of its reconstructions of the training sprites against those sprites.

    python benchmarks/vae_kid_floor.py RUN/vae [RUN2/vae ...] --config configs/cpu.yaml

A latent diffusion model draws through the decoder: ``decode(mode(encode(x)))`` of the training set is what a
stage 2 that reproduced the training latents exactly would give, so its KID is in practice a floor for samples
drawn through this VAE (not a strict bound), on the same footing as the CPU protocol's KID (TF-Inception features, the cached reference features
of the train split at the config's resolution). Prints JSON, one entry per VAE folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


@torch.no_grad()
def reconstructions(vae, batches, device):
    for images_0_1 in batches:
        z = vae.encode(images_0_1.to(device) * 2 - 1).latent_dist.mode()
        yield ((vae.decode(z).sample + 1) / 2).clamp(0, 1).float().cpu()


def kid_floor(data_cfg, vae_dirs, split_name: str = "train") -> dict:
    """{"num_images", "vaes": {folder: {"kid", "kid_std", "fid"}}}: each VAE's reconstructions of ``split_name``
    against that split."""
    from pokediff.data import load_splits
    from pokediff.eval.fid import extract_features, frechet_distance, kernel_inception_distance
    from pokediff.eval.inception import load_feature_net
    from pokediff.eval.reference_stats import real_image_batches, reference_features
    from pokediff.models.vae import SpriteVAE

    split = load_splits(data_cfg)[split_name]
    feature_net = load_feature_net("inception")
    real = reference_features(split, data_cfg, split_name, feature_net).features
    results = {}
    for folder in vae_dirs:
        vae = SpriteVAE.from_pretrained(folder).eval()
        batches = reconstructions(vae, real_image_batches(split, data_cfg), "cpu")
        fake = extract_features(batches, feature_net, desc=f"{folder} recon")
        kid, kid_std, _ = kernel_inception_distance(real, fake)
        results[str(folder)] = {
            "kid": round(kid, 5),
            "kid_std": round(kid_std, 5),
            "fid": round(frechet_distance(real, fake), 2),
        }
    return {"num_images": len(split), "vaes": results}


def emit_json(summary: dict, output: str | None) -> dict:
    """Print ``summary`` as JSON, and write it to ``output`` too when given."""
    text = json.dumps(summary, indent=2)
    print(text)
    if output:
        Path(output).write_text(text)
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vae_dirs", nargs="+", type=Path, help="saved SpriteVAE folders")
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"))
    parser.add_argument("--split", default="train")
    parser.add_argument("--output", help="write the JSON here too")
    args = parser.parse_args(argv)
    for folder in args.vae_dirs:
        if not (folder / "config.json").is_file():
            raise SystemExit(f"error: {folder} is not a saved VAE folder (no config.json)")

    from pokediff.config import load_config

    floor = kid_floor(load_config(args.config).data, args.vae_dirs, args.split)
    summary = {"config": args.config, "split": args.split, **floor}
    return emit_json(summary, args.output)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
