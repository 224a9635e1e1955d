"""Evaluation cost and judge quality; prints one JSON object.

- Inception feature throughput (images/s, 215 px sprites -> 2048-d pool features) on the device;
- building the real split's reference features from scratch (what the first eval of a split pays);
- the colour judge's agreement with the dex colour on every real sprite (the colour metric's ceiling).

    python benchmarks/eval_speed.py [--device cuda] [--num 256] [--batch-size 64] [--split val]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num", type=int, default=None, help="images for the throughput run (default 256 GPU / 16 CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 GPU / 8 CPU")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--data-root", default=None)
    p.add_argument("--skip-reference", action="store_true", help="skip the reference-feature timing")
    args = p.parse_args(argv)
    on_gpu = str(args.device).startswith("cuda")
    num = args.num or (256 if on_gpu else 16)
    batch_size = args.batch_size or (64 if on_gpu else 8)

    from pokediff.config import DataConfig
    from pokediff.data import load_splits
    from pokediff.eval import color_agreement, load_inception, reference_features
    from pokediff.eval.reference_stats import real_image_batches

    out = {
        "benchmark": "eval_speed",
        "device": args.device
        + (
            f" ({torch.cuda.get_device_name()})"
            if on_gpu
            else f" ({platform.machine()}, {torch.get_num_threads()} threads)"
        ),
        "torch": torch.__version__,
    }
    t0 = time.perf_counter()
    net = load_inception(args.device)
    out["inception_load_s"] = round(time.perf_counter() - t0, 3)

    images = torch.rand(num, 3, 215, 215, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net(images[: min(2, num)].to(args.device))  # warm-up (TorchScript profiling runs, CUDA init)
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for batch in images.split(batch_size):
            net(batch.to(args.device))
        if on_gpu:
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    out["inception"] = {
        "images": num,
        "batch_size": batch_size,
        "seconds": round(elapsed, 3),
        "images_per_s": round(num / elapsed, 2),
    }

    data_cfg = DataConfig(augment=False, **({"root": args.data_root} if args.data_root else {}))
    splits = load_splits(data_cfg)
    if not args.skip_reference:
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            ref = reference_features(
                splits[args.split],
                data_cfg,
                args.split,
                net,
                cache_dir=cache,
                batch_size=batch_size,
                device=args.device,
                progress=False,
            )
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            reference_features(splits[args.split], data_cfg, args.split, net, cache_dir=cache, progress=False)
            hit = time.perf_counter() - t0
        out["reference"] = {
            "split": args.split,
            "images": int(ref.features.shape[0]),
            "build_s": round(build, 2),
            "cache_hit_s": round(hit, 3),
        }

    # colour judge ceiling on every real sprite, as the eval sees them (composited on the background)
    t0 = time.perf_counter()
    judged, colours = 0, []
    ceilings = {}
    for name, split in splits.items():
        targets = [c if c else None for c in split["color"]]
        batches = torch.cat(list(real_image_batches(split, data_cfg, 64)))
        result = color_agreement(list(batches), targets, data_cfg.background)
        ceilings[name] = round(result["accuracy"], 4)
        judged += result["num_scored"]
        colours.extend(t for t in targets if t)
    majority = max(colours.count(c) for c in set(colours)) / len(colours)
    out["color_judge"] = {
        "agreement_by_split": ceilings,
        "images": judged,
        "majority_colour_rate": round(majority, 4),
        "ms_per_image": round(1000 * (time.perf_counter() - t0) / judged, 2),
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
