"""Stage 3: fine-tune the text encoder so that what the frozen VAE + U-Net draw matches the caption.

Loss = ``clip_weight`` x (1 - cos(CLIP(decoded x0 prediction), CLIP(caption)))
     + ``denoise_weight`` x stage 2's denoising loss under the fine-tuned encoder
     + ``anchor_weight`` x MSE to the original encoder's token embeddings.
The VAE, U-Net and CLIP are frozen; gradients flow through them into the text encoder only. The CLIP is a
pretrained open_clip model when its weights can be loaded, else a domain CLIP fitted here on the train
split (``pokediff.models.clip``); a domain CLIP that does not beat chance retrieval on val stops the stage.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

import torch
from diffusers import UNet2DConditionModel
from torch.utils.data import DataLoader
from transformers import AutoModel

from pokediff.config import ConfigError
from pokediff.data import SpriteDataset, load_splits, tokenize_captions
from pokediff.errors import NoUsableWeightsError
from pokediff.fileio import atomic_write, write_text_atomic
from pokediff.hub import write_model_card
from pokediff.models.clip import (
    DOMAIN_CLIP_DIRNAME,
    ClipScorer,
    ClipUnavailableError,
    DomainClipScorer,
    OpenClipScorer,
    check_domain_clip,
    fit_domain_clip,
    load_domain_clip,
    load_pretrained_clip,
)
from pokediff.models.text import load_text_encoder
from pokediff.models.vae import SpriteVAE
from pokediff.schedulers import build_noise_scheduler
from pokediff.training.checkpoints import CheckpointManager, atomic_save_pretrained
from pokediff.training.loop import run_epochs, start_training
from pokediff.training.metrics import log_image_grid
from pokediff.training.setup import build_accelerator, start_stage, unwrap
from pokediff.training.stage2_unet import (
    LatentTextCache,
    assemble_pipeline,
    build_cache,
    diffusion_loss,
    encode_texts,
    stage2_sample_grid,
    validation_loss,
)

logger = logging.getLogger(__name__)
STAGE = "stage3"
METRICS_FILE = "stage3_metrics.json"


# --------------------------------------------------------------------------------------- inputs
def check_stage_weights(path, what: str, flag: str) -> Path:
    """``path`` must be a saved diffusers model folder (config.json + safetensors), else a clear error."""
    if path is None:
        raise FileNotFoundError(f"stage 3 needs the {what}: pass {flag} (or run the earlier stages first)")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"stage 3 needs the {what}, but {path} does not exist (run that stage or pass {flag})")
    if not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
        raise FileNotFoundError(
            f"stage 3 needs the {what}, but {path} has no config.json + *.safetensors "
            f"(a diffusers save_pretrained folder; pass {flag})"
        )
    return path


def predict_x0(noise_scheduler, noisy: torch.Tensor, model_output: torch.Tensor, timesteps: torch.Tensor):
    """The clean-latent estimate implied by the U-Net output at ``timesteps`` (epsilon or v prediction)."""
    alpha_bar = noise_scheduler.alphas_cumprod.to(noisy.device, torch.float32)[timesteps].view(-1, 1, 1, 1)
    sqrt_a, sqrt_1ma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return (noisy - sqrt_1ma * model_output) / sqrt_a
    if prediction_type == "v_prediction":
        return sqrt_a * noisy - sqrt_1ma * model_output
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def decode(vae, latents_scaled, embeds=None, mask=None) -> torch.Tensor:
    """Scaled latents -> images in [0, 1], differentiable (the pipeline's decode_latents without no_grad)."""
    cross = getattr(vae, "decoder_cross_attn", None) is not None
    image = vae.decode(
        vae.unscale_latents(latents_scaled),
        encoder_hidden_states=embeds if cross else None,
        encoder_attention_mask=mask if cross else None,
    ).sample
    return (image.float() / 2 + 0.5).clamp(0, 1)


# ----------------------------------------------------------------------------------------- CLIP
def select_clip(cfg, folder: Path, splits, accelerator, reuse_domain_clip: bool) -> tuple[ClipScorer, dict]:
    """The CLIP stage 3 trains against, and what to record about it (logged and put in the model card)."""
    clip_cfg, device = cfg.clip, accelerator.device
    source = clip_cfg.source
    if source not in ("auto", "pretrained", "domain"):
        raise ConfigError(f"clip.source must be auto | pretrained | domain, got '{source}'")
    if source in ("auto", "pretrained"):
        try:
            model, tokenizer = load_pretrained_clip(clip_cfg.model, clip_cfg.pretrained, device)
            scorer = OpenClipScorer(model, tokenizer, clip_cfg.model, clip_cfg.pretrained).to(device)
            logger.info("stage 3 CLIP: pretrained %s", scorer.name)
            return scorer, {"clip": scorer.name}
        except ClipUnavailableError as err:
            if source == "pretrained":
                raise
            logger.warning("stage 3: pretrained CLIP unavailable (%s); using a domain CLIP instead", err)

    target = folder / DOMAIN_CLIP_DIRNAME
    if clip_cfg.domain_clip_path:
        where = Path(clip_cfg.domain_clip_path).expanduser()
        logger.info("stage 3: using the domain CLIP at %s (clip.domain_clip_path)", where)
    elif reuse_domain_clip and target.is_dir():
        where = target
        logger.info("stage 3: resuming with the domain CLIP already fitted at %s", where)
    else:
        where = target
        if accelerator.is_main_process:
            fit_domain_clip(
                clip_cfg,
                cfg.data,
                cfg.text_encoder.name,
                output_dir=target,
                splits=splits,
                device=device,
                seed=cfg.runtime.seed,
            )
        accelerator.wait_for_everyone()
    model, tokenizer, metrics = load_domain_clip(where, device)
    if metrics is None:
        raise FileNotFoundError(
            f"domain CLIP {where} has no retrieval metrics file; refit it (unset clip.domain_clip_path)"
        )
    check_domain_clip(metrics, clip_cfg.min_top1_over_chance)
    scorer = DomainClipScorer(model, tokenizer, str(where), metrics).to(device)
    info = {
        "clip": scorer.name,
        "domain CLIP val top-1": f"{metrics['top1']:.3f} (chance {metrics['chance_top1']:.3f}, n={metrics['n']})",
        "domain CLIP val top-5": f"{metrics['top5']:.3f} (chance {metrics['chance_top5']:.3f})",
    }
    logger.info(
        "stage 3 CLIP: %s; val top-1 %s, top-5 %s",
        scorer.name,
        info["domain CLIP val top-1"],
        info["domain CLIP val top-5"],
    )
    return scorer, info


# ----------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    cfg,
    vae,
    unet,
    text_encoder,
    tokenizer,
    scorer: ClipScorer,
    val_captions,
    val_cache: LatentTextCache,
    noise_scheduler,
    grid_path: Path,
) -> dict:
    """CLIP score of samples for val captions, val denoising loss, and the fixed-prompt sample grid."""
    s3 = cfg.stage3
    device = next(unet.parameters()).device
    was_training = text_encoder.training
    text_encoder.eval()
    try:
        embeds, masks = encode_texts(tokenizer, text_encoder, list(val_captions), cfg.data.max_text_length, device)
        null_embed, null_mask = encode_texts(tokenizer, text_encoder, [""], cfg.data.max_text_length, device)
        cache = LatentTextCache(val_cache.mean, val_cache.std, embeds, masks, null_embed, null_mask)
        s2 = cfg.stage2  # the denoising loss stage 2 trained with
        val_loss = validation_loss(
            unet,
            noise_scheduler,
            cache,
            vae.scale_latents,
            latent_clamp=s2.latent_clamp,
            huber_delta=s2.huber_delta,
            min_snr_gamma=s2.min_snr_gamma,
            seed=cfg.runtime.seed,
            batch_size=s3.batch_size,
        )
        pipe = assemble_pipeline(cfg, vae, unet, text_encoder, tokenizer)
        prompts = list(val_captions)[: s3.eval_num_prompts]
        images = []
        for start in range(0, len(prompts), s3.batch_size):
            chunk = prompts[start : start + s3.batch_size]
            generators = [
                torch.Generator(device="cpu").manual_seed(cfg.runtime.seed + start + i) for i in range(len(chunk))
            ]
            images.append(
                pipe(
                    chunk,
                    generator=generators,
                    num_inference_steps=cfg.scheduler.num_inference_steps,
                    guidance_scale=cfg.scheduler.guidance_scale,
                    output_type="pt",
                )
                .images.float()
                .cpu()
            )
        images = torch.cat(images)
        clip_scores = scorer.score(images, prompts)
        grid = stage2_sample_grid(cfg, pipe, grid_path)
    finally:
        text_encoder.train(was_training)
    return {
        "val_clip_score": float(clip_scores.mean()),
        "val_denoise_loss": float(val_loss),
        "num_prompts": len(prompts),
        "grid": str(grid),
    }


