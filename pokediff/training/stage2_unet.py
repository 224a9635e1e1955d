"""Stage 2: train the text-conditioned U-Net on cached VAE latents and text embeddings.

The frozen VAE and text encoder run once, before training: every train sprite (its mirror image, and shifted
copies if ``stage2.cache_shifted_copies`` asks) is cached as its posterior mean and std, and every caption as its
embedding. Each step draws a fresh latent sample ``mean + std * eps``, so the model still sees the VAE's posterior
noise without paying for the encoder.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate.utils import broadcast
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel, compute_snr
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pokediff.config import ConfigError
from pokediff.data import SpriteDataset, collate_sprites, load_splits, tokenize_captions
from pokediff.errors import NoUsableWeightsError
from pokediff.hub import write_model_card
from pokediff.images import save_image_grid
from pokediff.models.text import load_text_encoder
from pokediff.models.unet import build_unet
from pokediff.models.vae import SpriteVAE
from pokediff.pipeline import PokeSpritePipeline
from pokediff.schedulers import build_inference_scheduler, build_noise_scheduler
from pokediff.training.checkpoints import CheckpointManager, atomic_save_pretrained
from pokediff.training.loop import run_epochs, start_training
from pokediff.training.metrics import log_image_grid
from pokediff.training.setup import build_accelerator, maybe_compile, start_stage, to_channels_last, unwrap

logger = logging.getLogger(__name__)
STAGE = "stage2"


class LatentTextCache:
    """Posterior mean/std of each sprite (+ mirrored copies) and the text embeddings of its captions.

    Entry ``i`` is sprite ``i % num_captions`` (mirrored sprites share their captions). Sprite ``k`` has
    ``variant_count[k]`` caption embeddings starting at row ``variant_start[k]``; the first is the dataset's
    caption. ``null_embedding`` is the embedding of "" used for caption dropout (the unconditional input).
    """

    def __init__(self, mean, std, embeddings, masks, null_embedding, null_mask, variant_count=None):
        self.mean, self.std = mean, std
        self.embeddings, self.masks = embeddings, masks
        self.null_embedding, self.null_mask = null_embedding, null_mask
        if variant_count is None:
            variant_count = torch.ones(embeddings.shape[0], dtype=torch.long, device=embeddings.device)
        self.variant_count = variant_count.to(embeddings.device)
        self.variant_start = torch.cumsum(self.variant_count, 0) - self.variant_count

    def __len__(self) -> int:
        return self.mean.shape[0]

    @property
    def num_captions(self) -> int:
        """Number of sprites with captions (the first caption of each)."""
        return self.variant_count.shape[0]

    def text(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dataset caption's embedding for each entry in ``index``."""
        row = self.variant_start[index % self.num_captions]
        return self.embeddings[row], self.masks[row]

    def sample_text(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One caption variant per entry, drawn from torch's global RNG (seeded per step)."""
        sprite = index % self.num_captions
        pick = (torch.rand(index.shape, device=index.device) * self.variant_count[sprite]).long()
        row = self.variant_start[sprite] + torch.minimum(pick, self.variant_count[sprite] - 1)
        return self.embeddings[row], self.masks[row]


@torch.no_grad()
def encode_texts(tokenizer, text_encoder, captions: list[str], max_length: int, device, batch_size: int = 64):
    """(embeddings (N, L, D), attention masks (N, L)) of ``captions``."""
    tokens = tokenize_captions(tokenizer, captions, max_length)  # all at once: one truncation warning, not one a batch
    embeds = []
    for start in range(0, len(captions), batch_size):
        ids = tokens["input_ids"][start : start + batch_size].to(device)
        mask = tokens["attention_mask"][start : start + batch_size].to(device)
        embeds.append(text_encoder(ids, attention_mask=mask).last_hidden_state.float())
    return torch.cat(embeds), tokens["attention_mask"].to(device)


def shift_images(images: torch.Tensor, offsets: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images, image i moved down by ``offsets[i, 0]`` and right by ``offsets[i, 1]`` whole pixels
    (negative: up / left); what comes in from outside the frame is ``fill`` (broadcast to (1, C, 1, 1))."""
    pad = int(offsets.abs().max())
    height, width = images.shape[-2:]
    padded = F.pad(images - fill, (pad, pad, pad, pad)) + fill
    return torch.stack(
        [
            padded[i, :, pad - dy : pad - dy + height, pad - dx : pad - dx + width]
            for i, (dy, dx) in enumerate(offsets.tolist())
        ]
    )


@torch.no_grad()
def build_cache(
    vae,
    tokenizer,
    text_encoder,
    dataset: SpriteDataset,
    max_length: int,
    device,
    flips: bool,
    batch_size: int = 32,
    desc: str = "caching latents",
    variants: bool = False,
    shifted_copies: int = 0,
    shift_pixels: int = 0,
    background=(255, 255, 255),
    seed: int = 0,
) -> LatentTextCache:
    """Encode ``dataset`` (un-augmented) once with the frozen VAE and text encoder; with ``variants``, every
    caption variant of each sprite (``data.caption_variants``), else its dataset caption only. ``flips`` adds
    each sprite's mirror image; ``shifted_copies`` adds that many copies of the sprites (and mirrors), each moved
    by a whole-pixel offset of at most ``shift_pixels`` either way (drawn with ``seed``), ``background`` (RGB)
    filling in."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_sprites)
    # one block of rows per version of the sprites, each in dataset order: entry i is sprite i % len(dataset)
    versions = (2 if flips else 1) * (1 + shifted_copies)
    blocks_mean, blocks_std = [[] for _ in range(versions)], [[] for _ in range(versions)]
    generator = torch.Generator().manual_seed(seed)
    fill = (torch.tensor(background, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1).to(device)
    for batch in tqdm(loader, desc=desc, leave=False):
        pixels = batch["pixel_values"].to(device)
        # the mirror is encoded, not flipped in latent space: the VAE is not exactly flip-equivariant
        originals = [pixels, torch.flip(pixels, dims=[-1])] if flips else [pixels]
        images = list(originals)
        for _ in range(shifted_copies):
            for original in originals:
                offsets = torch.randint(-shift_pixels, shift_pixels + 1, (len(original), 2), generator=generator)
                images.append(shift_images(original, offsets, fill))
        for block, image in enumerate(images):
            posterior = vae.encode(image).latent_dist
            blocks_mean[block].append(posterior.mean.float())
            blocks_std[block].append(posterior.std.float())
    mean = torch.cat([row for block in blocks_mean for row in block])
    std = torch.cat([row for block in blocks_std for row in block])
    per_sprite = dataset.caption_variants if variants else [[c] for c in dataset.captions]
    flat = [caption for sprite in per_sprite for caption in sprite]
    embeddings, masks = encode_texts(tokenizer, text_encoder, flat, max_length, device)
    null_embedding, null_mask = encode_texts(tokenizer, text_encoder, [""], max_length, device)
    count = torch.tensor([len(sprite) for sprite in per_sprite], dtype=torch.long)
    return LatentTextCache(mean, std, embeddings, masks, null_embedding, null_mask, count)


def log_latent_range(cache: LatentTextCache, scale, clamp: float) -> float:
    """Log the scaled latents' per-channel mean/std and how often ``latent_clamp`` cuts them; returns that
    fraction. ``scale`` maps posterior latents to the diffusion space (``SpriteVAE.scale_latents``)."""
    scaled = scale(cache.mean)
    per_channel = scaled.transpose(0, 1).flatten(1)
    clamped = float((scaled.abs() > clamp).float().mean())
    logger.info(
        "scaled train latents: channel means %s, stds %s; latent_clamp=%g cuts %.3f%% of elements",
        [round(float(v), 2) for v in per_channel.mean(1)],
        [round(float(v), 2) for v in per_channel.std(1)],
        clamp,
        100 * clamped,
    )
    return clamped


def noised_targets(noise_scheduler, latents, noise=None, timesteps=None):
    """(noisy latents, the epsilon / v target, timesteps) for latents noised at uniform (or given) timesteps."""
    if noise is None:
        noise = torch.randn_like(latents)
    if timesteps is None:
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
        )
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return noisy, target, timesteps


def weighted_denoising_loss(noise_scheduler, pred, target, timesteps, huber_delta: float, min_snr_gamma):
    """Huber loss (``huber_delta``) of ``pred`` against ``target``, Min-SNR weighted when ``min_snr_gamma`` is set
    (per sample mean)."""
    loss = F.smooth_l1_loss(pred.float(), target.float(), beta=huber_delta, reduction="none")
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if min_snr_gamma is not None:
        # Min-SNR-gamma (Hang et al. 2023), as in diffusers' train_text_to_image.py
        snr = compute_snr(noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=min_snr_gamma)
        weight = weight / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weight / snr
        loss = loss * weight
    return loss.mean()


def diffusion_loss(
    unet,
    noise_scheduler,
    latents,
    embeddings,
    masks,
    huber_delta: float,
    min_snr_gamma: Optional[float],
    noise=None,
    timesteps=None,
):
    """Stage 2's denoising loss: ``weighted_denoising_loss`` of the U-Net on ``noised_targets``."""
    noisy, target, timesteps = noised_targets(noise_scheduler, latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states=embeddings, encoder_attention_mask=masks).sample
    return weighted_denoising_loss(noise_scheduler, pred, target, timesteps, huber_delta, min_snr_gamma)


@torch.no_grad()
def validation_loss(
    unet,
    noise_scheduler,
    cache: LatentTextCache,
    scale,
    *,
    latent_clamp: float,
    huber_delta: float,
    min_snr_gamma: Optional[float],
    seed: int,
    batch_size: int,
) -> float:
    """Denoising loss on the val posterior means with fixed noise and timesteps (comparable across epochs)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, len(cache), batch_size):
        index = torch.arange(start, min(start + batch_size, len(cache)), device=cache.mean.device)
        latents = scale(cache.mean[index]).clamp(-latent_clamp, latent_clamp)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator).to(
            latents.device
        )
        embeddings, masks = cache.text(index)
        loss = diffusion_loss(
            unet, noise_scheduler, latents, embeddings, masks, huber_delta, min_snr_gamma, noise, timesteps
        )
        total += float(loss) * len(index)
        count += len(index)
    return total / max(count, 1)


def assemble_pipeline(
    cfg, vae, unet, text_encoder, tokenizer, text_encoder_unchanged: bool = False, shape_classifier=None,
    shape_guidance_scale: float = 0.0,
):  # fmt: skip
    """A ``PokeSpritePipeline`` of the run's parts. ``text_encoder_unchanged``: it is ``cfg.text_encoder.name``
    as published (stage 2 never trains it), so a hub id is saved as its name, not as a copy. ``shape_classifier``
    and ``shape_guidance_scale``: shape guidance (stage 3's ``shape_guidance`` method)."""
    name = cfg.text_encoder.name
    by_name = text_encoder_unchanged and not Path(name).expanduser().exists() and not name.startswith((".", "/", "~"))
    pipe = PokeSpritePipeline(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=build_inference_scheduler(cfg.scheduler),
        max_text_length=cfg.data.max_text_length,
        background=list(cfg.data.background),
        text_encoder_name=name if by_name else None,
        shape_classifier=shape_classifier,
        shape_guidance_scale=shape_guidance_scale,
        guidance_scale=cfg.scheduler.guidance_scale,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class DiffusionLoss:
    """Stage 2's training loss on a batch of cache indices: a fresh posterior sample of each latent (scaled and
    clamped), one caption variant each, caption dropout to the "" embedding, then ``diffusion_loss``."""

    def __init__(
        self,
        unet,
        noise_scheduler,
        cache: LatentTextCache,
        scale,
        *,
        latent_clamp: float,
        caption_dropout: float,
        huber_delta: float,
        min_snr_gamma: Optional[float],
        device,
    ):
        self.unet, self.noise_scheduler, self.cache, self.scale = unet, noise_scheduler, cache, scale
        self.latent_clamp, self.caption_dropout = latent_clamp, caption_dropout
        self.huber_delta, self.min_snr_gamma = huber_delta, min_snr_gamma
        self.device = device

    def training_batch(self, index: torch.Tensor):
        """(latents, text embeddings, masks) of cache entries ``index``: a fresh posterior sample each visit (scaled,
        clamped), one caption variant each, caption dropout to the "" embedding."""
        cache, index = self.cache, index.to(self.device)
        mean, std = cache.mean[index], cache.std[index]
        latents = self.scale(mean + std * torch.randn_like(mean)).clamp(-self.latent_clamp, self.latent_clamp)
        embeddings, masks = cache.sample_text(index)
        drop = torch.rand(index.shape[0], device=self.device) < self.caption_dropout
        embeddings = torch.where(drop[:, None, None], cache.null_embedding, embeddings)
        masks = torch.where(drop[:, None], cache.null_mask, masks)
        return latents, embeddings, masks

    def __call__(self, index: torch.Tensor, step: int):
        latents, embeddings, masks = self.training_batch(index)
        loss = diffusion_loss(
            self.unet, self.noise_scheduler, latents, embeddings, masks, self.huber_delta, self.min_snr_gamma
        )
        return loss, {}


@torch.no_grad()
def sample_grid(
    pipe: PokeSpritePipeline,
    path,
    prompts,
    images_per_prompt: int,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
) -> Path:
    """Fixed prompts x fixed noise (generator ``seed + i`` for image ``i``) -> a grid, one row per prompt."""
    prompts = list(prompts)
    generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(prompts) * images_per_prompt)]
    images = pipe(
        prompts,
        num_images_per_prompt=images_per_prompt,
        generator=generators,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        output_type="pt",
    ).images
    return save_image_grid(images, path, nrow=images_per_prompt)


def stage2_sample_grid(cfg, pipe: PokeSpritePipeline, path) -> Path:
    """``sample_grid`` of ``stage2.sample_prompts`` with the run's seed and sampler settings."""
    return sample_grid(
        pipe,
        path,
        cfg.stage2.sample_prompts,
        cfg.stage2.sample_images_per_prompt,
        cfg.runtime.seed,
        cfg.scheduler.num_inference_steps,
        cfg.scheduler.guidance_scale,
    )


# U-Net settings that change training but not the weights' meaning: a warm start may change them
TRAINING_ONLY_UNET_KEYS = frozenset({"dropout"})


def warm_start(unet: UNet2DConditionModel, source) -> None:
    """Load the weights of ``source`` (a U-Net folder, or a pipeline folder's ``unet/``) into ``unet``.

    A warm start keeps the weights only: the optimizer's moments, the schedule's position and the EMA's history
    start afresh (the EMA from these weights), as they would in a new run.
    """
    path = Path(source).expanduser()
    if (path / "model_index.json").is_file():
        path = path / "unet"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"stage2.init_from: no U-Net folder (config.json) at {path}")
    loaded = UNet2DConditionModel.from_pretrained(str(path))

    def plain(value):  # a config read from JSON has lists where a built one may have tuples
        return list(value) if isinstance(value, tuple) else value

    mismatched = {
        key: (loaded.config.get(key), unet.config[key])
        for key in unet.config
        if not key.startswith("_")
        and key not in TRAINING_ONLY_UNET_KEYS
        and plain(loaded.config.get(key)) != plain(unet.config[key])
    }
    if mismatched:
        key, (theirs, ours) = next(iter(sorted(mismatched.items())))
        raise ConfigError(
            f"stage2.init_from {path} is another U-Net: its {key} is {theirs!r}, the config's gives {ours!r} "
            f"({len(mismatched)} setting(s) differ)"
        )
    unet.load_state_dict({k: v.float() for k, v in loaded.state_dict().items()})
    logger.info("stage 2 warm start from %s (weights only: fresh optimizer, schedule and EMA)", path)


def train_stage2(cfg, vae_path, accelerator=None, resume: Optional[str] = None) -> Path:
    """Train the U-Net on a frozen VAE (``vae_path``); returns ``<run>/unet`` (EMA weights).

    Also saves ``<run>/unet_best`` (EMA weights at the best val loss) and assembles ``<run>/pipeline``.
    """
    s2, rt = cfg.stage2, cfg.runtime
    if s2.sample_images_per_prompt < 1 or not s2.sample_prompts:
        raise ConfigError("stage2.sample_prompts must be non-empty and stage2.sample_images_per_prompt >= 1")
    vae_path = Path(vae_path)
    if not (vae_path / "config.json").is_file():
        raise FileNotFoundError(
            f"VAE folder not found or incomplete: {vae_path} (run stage 1 or pass --vae-checkpoint)"
        )
    accelerator = build_accelerator(cfg, accelerator)
    folder = start_stage(accelerator, cfg, STAGE)
    device = accelerator.device

    vae = SpriteVAE.from_pretrained(str(vae_path)).requires_grad_(False).eval().to(device)
    if vae.config.sample_size != cfg.data.resolution:
        raise ConfigError(
            f"the VAE in {vae_path} was trained on {vae.config.sample_size}px sprites but data.resolution is "
            f"{cfg.data.resolution}: use the same resolution as stage 1"
        )
    scale = vae.scale_latents
    if vae.config.scaling_factor == 1.0 and vae.config.latents_std is None:
        logger.warning("VAE %s has scaling_factor 1.0: was stage 1's scaling step skipped?", vae_path)
    tokenizer, text_encoder = load_text_encoder(cfg.text_encoder.name)
    text_encoder.requires_grad_(False).eval().to(device)

    splits = load_splits(cfg.data, require=("train", "val"))
    train_cache = build_cache(
        vae,
        tokenizer,
        text_encoder,
        SpriteDataset(splits["train"], cfg.data, train=False),
        cfg.data.max_text_length,
        device,
        flips=s2.cache_flips,
        variants=True,
        shifted_copies=s2.cache_shifted_copies,
        shift_pixels=s2.shift_pixels,
        background=cfg.data.background,
        seed=cfg.runtime.seed,
    )
    val_cache = build_cache(
        vae,
        tokenizer,
        text_encoder,
        SpriteDataset(splits["val"], cfg.data, train=False),
        cfg.data.max_text_length,
        device,
        flips=False,
        desc="caching val latents",
    )

    log_latent_range(train_cache, scale, s2.latent_clamp)
    latent_size = train_cache.mean.shape[-1]
    unet = build_unet(cfg.unet, vae.config.latent_channels, latent_size, text_encoder.config.hidden_size)
    if s2.init_from:
        if resume is not None:
            raise ConfigError("stage2.init_from and --resume both name starting weights: give one of them")
        warm_start(unet, s2.init_from)
    unet = to_channels_last(unet, rt.channels_last)
    ema = EMAModel(unet.parameters(), decay=s2.ema_decay, model_cls=UNet2DConditionModel, model_config=unet.config)
    ema.to(device)
    noise_scheduler = build_noise_scheduler(cfg.scheduler)

    # The "dataset" is the cache index: accelerate shards and shuffles it like any other (seeded per epoch).
    train_loader = DataLoader(range(len(train_cache)), batch_size=s2.batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=s2.learning_rate, weight_decay=s2.weight_decay)
    unet = maybe_compile(unet, rt.compile)
    unet, optimizer, train_loader = accelerator.prepare(unet, optimizer, train_loader)
    checkpoints = CheckpointManager(
        accelerator,
        folder / "checkpoints" / STAGE,
        rt.checkpoints_total_limit,
        ema=ema,
        ema_model_cls=UNet2DConditionModel,
    )
    training = start_training(
        accelerator,
        STAGE,
        unet,
        optimizer,
        train_loader,
        checkpoints,
        checkpoints.resolve(resume),
        folder / "losses.csv",
        s2,
        rt,
        ema=ema,
    )
    state = training.state
    loss = DiffusionLoss(
        unet,
        noise_scheduler,
        train_cache,
        scale,
        latent_clamp=s2.latent_clamp,
        caption_dropout=cfg.data.caption_dropout,
        huber_delta=s2.huber_delta,
        min_snr_gamma=s2.min_snr_gamma,
        device=device,
    )

    def evaluate_with_ema(epoch: int, finished: bool):
        """Val loss (and sample grid) with the EMA weights, on the main process; best EMA -> unet_best/."""
        if accelerator.is_main_process:
            model = unwrap(accelerator, unet)
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
            model.eval()
            try:
                with accelerator.autocast():
                    val_loss = validation_loss(
                        model,
                        noise_scheduler,
                        val_cache,
                        scale,
                        latent_clamp=s2.latent_clamp,
                        huber_delta=s2.huber_delta,
                        min_snr_gamma=s2.min_snr_gamma,
                        seed=rt.seed,
                        batch_size=s2.batch_size,
                    )
                training.log({"val_loss": val_loss}, epoch)
                if val_loss < state.best_val_loss:
                    state.best_val_loss = val_loss
                    atomic_save_pretrained(model, folder / "unet_best")
                if finished or (epoch + 1) % rt.sample_every_epochs == 0:
                    pipe = assemble_pipeline(cfg, vae, model, text_encoder, tokenizer, text_encoder_unchanged=True)
                    with accelerator.autocast():
                        grid = stage2_sample_grid(cfg, pipe, folder / "samples" / f"{STAGE}_epoch{epoch + 1:04d}.png")
                    log_image_grid(accelerator, "samples", grid, state.global_step)
            finally:
                model.train()
                ema.restore(model.parameters())
        if accelerator.num_processes > 1:  # every rank keeps the main process's best value
            state.best_val_loss = float(broadcast(torch.tensor([state.best_val_loss], device=device), from_process=0))
        accelerator.wait_for_everyone()

    run_epochs(
        training,
        loss,
        epochs=s2.epochs,
        seed=rt.seed,
        checkpoint_every_steps=rt.checkpoint_every_steps,
        desc="stage 2 (U-Net)",
        end_of_epoch=evaluate_with_ema,
        max_minutes=s2.max_minutes,
    )
    if not math.isfinite(state.best_val_loss):
        raise NoUsableWeightsError(
            f"stage 2 ended without usable weights: every validation loss was NaN/inf, so {folder / 'unet'} was "
            "not written; lower stage2.learning_rate or check the VAE, then train stage 2 again"
        )
    training.save_checkpoint()  # final

    unet_dir = folder / "unet"
    if accelerator.is_main_process:
        model = unwrap(accelerator, unet)
        ema.copy_to(model.parameters())
        model.eval()
        atomic_save_pretrained(model, unet_dir)
        # the pipeline is assembled from the saved folders, exactly what users will load
        pipe = assemble_pipeline(
            cfg,
            SpriteVAE.from_pretrained(str(vae_path)),
            UNet2DConditionModel.from_pretrained(str(unet_dir)),
            text_encoder.to("cpu"),
            tokenizer,
            text_encoder_unchanged=True,
        )
        pipe.save_pretrained(folder / "pipeline")
        write_model_card(
            folder / "pipeline",
            stages={2: state.global_step},
            extra={
                "run": cfg.runtime.experiment_name,
                "stage 2 steps": state.global_step,
                "stage 2 best val loss": round(state.best_val_loss, 5),
            },
        )
        logger.info("stage 2 done: %d steps -> %s, pipeline -> %s", state.global_step, unet_dir, folder / "pipeline")
    training.close()
    return unet_dir
