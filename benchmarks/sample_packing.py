"""What packing samples as WebP does to the metrics, measured on real sprites; prints JSON.

    python benchmarks/sample_packing.py --split val --num 64 --ref test          # Inception (CPU: minutes)
    python benchmarks/sample_packing.py --features pixels --num 16               # quick smoke run

For each encoding (lossless WebP and the lossy qualities ``pokediff.eval.samples`` may fall back to): bytes per
image, pixel error, how often the colour judge changes its answer, and with the FID features the KID between the
originals and their decoded copies plus the KID of both against a reference split (the shift a model's score
would see). Real sprites are cleaner than early samples, so their sizes are a lower bound.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pokediff.config import DataConfig  # noqa: E402
from pokediff.data import load_splits  # noqa: E402
from pokediff.eval.color import dominant_color  # noqa: E402
from pokediff.eval.fid import extract_features, kernel_inception_distance  # noqa: E402
from pokediff.eval.inception import FEATURE_NETS, load_feature_net  # noqa: E402
from pokediff.eval.reference_stats import real_image_batches  # noqa: E402
from pokediff.eval.samples import LOSSY_QUALITIES, decode, encode_webp, image_tensor, to_uint8  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", default="val")
    p.add_argument("--num", type=int, default=64, help="real images packed (default: %(default)s)")
    p.add_argument("--ref", default="test", help="reference split for the KID shift (default: %(default)s)")
    p.add_argument("--qualities", type=int, nargs="*", default=list(LOSSY_QUALITIES[:2]))
    p.add_argument("--features", default="inception", choices=FEATURE_NETS)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cfg = DataConfig(augment=False)
    splits = load_splits(cfg)
    split = splits[args.split].select(range(min(args.num, len(splits[args.split]))))
    originals = torch.cat(list(real_image_batches(split, cfg, 16)))
    arrays = [to_uint8(im) for im in originals]
    originals = torch.stack([image_tensor_from_array(a) for a in arrays])  # what an 8-bit writer keeps anyway
    net = load_feature_net(args.features, "cpu")
    ref = extract_features(
        torch.cat(list(real_image_batches(splits[args.ref], cfg, 16))), net, batch_size=16, progress=False
    )
    orig_feats = extract_features(originals, net, batch_size=16, progress=False)
    orig_colors = [dominant_color(im, cfg.background) for im in originals]
    kid_size = min(len(ref), len(arrays))
    kid_ref_orig = kernel_inception_distance(ref, orig_feats, subsets=50, subset_size=kid_size)[0]
    result = {
        "split": args.split,
        "num_images": len(arrays),
        "reference": f"{args.ref} ({len(ref)} images)",
        "features": args.features,
        "kid_ref_vs_original": kid_ref_orig,
        "encodings": {},
    }
    for quality in (None, *args.qualities):
        encoded = [encode_webp(a, quality) for a in arrays]
        decoded = torch.stack([image_tensor(decode(b)) for b in encoded])
        diff = (decoded - originals).abs() * 255
        feats = extract_features(decoded, net, batch_size=16, progress=False)
        colors = [dominant_color(im, cfg.background) for im in decoded]
        kid_ref_packed = kernel_inception_distance(ref, feats, subsets=50, subset_size=kid_size)[0]
        result["encodings"]["lossless" if quality is None else f"q{quality}"] = {
            "kib_per_image": round(sum(map(len, encoded)) / len(encoded) / 1024, 1),
            "max_abs_pixel_error": float(diff.max()),
            "mean_abs_pixel_error": round(float(diff.mean()), 3),
            "colour_judge_changed": round(float(np.mean([a != b for a, b in zip(orig_colors, colors)])), 4),
            "kid_original_vs_packed": kernel_inception_distance(orig_feats, feats, subsets=50, subset_size=len(arrays))[
                0
            ],
            "kid_ref_vs_packed": kid_ref_packed,
            "kid_shift": kid_ref_packed - kid_ref_orig,
        }
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))
    return result


def image_tensor_from_array(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)


if __name__ == "__main__":
    main()
