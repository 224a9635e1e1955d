"""One face for the models the eval scores: a diffusion pipeline folder or a GAN checkpoint.

Both give images (N, 3, H, W) in [0, 1] for a list of prompts (diffusion) or primary types (type-conditional
GAN), reproducibly from a seed: image ``i`` of a call always uses seed ``seed + i`` for diffusion, so the
samples do not depend on the batch size.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

GAN_CHUNK = 512  # images per sample_from_checkpoint call
TYPE_SEED_STRIDE = 7919  # type group g of a conditional GAN samples with seed + g * stride


def _hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_pipeline_folder(path) -> bool:
    return (Path(path) / "model_index.json").is_file()


class DiffusionSampler:
    kind = "diffusion"
    text_conditional = True

    def __init__(self, path, device="cpu", num_inference_steps: int | None = None, guidance_scale: float | None = None):
        from pokediff.pipeline import PokeSpritePipeline

        self.path = Path(path)
        self.pipeline = PokeSpritePipeline.from_pretrained(str(self.path)).to(device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.device = torch.device(device)
        # None: the pipeline's own defaults
        self.call_kwargs = {}
        if num_inference_steps is not None:
            self.call_kwargs["num_inference_steps"] = int(num_inference_steps)
        if guidance_scale is not None:
            self.call_kwargs["guidance_scale"] = float(guidance_scale)
        self.background = list(self.pipeline.config.background)
        self.resolution = int(self.pipeline.resolution)

    @property
    def vae(self):
        return self.pipeline.vae

    def encode_text(self, captions: list[str]):
        embeds, mask, _, _ = self.pipeline.encode_prompt(captions, self.device, 1, False)
        return embeds, mask

    def config_hash(self) -> str:
        configs = {}
        for file in sorted(self.path.glob("*/*config.json")) + [self.path / "model_index.json"]:
            configs[str(file.relative_to(self.path))] = json.loads(file.read_text())
        return _hash_json(configs)

    def describe(self) -> dict:
        # the guidance the samples were drawn with: the folder's own (always in the pipeline's config) unless overridden
        config = self.pipeline.config
        return {
            "scheduler": type(self.pipeline.scheduler).__name__,
            "guidance_scale": config.guidance_scale,
            "guidance_interval": list(config.guidance_interval),
            **self.call_kwargs,
        }

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        type_names=None,
        seed: int = 0,
        batch_size: int = 16,
        progress: bool = True,
        desc: str = "sampling",
    ):
        """Yields batches (B, 3, H, W) in [0, 1] on the CPU, one image per prompt."""
        yield from pipeline_batches(self.pipeline, prompts, seed, batch_size, progress, desc, **self.call_kwargs)


@torch.no_grad()
def pipeline_batches(
    pipeline,
    prompts: list[str],
    seed: int,
    batch_size: int,
    progress: bool = False,
    desc: str = "sampling",
    seeds: list[int] | None = None,
    **call_kwargs,
):
    """Batches (B, 3, H, W) in [0, 1] on the CPU from a text-to-image pipeline, one image per prompt; sample k is
    drawn with seed + k (or ``seeds[k]``) whatever the batch size, so a subset or another batching gives the same
    images. Prompts cut to the pipeline's token limit are counted once for the whole list, not once per batch."""
    seeds = [seed + k for k in range(len(prompts))] if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
    warn_if_cut = getattr(pipeline, "_warn_if_cut", None)
    if warn_if_cut is not None:
        warn_if_cut(list(prompts), "prompts")
    pipeline_logger = logging.getLogger(type(pipeline).__module__)
    quiet = _DropTruncationWarnings()
    pipeline_logger.addFilter(quiet)
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = prompts[start : start + batch_size]
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[start : start + batch_size]]
            images = pipeline(chunk, generator=generators, output_type="pt", **call_kwargs).images
            yield images.float().cpu()
    finally:
        pipeline_logger.removeFilter(quiet)


class _DropTruncationWarnings(logging.Filter):
    """Drops the pipeline's per-call 'N of M prompts are longer than ...' lines (already counted for the list)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pokediff.pipeline import TRUNCATION_MARKER

        return not getattr(record, TRUNCATION_MARKER, False)


def _generator_is_conditional(meta: dict) -> bool:
    """Whether the checkpoint's generator takes the primary type as a class label (cdcgan)."""
    from pokediff.gan.registry import MODEL_CLASSES

    cls = MODEL_CLASSES.get(meta.get("generator", {}).get("class", ""))
    return bool(getattr(cls, "is_conditional", False))