# ----------------------------------------------------------------------------------------- saving
def _save_tokenizer(tokenizer, folder: Path) -> None:
    with atomic_write(folder) as tmp:
        tokenizer.save_pretrained(tmp)


# ------------------------------------------------------------------------------------------- loss
class TextEncoderLoss:
    """Stage 3's training loss on a batch of cache indices (see the module docstring for its terms).

    The text encoder runs once per step on every caption the terms need (DDP expects one forward per backward):
    the batch's captions, their caption-dropout copies for the denoising term, and "" for the null anchor.
    """

    def __init__(
        self,
        text_encoder,
        unet,
        vae,
        scorer: ClipScorer,
        noise_scheduler,
        cache: LatentTextCache,
        *,
        caption_ids,
        caption_mask,
        null_ids,
        null_mask,
        clip_text,
        clip_weight: float,
        denoise_weight: float,
        anchor_weight: float,
        null_anchor_weight: float,
        clip_t_max: int,
        latent_clamp: float,
        caption_dropout: float,
        huber_delta: float,
        min_snr_gamma: Optional[float],
        device,
    ):
        self.text_encoder, self.unet, self.vae, self.scorer = text_encoder, unet, vae, scorer
        self.noise_scheduler, self.cache = noise_scheduler, cache
        self.caption_ids, self.caption_mask = caption_ids, caption_mask
        self.null_ids, self.null_mask = null_ids, null_mask
        self.clip_text = clip_text
        self.clip_weight, self.denoise_weight = clip_weight, denoise_weight
        self.anchor_weight, self.null_anchor_weight = anchor_weight, null_anchor_weight
        self.clip_t_max, self.latent_clamp, self.caption_dropout = clip_t_max, latent_clamp, caption_dropout
        self.huber_delta, self.min_snr_gamma = huber_delta, min_snr_gamma
        self.device = device

    def __call__(self, index: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        cache, device, clamp = self.cache, self.device, self.latent_clamp
        null_ids, null_mask = self.null_ids, self.null_mask
        index = index.to(device)
        mean, std = cache.mean[index], cache.std[index]
        latents = self.vae.scale_latents(mean + std * torch.randn_like(mean)).clamp(-clamp, clamp)
        caption = index % cache.num_captions
        ids, mask = self.caption_ids[caption], self.caption_mask[caption]
        parts = {}
        total = torch.zeros((), device=device)
        batch = index.shape[0]
        all_ids, all_mask = ids, mask
        if self.denoise_weight > 0:
            # caption dropout as in stage 2: the "" embedding the pipeline's guidance uses stays in place too
            drop = torch.rand(batch, device=device) < self.caption_dropout
            all_ids = torch.cat([ids, torch.where(drop[:, None], null_ids, ids)])
            all_mask = torch.cat([mask, torch.where(drop[:, None], null_mask, mask)])
        if self.null_anchor_weight > 0:
            # the "" embedding is guidance's unconditional branch: keep it where stage 2 learned it
            all_ids, all_mask = torch.cat([all_ids, null_ids]), torch.cat([all_mask, null_mask])
        all_embeds = self.text_encoder(input_ids=all_ids, attention_mask=all_mask).last_hidden_state
        embeds = all_embeds[:batch]
        if self.null_anchor_weight > 0:
            weight = null_mask[..., None].float()
            sq = (all_embeds[-1:].float() - cache.null_embedding) ** 2 * weight
            parts["null_anchor_loss"] = sq.sum() / (weight.sum() * sq.shape[-1]).clamp_min(1)
            total = total + self.null_anchor_weight * parts["null_anchor_loss"]
            all_embeds, all_mask = all_embeds[:-1], all_mask[:-1]
        if self.clip_weight > 0:
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, self.clip_t_max, (batch,), device=device)
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            pred = self.unet(noisy, timesteps, encoder_hidden_states=embeds, encoder_attention_mask=mask).sample
            x0 = predict_x0(self.noise_scheduler, noisy, pred.float(), timesteps).clamp(-clamp, clamp)
            images = decode(self.vae, x0, embeds, mask)
            cos = (self.scorer.image_features(images).float() * self.clip_text[caption]).sum(dim=-1)
            parts["clip_loss"] = (1 - cos).mean()
            parts["train_clip_score"] = (100 * cos.mean()).detach()
            total = total + self.clip_weight * parts["clip_loss"]
        if self.denoise_weight > 0:
            parts["denoise_loss"] = diffusion_loss(
                self.unet,
                self.noise_scheduler,
                latents,
                all_embeds[batch:],
                all_mask[batch:],
                self.huber_delta,
                self.min_snr_gamma,
            )
            total = total + self.denoise_weight * parts["denoise_loss"]
        if self.anchor_weight > 0:
            target, target_mask = cache.text(index)
            weight = target_mask[..., None].float()
            sq = (embeds.float() - target) ** 2 * weight
            parts["anchor_loss"] = sq.sum() / (weight.sum() * embeds.shape[-1]).clamp_min(1)
            total = total + self.anchor_weight * parts["anchor_loss"]
        return total, {name: value.detach() for name, value in parts.items()}


