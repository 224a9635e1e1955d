"""Sample a trained GAN: ``python -m pokediff.gan.generate --checkpoint RUN_OR_CKPT --num 64``.

:func:`sample_from_checkpoint` is the Python entry point the evaluation suite uses.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import torch
from PIL import Image

from pokediff.data import TYPE_NAMES
from pokediff.device import resolve_device
from pokediff.errors import check_writable_folder, report_user_errors, write_failure
from pokediff.gan.checkpoint import load_generator, resolve_checkpoint

logger = logging.getLogger(__name__)


def _class_labels(generator, meta, num, type_name, rng) -> torch.Tensor | None:
    if not generator.is_conditional:
        if type_name is not None:
            raise ValueError(
                f"--type needs a conditional model (cdcgan); this checkpoint holds an unconditional "
                f"'{meta['model_name']}' (train it with --type {type_name} to restrict its data instead)"
            )
        return None
    if type_name is not None:
        if type_name.lower() not in TYPE_NAMES:
            raise ValueError(f"unknown type '{type_name}'; choose from {', '.join(TYPE_NAMES)}")
        return torch.full((num,), TYPE_NAMES.index(type_name.lower()), dtype=torch.long)
    # no type asked for: draw types as often as they occurred in the training data
    counts = meta.get("class_counts") or [1] * generator.config.num_classes
    weights = torch.tensor(counts, dtype=torch.float)
    return torch.multinomial(weights, num, replacement=True, generator=rng)


@torch.no_grad()
def sample_from_checkpoint(
    path,
    num: int,
    seed: int = 0,
    type_name: str | None = None,
    use_ema: bool = True,
    device="cpu",
    batch_size: int = 64,
) -> torch.Tensor:
    """``num`` images (N, 3, H, W) in [0, 1] on the CPU from a GAN checkpoint (or run folder: its latest).

    ``use_ema`` picks the EMA generator when the checkpoint has one (wgan_large); ``type_name`` fixes
    the primary type of a cdcgan (otherwise types follow the training data's frequencies). The same
    ``seed`` gives the same images on any device.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator, meta = load_generator(path, use_ema=use_ema, device=device)
    if use_ema and not meta.get("has_ema"):
        logger.info("%s has no EMA generator; sampling the raw generator", resolve_checkpoint(path))
    return sample_generator(generator, meta, num, seed=seed, type_name=type_name, device=device, batch_size=batch_size)


@torch.no_grad()
def sample_generator(
    generator, meta: dict, num: int, seed: int = 0, type_name: str | None = None, device="cpu", batch_size: int = 64
) -> torch.Tensor:
    """``num`` images (N, 3, H, W) in [0, 1] from a generator already loaded by ``load_generator`` (same seeding
    as :func:`sample_from_checkpoint`, so a long-lived process such as the web demo loads it only once)."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = torch.Generator().manual_seed(seed)
    noise = torch.randn(num, generator.config.latent_dim, generator=rng)
    labels = _class_labels(generator, meta, num, type_name, rng)
    stage = {}
    if meta["model_name"] == "progan":  # sample at the stage training had reached
        stage = {"resolution": meta["stage"]["resolution"], "alpha": meta["stage"]["alpha"]}
    chunks = []
    for start in range(0, num, batch_size):
        z = noise[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device) if labels is not None else None
        chunks.append(((generator(z, y, **stage).clamp(-1, 1) + 1) / 2).float().cpu())
    return torch.cat(chunks)


def save_images(images: torch.Tensor, folder, prefix: str = "sample", grid: bool = True) -> list[Path]:
    """One PNG per image (and grid.png); returns the written paths."""
    from torchvision.utils import save_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype("uint8")
        path = folder / f"{prefix}_{i:04d}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
    if grid:
        nrow = max(1, int(math.ceil(math.sqrt(len(images)))))
        save_image(images, folder / "grid.png", nrow=nrow, padding=2, pad_value=1.0)
        paths.append(folder / "grid.png")
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pokediff.gan.generate", description="Sample a trained GAN.")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (latest checkpoint)")
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--no-ema", action="store_true", help="sample the raw generator even if an EMA one exists")
    p.add_argument("--type", dest="type_name", help="primary type for a conditional (cdcgan) checkpoint")
    p.add_argument("--output", help="folder for the PNGs (default: <checkpoint>/samples-seed<seed>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--batch-size", type=int, default=64)
    return p


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return report_user_errors(_generate, args)
    except ValueError as err:  # bad --num / --type / --device values
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _generate(args) -> Path:
    device = resolve_device(args.device)
    checkpoint = resolve_checkpoint(args.checkpoint)
    suffix = f"-{args.type_name}" if args.type_name else ""
    output = Path(args.output) if args.output else checkpoint / f"samples-seed{args.seed}{suffix}"
    check_writable_folder(output, "--output")  # before sampling
    images = sample_from_checkpoint(
        checkpoint,
        args.num,
        seed=args.seed,
        type_name=args.type_name,
        use_ema=not args.no_ema,
        device=device,
        batch_size=args.batch_size,
    )
    try:
        save_images(images, output)
    except OSError as err:
        raise write_failure(output, err) or err
    print(f"wrote {len(images)} images to {output}")
    return output


if __name__ == "__main__":
    main()
