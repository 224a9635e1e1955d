"""Stage 2: train the text-conditioned U-Net on cached VAE latents and text embeddings.

The frozen VAE and text encoder run once, before training: every train sprite (and its mirror image) is cached
as its posterior mean and std, and every caption as its embedding. Each step draws a fresh latent sample
``mean + std * eps``, so the model still sees the VAE's posterior noise without paying for the encoder.
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
from pokediff.errors import NoUsableWeightsError
from pokediff.data import SpriteDataset, collate_sprites, load_splits, tokenize_captions
from pokediff.models.text import load_text_encoder
from pokediff.models.unet import build_unet
from pokediff.models.vae import SpriteVAE
from pokediff.hub import write_model_card
from pokediff.pipeline import PokeSpritePipeline
from pokediff.schedulers import build_inference_scheduler, build_noise_scheduler
from pokediff.training.common import (
    CheckpointManager,
    GradExplosionDetector,
    LossLogger,
    NonFiniteGuard,
    OptimizerStepper,
    atomic_save_pretrained,
    build_accelerator,
    end_stage,
    epoch_batches,
    log_image_grid,
    log_metrics,
    maybe_compile,
    one_cycle,
    optimizer_steps,
    resume_or_start,
    save_image_grid,
    save_training_checkpoint,
    seed_step,
    start_stage,
    to_channels_last,
    unwrap,
)

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
    embeds, masks = [], []
    for start in range(0, len(captions), batch_size):
        tokens = tokenize_captions(tokenizer, captions[start : start + batch_size], max_length)
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        embeds.append(text_encoder(ids, attention_mask=mask).last_hidden_state.float())
        masks.append(mask)
    return torch.cat(embeds), torch.cat(masks)


@torch.no_grad()
def build_cache(vae, tokenizer, text_encoder, dataset: SpriteDataset, max_length: int, device,
                flips: bool, batch_size: int = 32, desc: str = "caching latents", variants: bool = False
                ) -> LatentTextCache:
    """Encode ``dataset`` (un-augmented) once with the frozen VAE and text encoder; with ``variants``, every
    caption variant of each sprite (``data.caption_variants``), else its dataset caption only."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_sprites)
    means, stds, flip_means, flip_stds = [], [], [], []
    for batch in tqdm(loader, desc=desc, leave=False):
        pixels = batch["pixel_values"].to(device)
        posterior = vae.encode(pixels).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
        if flips:
            # encode the mirrored image: the VAE is not exactly flip-equivariant, so flipping latents would not match
            flipped = vae.encode(torch.flip(pixels, dims=[-1])).latent_dist
            flip_means.append(flipped.mean.float())
            flip_stds.append(flipped.std.float())
    mean, std = torch.cat(means + flip_means), torch.cat(stds + flip_stds)
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
    logger.info("scaled train latents: channel means %s, stds %s; latent_clamp=%g cuts %.3f%% of elements",
                [round(float(v), 2) for v in per_channel.mean(1)], [round(float(v), 2) for v in per_channel.std(1)],
                clamp, 100 * clamped)
    return clamped


def diffusion_loss(unet, noise_scheduler, latents, embeddings, masks, stage_cfg, noise=None, timesteps=None):
    """Huber loss on the epsilon / v target at uniform timesteps, optionally Min-SNR weighted (per sample mean)."""
    if noise is None:
        noise = torch.randn_like(latents)
    if timesteps is None:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    pred = unet(noisy, timesteps, encoder_hidden_states=embeddings, encoder_attention_mask=masks).sample
    loss = F.smooth_l1_loss(pred.float(), target.float(), beta=stage_cfg.huber_delta, reduction="none")
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if stage_cfg.min_snr_gamma is not None:
        # Min-SNR-gamma (Hang et al. 2023), as in diffusers' train_text_to_image.py
        snr = compute_snr(noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=stage_cfg.min_snr_gamma)
        weight = weight / (snr + 1) if prediction_type == "v_prediction" else weight / snr
        loss = loss * weight
    return loss.mean()