# ------------------------------------------------------------------------------------------ stage
def train_stage3(cfg, vae_path, unet_path, accelerator=None, resume: Optional[str] = None) -> Path:
    """Fine-tune the text encoder on a frozen VAE + U-Net; returns ``<run>/pipeline`` (re-saved with it).

    Writes ``<run>/text_encoder``, ``<run>/tokenizer``, ``<run>/domain_clip`` (when no pretrained CLIP),
    ``<run>/stage3_metrics.json`` (CLIP choice, before/after CLIP score and denoising loss) and
    ``samples/stage3_{before,after}.png``. Raises ``DomainClipTooWeakError`` (before any training) when the
    domain CLIP does not beat chance retrieval on val by ``clip.min_top1_over_chance``.
    """
    s3, rt = cfg.stage3, cfg.runtime
    vae_path = check_stage_weights(vae_path, "stage-1 VAE", "--vae-checkpoint")
    unet_path = check_stage_weights(unet_path, "stage-2 U-Net", "--diffusion-checkpoint")
    if not 0.0 < s3.clip_max_timestep_fraction <= 1.0:
        raise ConfigError(f"stage3.clip_max_timestep_fraction must be in (0, 1], got {s3.clip_max_timestep_fraction}")
    if min(s3.clip_weight, s3.denoise_weight, s3.anchor_weight) < 0 or s3.clip_weight + s3.denoise_weight == 0:
        raise ConfigError("stage3 loss weights must be >= 0, with clip_weight or denoise_weight > 0")
    if s3.eval_num_prompts < 1:
        raise ConfigError(f"stage3.eval_num_prompts must be >= 1, got {s3.eval_num_prompts}")

    accelerator = build_accelerator(cfg, accelerator)
    folder = start_stage(accelerator, cfg, STAGE)
    device = accelerator.device

    vae = SpriteVAE.from_pretrained(str(vae_path)).requires_grad_(False).eval().to(device)
    unet = UNet2DConditionModel.from_pretrained(str(unet_path)).requires_grad_(False).eval().to(device)
    if vae.config.sample_size != cfg.data.resolution:
        raise ConfigError(
            f"the VAE in {vae_path} was trained on {vae.config.sample_size}px sprites but data.resolution "
            f"is {cfg.data.resolution}: use the same resolution as stages 1-2"
        )
    tokenizer, text_encoder = load_text_encoder(cfg.text_encoder.name)
    if unet.config.encoder_hid_dim not in (None, text_encoder.config.hidden_size):
        raise ConfigError(
            f"U-Net {unet_path} expects text width {unet.config.encoder_hid_dim}, but text encoder "
            f"'{cfg.text_encoder.name}' has {text_encoder.config.hidden_size}: use the stage-2 encoder"
        )
    text_encoder.to(device).eval()
    noise_scheduler = build_noise_scheduler(cfg.scheduler)

    splits = load_splits(cfg.data, require=("train", "val"))

    checkpoints = CheckpointManager(accelerator, folder / "checkpoints" / STAGE, rt.checkpoints_total_limit)
    resume_from = checkpoints.resolve(resume)
    scorer, clip_info = select_clip(cfg, folder, splits, accelerator, reuse_domain_clip=resume_from is not None)
    scorer.requires_grad_(False)

    # Latents are cached once (as in stage 2); the frozen encoder's embeddings double as the anchor targets.
    train_set = SpriteDataset(splits["train"], cfg.data, train=False)
    val_set = SpriteDataset(splits["val"], cfg.data, train=False)
    train_cache = build_cache(
        vae, tokenizer, text_encoder, train_set, cfg.data.max_text_length, device, flips=cfg.stage2.cache_flips
    )
    val_cache = build_cache(
        vae, tokenizer, text_encoder, val_set, cfg.data.max_text_length, device, flips=False, desc="caching val latents"
    )
    captions = list(train_set.captions)
    tokens = tokenize_captions(tokenizer, captions, cfg.data.max_text_length)  # once: one truncation warning
    caption_ids, caption_mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    null_tokens = tokenize_captions(tokenizer, [""], cfg.data.max_text_length)
    null_ids, null_mask = null_tokens["input_ids"].to(device), null_tokens["attention_mask"].to(device)
    with torch.no_grad():
        clip_text = scorer.text_features(captions).float()

    before = None
    if accelerator.is_main_process and resume_from is None:
        before = evaluate(
            cfg,
            vae,
            unet,
            text_encoder,
            tokenizer,
            scorer,
            val_set.captions,
            val_cache,
            noise_scheduler,
            folder / "samples" / "stage3_before.png",
        )
        logger.info(
            "stage 3 before: val CLIP score %.3f, val denoising loss %.5f",
            before["val_clip_score"],
            before["val_denoise_loss"],
        )
        log_image_grid(accelerator, "stage3_before", before["grid"], 0)
    accelerator.wait_for_everyone()

    train_loader = DataLoader(range(len(train_cache)), batch_size=s3.batch_size, shuffle=True, drop_last=True)
    text_encoder.requires_grad_(True)
    if getattr(text_encoder, "pooler", None) is not None:
        # the pooled output is never used: a parameter without gradients would stall DDP
        text_encoder.pooler.requires_grad_(False)
    optimizer = torch.optim.AdamW(text_encoder.parameters(), lr=s3.learning_rate, weight_decay=s3.weight_decay)
    text_encoder, optimizer, train_loader = accelerator.prepare(text_encoder, optimizer, train_loader)
    training = start_training(
        accelerator,
        STAGE,
        text_encoder,
        optimizer,
        train_loader,
        checkpoints,
        resume_from,
        folder / "losses.csv",
        epochs=s3.epochs,
        learning_rate=s3.learning_rate,
        warmup_fraction=s3.warmup_fraction,
        grad_clip=s3.grad_clip,
        max_steps=rt.max_steps,
        nan_max_consecutive=rt.nan_max_consecutive,
        grad_explosion_factor=rt.grad_explosion_factor,
        sync_every_steps=rt.sync_every_steps,
    )
    state = training.state
    if resume_from is not None:
        before = state.extra.get("before")
    training.checkpoint_extra["before"] = before

    s2 = cfg.stage2
    num_t = noise_scheduler.config.num_train_timesteps
    loss = TextEncoderLoss(
        text_encoder,
        unet,
        vae,
        scorer,
        noise_scheduler,
        train_cache,
        caption_ids=caption_ids,
        caption_mask=caption_mask,
        null_ids=null_ids,
        null_mask=null_mask,
        clip_text=clip_text,
        clip_weight=s3.clip_weight,
        denoise_weight=s3.denoise_weight,
        anchor_weight=s3.anchor_weight,
        null_anchor_weight=s3.null_anchor_weight,
        clip_t_max=max(1, int(round(s3.clip_max_timestep_fraction * num_t))),
        latent_clamp=s2.latent_clamp,
        caption_dropout=cfg.data.caption_dropout,
        huber_delta=s2.huber_delta,
        min_snr_gamma=s2.min_snr_gamma,
        device=device,
    )
    # the frozen U-Net / VAE / CLIP are not prepared: autocast by hand
    run_epochs(
        training,
        loss,
        epochs=s3.epochs,
        seed=rt.seed,
        checkpoint_every_steps=rt.checkpoint_every_steps,
        desc="stage 3 (text encoder)",
        autocast=True,
    )
    training.save_checkpoint()  # final

    pipeline_dir = folder / "pipeline"
    if accelerator.is_main_process:
        model = unwrap(accelerator, text_encoder).eval()
        after = evaluate(
            cfg,
            vae,
            unet,
            model,
            tokenizer,
            scorer,
            val_set.captions,
            val_cache,
            noise_scheduler,
            folder / "samples" / "stage3_after.png",
        )
        log_image_grid(accelerator, "stage3_after", after["grid"], state.global_step)
        if not math.isfinite(after["val_denoise_loss"]):
            raise NoUsableWeightsError(
                f"stage 3 ended without usable weights: the tuned text encoder gives a NaN/inf validation "
                f"denoising loss, so {folder / 'text_encoder'} was not written; lower stage3.learning_rate"
            )
        training.log({"val_clip_score": after["val_clip_score"], "val_denoise_loss": after["val_denoise_loss"]})
        text_dir = atomic_save_pretrained(model, folder / "text_encoder")
        _save_tokenizer(tokenizer, folder / "tokenizer")
        skipped = training.stepper.guard.total_skipped
        report = {
            "clip": clip_info,
            "steps": state.global_step,
            "skipped_batches": skipped,
            "before": before,
            "after": after,
        }
        if isinstance(scorer, DomainClipScorer):
            report["domain_clip_retrieval"] = scorer.metrics
        write_text_atomic(folder / METRICS_FILE, json.dumps(report, indent=2))
        if before is not None:
            logger.info(
                "stage 3: val CLIP score %.3f -> %.3f, val denoising loss %.5f -> %.5f (%s)",
                before["val_clip_score"],
                after["val_clip_score"],
                before["val_denoise_loss"],
                after["val_denoise_loss"],
                clip_info["clip"],
            )

        extra = {"run": rt.experiment_name, "stage 3 steps": state.global_step, "stage 3 CLIP": clip_info["clip"]}
        extra.update({f"stage 3 {k}": v for k, v in clip_info.items() if k != "clip"})
        if before is not None:
            extra["stage 3 val CLIP score (before -> after)"] = (
                f"{before['val_clip_score']:.2f} -> {after['val_clip_score']:.2f}"
            )
            extra["stage 3 val denoising loss (before -> after)"] = (
                f"{before['val_denoise_loss']:.5f} -> {after['val_denoise_loss']:.5f}"
            )
        # assembled from the saved folders: exactly what users will load
        pipe = assemble_pipeline(
            cfg,
            SpriteVAE.from_pretrained(str(vae_path)),
            UNet2DConditionModel.from_pretrained(str(unet_path)),
            AutoModel.from_pretrained(str(text_dir)),
            tokenizer,
        )
        pipe.save_pretrained(pipeline_dir)
        write_model_card(pipeline_dir, stages={3: state.global_step}, extra=extra)
        logger.info("stage 3 done: %d steps -> %s", state.global_step, pipeline_dir)
    training.close()
    return pipeline_dir
