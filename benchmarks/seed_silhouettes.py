#!/usr/bin/env python
"""Does the seed or the prompt set a sample's silhouette? (issue #22: "one seed must not give the same silhouette
for every prompt").

    python benchmarks/seed_silhouettes.py [--model pokediff/pokediff-64] [--prompts 16] [--seeds 8]
        [--steps N] [--guidance G] [--shape-guidance S] [--json OUT.json] [--grid OUT.png]

Draws the first P val captions with S seeds each, seed s the same for every caption, and compares the samples'
sprite masks (the colour judge's ``sprite_mask``) by intersection over union, pair by pair: samples that share the
seed only (``same_seed_iou``), the caption only (``same_prompt_iou``), or neither (``neither_iou``: the overlap two
of these samples have by chance, at their size). A model whose seed sets the silhouette has ``same_seed_iou`` well
above ``neither_iou``; one whose caption sets it, ``same_prompt_iou`` above it. ``real_pairs_iou`` (the real val
sprites of the same captions, pairwise) and the fill fractions are for scale. Prints JSON; the grid has a row per
caption, its real sprite first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def masks_of(images_0_1: torch.Tensor, background) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> boolean sprite masks (N, H, W)."""
    from pokediff.eval.color import sprite_mask

    arrays = images_0_1.permute(0, 2, 3, 1).numpy()
    return np.stack([sprite_mask(a, background) for a in arrays])


def seed_silhouettes(model: str, prompts: int, seeds: int, seed: int = 0, batch_size: int = 16, **call_kwargs):
    """(summary dict, samples (P, S, 3, H, W), real sprites (P, 3, H, W))."""
    from pokediff.data import SpriteDataset, load_splits
    from pokediff.eval.diversity import mean_pairwise_iou, silhouette_overlap
    from pokediff.eval.reference_stats import real_image_batches
    from pokediff.eval.runner import resolve_data_config
    from pokediff.eval.sampling import DiffusionSampler, pipeline_batches
    from pokediff.pipeline import shipped_model_path

    sampler = DiffusionSampler(shipped_model_path(model) or model)
    data_cfg = resolve_data_config(sampler)
    data_cfg.resolution = sampler.resolution  # real sprites at the size the model draws
    val = load_splits(data_cfg)["val"]
    if not 2 <= prompts <= len(val):
        raise ValueError(f"--prompts must be between 2 and the val split's {len(val)}, got {prompts}")
    rows = val.select(range(prompts))
    captions = SpriteDataset(rows, data_cfg, train=False).captions
    real = torch.cat(list(real_image_batches(rows, data_cfg, batch_size)))
    # sample s of every caption uses seed + s
    batches = pipeline_batches(
        sampler.pipeline,
        [c for c in captions for _ in range(seeds)],
        seed,
        batch_size,
        progress=True,
        desc=f"{prompts} captions x {seeds} seeds",
        seeds=[seed + s for _ in captions for s in range(seeds)],
        **call_kwargs,
    )
    samples = torch.cat(list(batches)).unflatten(0, (prompts, seeds))
    background = sampler.background
    sample_masks = masks_of(samples.flatten(0, 1), background).reshape(prompts, seeds, *samples.shape[-2:])
    overlap = silhouette_overlap(sample_masks)
    real_masks = masks_of(real, background)
    summary = {
        "model": str(model),
        "prompts": prompts,
        "seeds": seeds,
        "first_seed": seed,
        "call": dict(call_kwargs),
        "same_seed_iou": round(overlap["same_seed"], 4),
        "same_prompt_iou": round(overlap["same_prompt"], 4),
        "neither_iou": round(overlap["neither"], 4),
        "real_pairs_iou": round(mean_pairwise_iou(real_masks), 4),
        "sample_fill": round(float(sample_masks.mean()), 4),
        "real_fill": round(float(real_masks.mean()), 4),
    }
    return summary, samples, real


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pokediff/pokediff-64", help="pipeline folder or the shipped model's name")
    parser.add_argument("--prompts", type=int, default=16, help="the first N val captions (default 16)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per caption, the same for all (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's, 25)")
    parser.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance (default: the pipeline's)"
    )
    parser.add_argument("--shape-guidance", type=float, default=None, help="shape guidance (default: the model's)")
    parser.add_argument("--json", help="also write the JSON here")
    parser.add_argument("--grid", help="PNG: a row per caption, the real sprite first, then its seeds")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error(f"--seeds must be at least 2, got {args.seeds}")
    call = {} if args.shape_guidance is None else {"shape_guidance_scale": args.shape_guidance}
    if args.steps is not None:
        call["num_inference_steps"] = args.steps
    if args.guidance is not None:
        call["guidance_scale"] = args.guidance
    try:
        summary, samples, real = seed_silhouettes(args.model, args.prompts, args.seeds, args.seed, **call)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        from pokediff.fileio import write_text_atomic

        write_text_atomic(Path(args.json), text + "\n")
    if args.grid:
        from pokediff.images import save_image_grid

        rows = torch.cat([real[:, None], samples], dim=1)  # (P, 1 + S, 3, H, W)
        save_image_grid(rows.flatten(0, 1), args.grid, nrow=1 + args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