@torch.no_grad()
def validation_loss(unet, noise_scheduler, cache: LatentTextCache, scale, stage_cfg, seed: int,
                    batch_size: int) -> float:
    """Denoising loss on the val posterior means with fixed noise and timesteps (comparable across epochs)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, len(cache), batch_size):
        index = torch.arange(start, min(start + batch_size, len(cache)), device=cache.mean.device)
        latents = scale(cache.mean[index]).clamp(-stage_cfg.latent_clamp, stage_cfg.latent_clamp)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),),
                                  generator=generator).to(latents.device)
        embeddings, masks = cache.text(index)
        loss = diffusion_loss(unet, noise_scheduler, latents, embeddings, masks, stage_cfg, noise, timesteps)
        total += float(loss) * len(index)
        count += len(index)
    return total / max(count, 1)


def assemble_pipeline(cfg, vae, unet, text_encoder, tokenizer) -> PokeSpritePipeline:
    pipe = PokeSpritePipeline(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=build_inference_scheduler(cfg.scheduler),
        max_text_length=cfg.data.max_text_length,
        background=list(cfg.data.background),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_grid(cfg, pipe: PokeSpritePipeline, path) -> Path:
    """Fixed prompts x fixed noise (one generator per image) -> a grid, one row per prompt."""
    s2 = cfg.stage2
    prompts = list(s2.sample_prompts)
    n = s2.sample_images_per_prompt
    generators = [torch.Generator(device="cpu").manual_seed(cfg.runtime.seed + i) for i in range(len(prompts) * n)]
    images = pipe(
        prompts,
        num_images_per_prompt=n,
        generator=generators,
        num_inference_steps=cfg.scheduler.num_inference_steps,
        guidance_scale=cfg.scheduler.guidance_scale,
        output_type="pt",
    ).images
    return save_image_grid(images, path, nrow=n)


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
    train_cache = build_cache(vae, tokenizer, text_encoder, SpriteDataset(splits["train"], cfg.data, train=False),
                              cfg.data.max_text_length, device, flips=s2.cache_flips, variants=True)
    val_cache = build_cache(vae, tokenizer, text_encoder, SpriteDataset(splits["val"], cfg.data, train=False),
                            cfg.data.max_text_length, device, flips=False, desc="caching val latents")

    log_latent_range(train_cache, scale, s2.latent_clamp)
    latent_size = train_cache.mean.shape[-1]
    unet = build_unet(cfg.unet, vae.config.latent_channels, latent_size, text_encoder.config.hidden_size)
    unet = to_channels_last(unet, rt.channels_last)
    ema = EMAModel(unet.parameters(), decay=s2.ema_decay, model_cls=UNet2DConditionModel, model_config=unet.config)
    ema.to(device)
    noise_scheduler = build_noise_scheduler(cfg.scheduler)

    # The "dataset" is the cache index: accelerate shards and shuffles it like any other (seeded per epoch).
    train_loader = DataLoader(range(len(train_cache)), batch_size=s2.batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=s2.learning_rate, weight_decay=s2.weight_decay)
    unet = maybe_compile(unet, rt.compile)
    unet, optimizer, train_loader = accelerator.prepare(unet, optimizer, train_loader)
    updates_per_epoch, total_steps = optimizer_steps(
        len(train_loader), s2.epochs, accelerator.gradient_accumulation_steps, rt.max_steps
    )
    lr_scheduler = accelerator.prepare(
        one_cycle(optimizer, s2.learning_rate, total_steps, s2.warmup_fraction, accelerator.num_processes)
    )

    # a stage shorter than nan_max_consecutive must still stop when none of its steps was usable
    guard = NonFiniteGuard(min(rt.nan_max_consecutive, total_steps), accelerator, STAGE)
    detector = GradExplosionDetector(rt.grad_explosion_factor)
    stepper = OptimizerStepper(accelerator, unet, optimizer, lr_scheduler, s2.grad_clip, guard, detector, ema=ema)
    checkpoints = CheckpointManager(accelerator, folder / "checkpoints" / STAGE, rt.checkpoints_total_limit,
                                    ema=ema, ema_model_cls=UNet2DConditionModel)
    losses = LossLogger(folder / "losses.csv", STAGE, enabled=accelerator.is_main_process)

    state = resume_or_start(accelerator, checkpoints, checkpoints.resolve(resume), total_steps, guard, detector,
                            losses)

    def save_checkpoint():
        save_training_checkpoint(checkpoints, state, guard, detector)

    def evaluate_with_ema(epoch: int, with_samples: bool):
        """Val loss (and sample grid) with the EMA weights, on the main process; best EMA -> unet_best/."""
        if accelerator.is_main_process:
            model = unwrap(accelerator, unet)
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
            model.eval()
            try:
                with accelerator.autocast():
                    val_loss = validation_loss(model, noise_scheduler, val_cache, scale, s2, rt.seed,
                                               s2.batch_size)
                log_metrics(accelerator, losses, state.global_step, epoch, {"val_loss": val_loss})
                if val_loss < state.best_val_loss:
                    state.best_val_loss = val_loss
                    atomic_save_pretrained(model, folder / "unet_best")
                if with_samples:
                    pipe = assemble_pipeline(cfg, vae, model, text_encoder, tokenizer)
                    with accelerator.autocast():
                        grid = sample_grid(cfg, pipe, folder / "samples" / f"{STAGE}_epoch{epoch + 1:04d}.png")
                    log_image_grid(accelerator, "samples", grid, state.global_step)
            finally:
                model.train()
                ema.restore(model.parameters())
        if accelerator.num_processes > 1:  # every rank keeps the main process's best value
            state.best_val_loss = float(broadcast(torch.tensor([state.best_val_loss], device=device), from_process=0))
        accelerator.wait_for_everyone()

    progress = tqdm(total=total_steps, initial=state.global_step, desc="stage 2 (U-Net)",
                    disable=not accelerator.is_local_main_process)
    unet.train()
    for epoch in range(state.epoch, s2.epochs):
        if state.global_step >= total_steps:
            break
        skip = state.batches_in_epoch if epoch == state.epoch else 0
        state.epoch, state.batches_in_epoch = epoch, skip
        for index in epoch_batches(accelerator, train_loader, epoch, skip):
            seed_step(rt.seed, state.batches_in_epoch, accelerator.process_index, f"{STAGE}:{epoch}")
            index = index.to(device)
            # a fresh posterior sample every time an entry is visited, in the scaled, clamped latent range
            mean, std = train_cache.mean[index], train_cache.std[index]
            latents = scale(mean + std * torch.randn_like(mean)).clamp(-s2.latent_clamp, s2.latent_clamp)
            embeddings, masks = train_cache.sample_text(index)
            drop = torch.rand(index.shape[0], device=device) < cfg.data.caption_dropout
            embeddings = torch.where(drop[:, None, None], train_cache.null_embedding, embeddings)
            masks = torch.where(drop[:, None], train_cache.null_mask, masks)
            with accelerator.accumulate(unet):
                loss = diffusion_loss(unet, noise_scheduler, latents, embeddings, masks, s2)
                metrics = stepper.step(loss, state.global_step)
            state.batches_in_epoch += 1
            if metrics is None:
                continue
            state.global_step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            log_metrics(accelerator, losses, state.global_step, epoch, {"loss": loss.item(), **metrics})
            if state.global_step % rt.checkpoint_every_steps == 0 and state.global_step < total_steps:
                save_checkpoint()
            if state.global_step >= total_steps:
                break
        epoch_done = state.batches_in_epoch >= len(train_loader)
        finished = state.global_step >= total_steps
        if epoch_done or finished:
            evaluate_with_ema(epoch, with_samples=finished or (epoch + 1) % rt.sample_every_epochs == 0)
        if epoch_done:
            state.epoch, state.batches_in_epoch = epoch + 1, 0
    progress.close()
    if not math.isfinite(state.best_val_loss):
        raise NoUsableWeightsError(
            f"stage 2 ended without usable weights: every validation loss was NaN/inf, so {folder / 'unet'} was "
            "not written; lower stage2.learning_rate or check the VAE, then train stage 2 again"
        )
    save_checkpoint()  # final

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
        )
        pipe.save_pretrained(folder / "pipeline")
        write_model_card(
            folder / "pipeline", stages={2: state.global_step},
            extra={"run": cfg.runtime.experiment_name, "stage 2 steps": state.global_step,
                   "stage 2 best val loss": round(state.best_val_loss, 5)},
        )
        logger.info("stage 2 done: %d steps -> %s, pipeline -> %s", state.global_step, unet_dir, folder / "pipeline")
    checkpoints.close()
    end_stage(accelerator)
    return unet_dir
