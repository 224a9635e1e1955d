"""Models shipped inside the package, each a saved ``PokeSpritePipeline`` folder (``pokediff-64/``).

``PokeSpritePipeline.from_pretrained("pokediff/pokediff-64")`` loads it offline (``pokediff.pipeline.SHIPPED_MODELS``);
how it was trained and what it scores: its ``README.md`` and the project README, "The shipped model".

    python -m pokediff.pretrained outputs/release/pipeline \
        --record-sample tests/reference/pokediff-64_2step.png   # a trained pipeline -> pokediff/pretrained/pokediff-64
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent
DEFAULT_NAME = "pokediff-64"
SIZE_LIMIT_BYTES = 32 * 2**20  # the repository travels whole to a GPU machine: the model stays small


# the sample `tests/test_shipped_model.py` compares with the one recorded at export: any change of the weights or
# of the loader shows
REFERENCE_PROMPT = "a small green creature with a bulb on its back"


def reference_sample(pipe):
    """The shipped model's check sample: ``REFERENCE_PROMPT``, seed 0, 2 steps, default guidance (a PIL image)."""
    return pipe(REFERENCE_PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]


def folder_size(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@torch.no_grad()
def export_pipeline(
    source,
    dest,
    half: bool = True,
    check_prompts: tuple[str, ...] = ("a small green creature",),
    record_sample=None,
    guidance_scale: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> dict:
    """Save the pipeline folder ``source`` as ``dest`` with the U-Net's weights in half precision (loaded back as
    float32, as diffusers does by default); the VAE stays float32 (2.6 MB: it defines the latents a later chunk
    trains on). The model card comes along. Returns the folder size and the largest pixel change half precision
    makes on a few seeded samples (fp32 weights vs half); ``record_sample`` (a .png path) also saves the exported
    model's ``reference_sample()``; ``guidance_scale`` and ``guidance_interval`` set the folder's default
    classifier-free guidance and the steps it applies to (a folder may be exported onto itself to change only those)."""
    from pokediff.pipeline import PokeSpritePipeline

    source, dest = Path(source), Path(dest)
    full = PokeSpritePipeline.from_pretrained(source)
    full.set_progress_bar_config(disable=True)
    if guidance_scale is not None:
        full._check_guidance_scale(guidance_scale)
        full.register_to_config(guidance_scale=float(guidance_scale))
    if guidance_interval is not None:
        full._check_guidance_interval(guidance_interval)
        full.register_to_config(guidance_interval=[float(f) for f in guidance_interval])

    def draw(pipe):
        generators = [torch.Generator().manual_seed(k) for k in range(len(check_prompts))]
        return pipe(list(check_prompts), generator=generators, output_type="pt").images

    # drawn before saving: exported onto itself, the source folder is gone by the time the copy is loaded
    before = draw(full)
    if half:
        full.unet.to(torch.float16)
    full.save_pretrained(dest)
    if (source / "README.md").is_file() and source.resolve() != dest.resolve():
        from pokediff.hub import update_model_card

        shutil.copyfile(source / "README.md", dest / "README.md")
        update_model_card(dest, repo_id=f"pokediff/{dest.name}")  # its usage snippets load the shipped name

    shipped = PokeSpritePipeline.from_pretrained(dest)
    shipped.set_progress_bar_config(disable=True)
    change = (before - draw(shipped)).abs().max().item() * 255
    if record_sample is not None:  # the exported weights' reference_sample(), which the shipped-model test redraws
        from pokediff.fileio import atomic_write

        with atomic_write(record_sample) as tmp:
            reference_sample(shipped).save(tmp, format="PNG")
    size = folder_size(dest)
    if size > SIZE_LIMIT_BYTES:
        raise ValueError(f"{dest} is {size / 2**20:.1f} MiB, over the {SIZE_LIMIT_BYTES / 2**20:.0f} MiB limit")
    report = {"folder": str(dest), "size_mib": round(size / 2**20, 2), "max_pixel_change_of_half_precision": change}
    return {**report, "recorded_sample": str(record_sample)} if record_sample is not None else report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pokediff.pretrained", description=export_pipeline.__doc__)
    parser.add_argument("source", help="a trained pipeline folder, e.g. outputs/release/pipeline")
    parser.add_argument("--name", default=DEFAULT_NAME, help="folder under pokediff/pretrained/ (default: %(default)s)")
    parser.add_argument("--full-precision", action="store_true", help="keep the U-Net in float32")
    parser.add_argument(
        "--record-sample",
        metavar="PNG",
        help="also save the exported model's reference_sample() here (tests/reference/pokediff-64_2step.png)",
    )
    parser.add_argument(
        "--guidance", type=float, help="the folder's default classifier-free guidance (default: the source's)"
    )
    parser.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("START", "STOP"),
        help="the fractions of the steps that classifier-free guidance applies to (default: the source's)",
    )
    args = parser.parse_args(argv)
    try:
        report = export_pipeline(
            args.source,
            SHIPPED_DIR / args.name,
            half=not args.full_precision,
            record_sample=args.record_sample,
            guidance_scale=args.guidance,
            guidance_interval=args.guidance_interval,
        )
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report)
    return 0
