"""Generate sprites: ``python -m pokediff.generate "a prompt" --num 8`` (the shipped model) or ``--model PATH``.

Writes one PNG per sprite (``<out>_000.png``, ...) and a grid (``<out>``). Image ``k`` uses seed ``seed + k``,
so any single sprite can be regenerated on its own.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from PIL import Image

from pokediff.device import resolve_device
from pokediff.errors import PokediffError, check_writable_file, hub_error_message, write_failure
from pokediff.pipeline import DEFAULT_MODEL, PokeSpritePipeline
from pokediff.schedulers import INFERENCE_SCHEDULERS, make_inference_scheduler

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes unsigned 64-bit seeds


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Images in rows of ``cols`` (default: about square); keeps RGBA."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    mode = "RGBA" if any(im.mode == "RGBA" for im in images) else "RGB"
    grid = Image.new(mode, (cols * w, rows * h), (0, 0, 0, 0) if mode == "RGBA" else (255, 255, 255))
    for k, im in enumerate(images):
        grid.paste(im.convert(mode), ((k % cols) * w, (k // cols) * h))
    return grid


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pokediff.generate", description=__doc__.splitlines()[0])
    p.add_argument("prompts", nargs="+", help='one or more captions ("" = unconditional)')
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a saved PokeSpritePipeline folder (e.g. <run>/pipeline) or hub id (default: {DEFAULT_MODEL}, "
        "the model shipped in the package, offline)",
    )
    p.add_argument("--num", type=int, default=8, help="sprites per prompt (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sprite; sprite k uses seed+k")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale, >= 1 (default: the model's own, 4 unless its folder sets another)",
    )
    p.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("START", "STOP"),
        help="guide only the steps from START to STOP (fractions of --steps; the rest run the U-Net once, faster); "
        "default: the model's own, all steps unless its folder sets another",
    )
    p.add_argument(
        "--shape-guidance",
        type=float,
        default=None,
        help="shape guidance scale, >= 0 (0 = off; default: the model's own, 30 for the shipped model): pulls each "
        "sprite towards the body shape its prompt names ('with wings', 'four-legged', 'a snake'...)",
    )
    p.add_argument("--negative", default=None, help="negative prompt (replaces the empty caption in guidance)")
    p.add_argument(
        "--scheduler",
        choices=sorted(INFERENCE_SCHEDULERS),
        default=None,
        help="sampler; default: the one saved with the pipeline (DPM-Solver++)",
    )
    p.add_argument("--rgba", action="store_true", help="key the background out to transparency")
    p.add_argument("--batch-size", type=int, default=16, help="sprites per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    p.add_argument("--out", default="sprites.png", help="grid path (.png); sprites go beside it as <stem>_NNN.png")
    return p.parse_args(argv)


def generate(args: argparse.Namespace) -> list[Path]:
    """Run the pipeline as the arguments say; returns the written paths (sprites, then the grid)."""
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png path (PNG keeps the sprites lossless and RGBA), got {out}")
    for name, value in (("--num", args.num), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if args.shape_guidance is not None and not args.shape_guidance >= 0:  # before the model loads
        raise ValueError(f"--shape-guidance must be >= 0 (0 = off), got {args.shape_guidance}")
    if args.guidance_interval is not None:
        try:
            PokeSpritePipeline._check_guidance_interval(args.guidance_interval)
        except ValueError as err:
            raise ValueError(f"--guidance-interval: {err}") from None
    last_seed = MAX_SEED - (args.num - 1)
    if not 0 <= args.seed <= last_seed:
        # sprite k uses seed + k, and torch seeds are unsigned 64-bit integers
        raise ValueError(
            f"--seed must be in 0..{last_seed} with --num {args.num} (sprite k uses seed + k, "
            f"at most 2**64 - 1), got {args.seed}"
        )
    check_writable_file(out, "--out")  # before minutes of sampling, not after
    device = resolve_device(args.device)
    pipe = PokeSpritePipeline.from_pretrained(args.model)
    if args.scheduler is not None:
        pipe.scheduler = make_inference_scheduler(args.scheduler, pipe.scheduler.config)
    pipe.to(device)

    jobs = [(prompt, args.seed + k) for prompt in args.prompts for k in range(args.num)]
    images: list[Image.Image] = []
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start : start + args.batch_size]
        result = pipe(
            [prompt for prompt, _ in chunk],
            negative_prompt=args.negative,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            guidance_interval=args.guidance_interval,
            generator=[torch.Generator(device="cpu").manual_seed(seed) for _, seed in chunk],
            rgba=args.rgba,
            output_type="pil",
            shape_guidance_scale=args.shape_guidance,
        )
        images.extend(result.images)

    written = []
    path = out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(images):
            path = out.with_name(f"{out.stem}_{k:03d}.png")
            image.save(path)
            written.append(path)
        path = out
        image_grid(images, cols=args.num if len(args.prompts) > 1 else None).save(out)
    except OSError as err:
        raise write_failure(path, err) or err
    written.append(out)
    return written


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        written = generate(args)
    except (PokediffError, OSError, ValueError) as err:  # OSError: missing folder/file, or a hub id not fetched
        print(f"error: {hub_error_message(err) or err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written) - 1} sprites and the grid {written[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