class GanSampler:
    kind = "gan"
    text_conditional = False

    def __init__(self, path, device="cpu", use_ema: bool = True):
        from pokediff.gan.checkpoint import read_meta, resolve_checkpoint

        self.path = resolve_checkpoint(path)
        self.meta = read_meta(self.path)
        self.device = device
        self.use_ema = use_ema
        gan_cfg = self.meta.get("gan_config", {})
        self.model_name = self.meta.get("model_name") or gan_cfg.get("model", {}).get("name", "")
        self.type_conditional = _generator_is_conditional(self.meta)
        data = gan_cfg.get("data", {})
        self.background = list(data.get("background", [255, 255, 255]))
        # the size images come out at is read from the first batch (a ProGAN may sit at an earlier stage)
        self.resolution = None
        self.vae = None

    def config_hash(self) -> str:
        return _hash_json({"gan_config": self.meta.get("gan_config"), "generator": self.meta.get("generator")})

    def describe(self) -> dict:
        return {"model_name": self.model_name, "step": self.meta.get("step"), "use_ema": self.use_ema}

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        type_names=None,
        seed: int = 0,
        batch_size: int = 64,
        progress: bool = True,
        desc: str = "sampling",
    ):
        """Yields batches (B, 3, H, W) in [0, 1] on the CPU; prompts only set the count, types the class
        of a type-conditional GAN (images come back in the order of ``prompts``)."""
        from pokediff.gan.generate import sample_from_checkpoint

        n = len(prompts)
        if not self.type_conditional or type_names is None:
            # chunks bound the memory of large --num; chunk k uses seed + its first index
            chunk = max(batch_size, GAN_CHUNK)
            for start in tqdm(range(0, n, chunk), desc=desc, disable=not progress, leave=False):
                images = sample_from_checkpoint(
                    self.path,
                    min(chunk, n - start),
                    seed=seed + start,
                    use_ema=self.use_ema,
                    device=self.device,
                    batch_size=batch_size,
                )
                yield from images.float().cpu().split(batch_size)
            return
        # one call per type; each type gets its own seed so the draws do not repeat across types
        out = [None] * n
        groups: dict = {}
        for i, t in enumerate(type_names):
            groups.setdefault(t, []).append(i)
        for g, (type_name, indices) in enumerate(
            tqdm(sorted(groups.items(), key=lambda kv: str(kv[0])), desc=desc, disable=not progress, leave=False)
        ):
            images = sample_from_checkpoint(
                self.path,
                len(indices),
                seed=seed + TYPE_SEED_STRIDE * g,
                type_name=type_name,
                use_ema=self.use_ema,
                device=self.device,
                batch_size=batch_size,
            )
            for i, image in zip(indices, images.float().cpu()):
                out[i] = image
        yield from torch.stack(out).split(batch_size)


def load_sampler(path, device="cpu", num_inference_steps=None, guidance_scale=None, use_ema: bool = True):
    """A DiffusionSampler for a pipeline folder (``model_index.json``), a GanSampler for a GAN checkpoint."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if is_pipeline_folder(path):
        return DiffusionSampler(path, device, num_inference_steps, guidance_scale)
    from pokediff.gan import is_gan_checkpoint

    if is_gan_checkpoint(path):
        return GanSampler(path, device, use_ema=use_ema)
    raise ValueError(
        f"{path} is neither a diffusion pipeline folder (no model_index.json) nor a GAN checkpoint "
        "(no gan_checkpoint.json, nor checkpoints/step_*/ of a GAN run)"
    )


class SavedSamples:
    """Images generated elsewhere (``pokediff.eval.samples`` archives or folder) with their manifest.

    ``sample`` replays the stored images in manifest order, so the eval scores them like a model's fresh samples;
    the prompts, target colours and split rows come from the manifest (``sources`` keeps only those records).
    """

    kind = "samples"
    text_conditional = True
    vae = None

    def __init__(self, path, sources=None):
        from .samples import image_tensor, load_samples, read_run_info

        self.path = Path(path).expanduser()
        pairs = load_samples(self.path)
        available = sorted({r["source"] for r, _ in pairs})
        if sources:
            pairs = [(r, im) for r, im in pairs if r["source"] in sources]
            if not pairs:
                raise ValueError(
                    f"{self.path} has no samples from {', '.join(sources)} (it has: {', '.join(available)})"
                )
        self.records = [r for r, _ in pairs]
        self.images = [image_tensor(im) for _, im in pairs]
        self.sources = sorted({r["source"] for r in self.records})
        self.prompts = [r["prompt"] for r in self.records]
        self.run_info = read_run_info(self.path)  # {"data": DataConfig dict, ...} when the writer saved one
        self.data_config = self.run_info.get("data")
        self.background = list((self.data_config or {}).get("background", [255, 255, 255]))
        sizes = {tuple(im.shape[-2:]) for im in self.images}
        if len(sizes) != 1:
            raise ValueError(f"{self.path}: samples differ in size {sorted(sizes)}; the eval needs one size")
        self.resolution = int(next(iter(sizes))[-1])

    def config_hash(self) -> str:
        return _hash_json({"records": self.records, "run": self.run_info})

    def describe(self) -> dict:
        return {
            "sources": self.sources,
            "encoding": self.records[0].get("encoding"),
            "generated_by": self.run_info.get("generated_by"),
        }

    def sample(
        self,
        prompts: list[str],
        type_names=None,
        seed: int = 0,
        batch_size: int = 16,
        progress: bool = True,
        desc: str = "sampling",
    ):
        """Yields the stored images for ``prompts``: the manifest's own prompts, in order (anything else is an
        error: stored images cannot answer new prompts)."""
        if list(prompts) != self.prompts:
            raise ValueError("saved samples can only replay their own prompts, in manifest order")
        for start in range(0, len(self.images), batch_size):
            yield torch.stack(self.images[start : start + batch_size])
