"""``python -m pokediff.eval --model PATH``: score a diffusion pipeline folder or a GAN checkpoint.

``--samples PATH`` scores images generated elsewhere instead (a sample archive, a folder of archives, or a folder of
images with ``manifest.jsonl``, see ``pokediff.eval.samples``), e.g. those ``benchmarks/gpu_day.py`` made on a GPU.

Writes the result JSON (``--output``) and a sample grid PNG (``--grid``), and prints the metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pokediff.errors import check_writable_file, user_errors, write_failure

from .inception import FEATURE_NETS
from .runner import CLIP_CHOICES, EvalSettings, evaluate, save_grid, write_result


def build_parser() -> argparse.ArgumentParser:
    defaults = EvalSettings()
    p = argparse.ArgumentParser(
        prog="python -m pokediff.eval",
        description=(
            "Score a diffusion pipeline folder or a GAN checkpoint: FID/KID (TF-Inception), CLIP score, colour "
            "and body-shape agreement, diversity and (diffusion) VAE reconstruction. Writes a JSON result and a "
            "sample grid PNG."
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a pipeline folder (model_index.json) or a GAN checkpoint/run folder")
    source.add_argument(
        "--samples",
        help="saved samples with their manifest: a samples-K.tar archive, a folder of "
        "them (e.g. gpu_day.py's --out), or a folder of images + manifest.jsonl",
    )
    p.add_argument(
        "--sources",
        nargs="+",
        choices=["train", "val", "test", "freeform"],
        default=None,
        help="with --samples: which manifest records to score (default: those of --split)",
    )
    p.add_argument(
        "--split",
        default=defaults.split,
        choices=["val", "test", "train"],
        help="val/test: held-out protocol (split captions vs split images); train: samples vs all "
        "training images (default: %(default)s)",
    )
    p.add_argument("--num", type=int, default=None, help="number of samples (default: the split's image count)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--steps", type=int, default=None, help="diffusion inference steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None, help="diffusion CFG scale (default: the pipeline's)")
    p.add_argument("--no-ema", action="store_true", help="GAN: score the raw generator, not its EMA")
    p.add_argument("--kid-subsets", type=int, default=defaults.kid_subsets)
    p.add_argument(
        "--kid-subset-size",
        type=int,
        default=defaults.kid_subset_size,
        help="lowered to the smaller set's size when needed (default: %(default)s)",
    )
    p.add_argument("--diversity-prompts", type=int, default=defaults.diversity_prompts)
    p.add_argument(
        "--diversity-samples",
        type=int,
        default=defaults.diversity_samples,
        help="samples per prompt for pairwise diversity; 0 turns it off (default: %(default)s)",
    )
    p.add_argument(
        "--freeform-samples",
        type=int,
        default=defaults.freeform_samples,
        help="samples per free-form prompt for color_agreement_freeform and shape_agreement_freeform (0: off)",
    )
    p.add_argument(
        "--recon-num",
        type=int,
        default=defaults.recon_num,
        help="val images for the VAE reconstruction metrics; 0 turns them off (default: %(default)s)",
    )
    p.add_argument(
        "--clip",
        default=defaults.clip,
        choices=CLIP_CHOICES,
        help="CLIP for the CLIP score: auto = pretrained open_clip if cached, else the domain CLIP "
        "beside the pipeline (default: %(default)s)",
    )
    p.add_argument(
        "--features",
        default=defaults.features,
        choices=FEATURE_NETS,
        help="FID feature network: inception (standard, comparable FID) or pixels (a weight-free "
        "stand-in for smoke tests, not comparable) (default: %(default)s)",
    )
    p.add_argument(
        "--no-memorization",
        action="store_true",
        help="skip the nearest-training-image check (it needs the train split's features once)",
    )
    p.add_argument("--grid-size", type=int, default=defaults.grid_size, help="samples in the grid PNG")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="reference-feature cache (default: $POKEDIFF_CACHE_DIR or ~/.cache/pokediff, + /eval)",
    )
    p.add_argument(
        "--data-root",
        default=None,
        help="the imagefolder with the real sprites (default: from the "
        "run config / GAN checkpoint, else the bundled data)",
    )
    p.add_argument(
        "--set",
        dest="data_overrides",
        action="append",
        default=[],
        metavar="data.KEY=VALUE",
        help="override a data setting, e.g. --set data.split_seed=1 (repeatable)",
    )
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:1 ... (default: cuda when available)")
    p.add_argument("--output", default="eval_result.json", help="result JSON path (default: %(default)s)")
    p.add_argument("--grid", default=None, help="sample grid PNG path (default: beside --output, *.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--update-card",
        action="store_true",
        help="write the metrics into the pipeline folder's model card (README.md metadata, the Hub's model-index)",
    )
    return p


def main(argv=None, feature_net=None, perceptual=None, clip_scorer=None) -> dict:
    """Parse ``argv``, evaluate, write the JSON and the grid; returns the result dict.

    ``feature_net`` / ``perceptual`` / ``clip_scorer`` replace the default networks (tests inject tiny ones).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    sampler = None
    if args.samples:
        for flag in ("num", "steps", "guidance"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag} does not apply to --samples: the images are already made")
        from .sampling import SavedSamples

        sampler = SavedSamples(args.samples, sources=args.sources or [args.split])
    elif args.sources:
        raise ValueError("--sources applies only to --samples")
    if args.update_card and not (args.model and (Path(args.model) / "model_index.json").is_file()):
        raise ValueError(f"--update-card needs --model to be a pipeline folder, got {args.model}")
    # the outputs are checked before the evaluation, which can take many minutes
    output_path = check_writable_file(args.output, "--output")
    grid_path = check_writable_file(args.grid, "--grid") if args.grid else output_path.with_suffix(".png")
    settings = EvalSettings(
        split=args.split,
        num=args.num,
        seed=args.seed,
        batch_size=args.batch_size,
        steps=args.steps,
        guidance=args.guidance,
        use_ema=not args.no_ema,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        diversity_prompts=args.diversity_prompts,
        diversity_samples=args.diversity_samples,
        freeform_samples=args.freeform_samples,
        recon_num=args.recon_num,
        grid_size=args.grid_size,
        clip=args.clip,
        features=args.features,
        cache_dir=args.cache_dir,
        memorization=not args.no_memorization,
    )
    overrides = list(args.data_overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    result, grid = evaluate(
        args.model,
        settings,
        data_overrides=overrides,
        device=args.device,
        feature_net=feature_net,
        perceptual=perceptual,
        clip_scorer=clip_scorer,
        progress=not args.quiet,
        sampler=sampler,
    )
    try:
        output = write_result(result, output_path)
        if len(grid):
            save_grid(grid, grid_path)
    except OSError as err:
        raise write_failure(output_path, err) or err
    if args.update_card:
        from pokediff.hub import card_metrics, update_model_card

        update_model_card(args.model, metrics=card_metrics(result))
    print(json.dumps({"output": str(output), "grid": str(grid_path), **result["metrics"]}, indent=2))
    return result


def cli(argv=None) -> int:
    """Console entry point: errors from bad input print one line and exit with status 2."""
    try:
        main(argv)
    except (ValueError, *user_errors()) as err:  # EvalSettings and the runner check values with ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
