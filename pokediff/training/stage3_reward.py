"""Stage 3: reward fine-tuning of the U-Net's text cross-attention through the sampler (ReFL / DRaFT+).

One update, on a batch of training captions:
1. draw fresh noise and a step k in ``stage3.reward_step_range`` of the sampler's steps, and run the pipeline's
   sampler (its scheduler, classifier-free guidance) to step k without gradients;
2. one guided U-Net call with gradients at step k; what the CLIP scores (``stage3.reward_target``) is either that
   call's clean-latent estimate ("step", ReFL: blurry at early steps) or the finished sample ("final": the sampler
   runs on to the end without gradients through the U-Net's input, as DRTune does, so the gradient reaches step k
   through the solver's own updates), decoded by the frozen VAE. The reward is the log-probability the CLIP gives
   the image's own caption among every training caption (contrastive: drawing every sample towards the average
   caption earns nothing);
3. anchors: DRaFT+'s KL term, the squared difference to the frozen stage-2 U-Net on the same input (both halves of
   guidance), and stage 2's denoising loss on real latents (the ReFL paper's pre-training term).

Loss = -reward_weight x reward + kl_weight x KL + denoise_weight x denoising loss. Only the key and value
projections of the U-Net's text cross-attention train (diffusers' Custom Diffusion ``crossattn_kv``): the text
encoder, the VAE and the rest of the U-Net stay as stage 2 left them, so the result is a plain stage-2-shaped U-Net
and the pipeline keeps the pretrained text encoder, saved by name. Whether it ships is decided afterwards by
``stage3_gate`` on judges the reward never sees (colour, body shape, KID).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch.utils.data import DataLoader

from pokediff.config import ConfigError
from pokediff.data import SpriteDataset, load_splits
from pokediff.errors import NoUsableWeightsError
from pokediff.fileio import write_text_atomic
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
from pokediff.pipeline import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS, clean_latent_estimate
from pokediff.schedulers import build_inference_scheduler, build_noise_scheduler
from pokediff.training.checkpoints import CheckpointManager, atomic_save_pretrained
from pokediff.training.loop import run_epochs, start_training
from pokediff.training.metrics import log_image_grid
from pokediff.training.setup import build_accelerator, start_stage, unwrap
from pokediff.training.stage2_unet import (
    DiffusionLoss,
    LatentTextCache,
    assemble_pipeline,
    build_cache,
    encode_texts,
    noised_targets,
    stage2_sample_grid,
    validation_loss,
    weighted_denoising_loss,
)

logger = logging.getLogger(__name__)
STAGE = "stage3"
METRICS_FILE = "stage3_metrics.json"
UNET_DIRNAME = "unet_stage3"
TRAINABLE = re.compile(r"attn2\.to_[kv]\.")  # the text -> image path: keys and values of text cross-attention


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
    """The clean-latent estimate implied by the U-Net output at ``timesteps`` (one per sample)."""
    alpha_bar = noise_scheduler.alphas_cumprod.to(noisy.device, torch.float32)[timesteps].view(-1, 1, 1, 1)
    return clean_latent_estimate(noisy, model_output, alpha_bar, noise_scheduler.config.prediction_type)


def decode(vae, latents_scaled, embeds=None, mask=None) -> torch.Tensor:
    """Scaled latents -> images in [0, 1], differentiable (the pipeline's decode_latents without no_grad)."""
    cross = getattr(vae, "decoder_cross_attn", None) is not None
    image = vae.decode(
        vae.unscale_latents(latents_scaled),
        encoder_hidden_states=embeds if cross else None,
        encoder_attention_mask=mask if cross else None,
    ).sample
    return (image.float() / 2 + 0.5).clamp(0, 1)


def mark_trainable(unet) -> list[str]:
    """Freeze ``unet`` except the key/value projections of its text cross-attention; returns their names."""
    names = []
    for name, param in unet.named_parameters():
        param.requires_grad_(bool(TRAINABLE.search(name)))
        if param.requires_grad:
            names.append(name)
    if not names:
        raise ConfigError("stage 3 tunes the U-Net's text cross-attention, but this U-Net has none (no attn2 layers)")
    return names


# ----------------------------------------------------------------------------------------- CLIP
def select_clip(
    cfg, folder: Path, splits, accelerator, reuse_domain_clip: bool, captions: dict
) -> tuple[ClipScorer, dict]:
    """The CLIP stage 3 trains against, and what to record about it (logged and put in the model card).
    ``captions``: each train and val row's reward caption (``reward_captions``), what a domain CLIP is fitted on."""
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

    # the domain CLIP is fitted on the captions the reward tells apart (stage3.reward_captions)
    kind = cfg.stage3.reward_captions
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
                captions=captions,
                captions_name=kind,
            )
        accelerator.wait_for_everyone()
    model, tokenizer, metrics = load_domain_clip(where, device)
    if metrics is None:
        raise FileNotFoundError(
            f"domain CLIP {where} has no retrieval metrics file; refit it (unset clip.domain_clip_path)"
        )
    fitted_on = metrics.get("captions", "dataset")  # folders from before the key: dataset captions
    if fitted_on != kind:
        raise ConfigError(
            f"the domain CLIP at {where} was fitted on {fitted_on} captions, but stage3.reward_captions={kind} "
            "rewards with the other kind: unset clip.domain_clip_path (or give a folder fitted on those) to fit one"
        )
    if model.config.blur_sigma != clip_cfg.domain_blur_sigma:
        raise ConfigError(
            f"the domain CLIP at {where} was fitted on images blurred by sigma {model.config.blur_sigma:g}, but "
            f"clip.domain_blur_sigma={clip_cfg.domain_blur_sigma:g}: unset clip.domain_clip_path to fit one, or set "
            "the sigma it was fitted with"
        )
    check_domain_clip(metrics, clip_cfg.min_top1_over_chance)
    scorer = DomainClipScorer(model, tokenizer, str(where), metrics).to(device)
    info = {
        "clip": scorer.name,
        "domain CLIP val top-1": f"{metrics['top1']:.3f} (chance {metrics['chance_top1']:.3f}, n={metrics['n']}, "
        f"{fitted_on} captions, blur sigma {model.config.blur_sigma:g} px)",
        "domain CLIP val top-5": f"{metrics['top5']:.3f} (chance {metrics['chance_top5']:.3f})",
    }
    logger.info(
        "stage 3 CLIP: %s; val top-1 %s, top-5 %s",
        scorer.name,
        info["domain CLIP val top-1"],
        info["domain CLIP val top-5"],
    )
    return scorer, info


def contrastive_reward(scorer: ClipScorer, images, caption_features, target_index, candidates=None) -> torch.Tensor:
    """(B,) log-probability the CLIP gives each image's own caption among the candidates, at the CLIP's own
    temperature. Without ``candidates`` they are all rows of the unit ``caption_features`` and ``target_index`` is a
    row; with ``candidates`` (B, K) rows of it per image, ``target_index`` is a position among those K."""
    logits = scorer.logit_scale * scorer.image_features(images).float() @ caption_features.T
    if candidates is not None:
        logits = logits.gather(1, candidates)
    return logits.log_softmax(dim=-1).gather(1, target_index[:, None]).squeeze(1)


def reward_targets(cfg, split, captions: list[str]):
    """(the captions the CLIP embeds, each row's target, each row's candidates or None) for ``captions`` (each row's
    reward caption). ``stage3.reward_negatives``: "captions" contrasts a row's caption with every distinct one
    (target = its index among them); "shape" with the same visual caption naming each other body shape only
    (candidates = those K captions' indices, target = the row's position among them), so only shape earns reward."""
    distinct = list(dict.fromkeys(captions))
    if cfg.stage3.reward_negatives == "captions":
        position = {caption: i for i, caption in enumerate(distinct)}
        return distinct, torch.tensor([position[c] for c in captions]), None
    from pokediff.data.captions import SHAPE_PHRASES, visual_caption

    shapes = list(SHAPE_PHRASES)
    records = split.remove_columns(cfg.data.image_column).to_list()
    table: dict[str, int] = {}
    candidates, target = [], []
    for row, caption in zip(records, captions):
        own = str(row.get("shape") or "").strip().lower()
        if own not in SHAPE_PHRASES:
            raise ConfigError(
                f"stage3.reward_negatives=shape needs a body shape on every row, but '{caption}' has "
                f"'{own or 'none'}' (one of {', '.join(shapes)}); use stage3.reward_negatives=captions"
            )
        variants = [visual_caption({**row, "shape": shape}, caption) for shape in shapes]
        candidates.append([table.setdefault(v, len(table)) for v in variants])
        target.append(shapes.index(own))
    return list(table), torch.tensor(target), torch.tensor(candidates)


def reward_captions(cfg, split) -> list[str]:
    """Each row's reward caption (``reward_targets`` makes the CLIP's candidates of them).
    ``stage3.reward_captions``: "visual" (``data.captions.visual_caption``) or "dataset" (the caption column)."""
    from pokediff.data.captions import visual_caption

    records = split.remove_columns(cfg.data.image_column)
    captions = [str(c) for c in records[cfg.data.caption_column]]
    if cfg.stage3.reward_captions == "visual":
        captions = [visual_caption(row, caption) for row, caption in zip(records.to_list(), captions)]
    return captions


def reward_prompts(cfg, split, captions: list[str]) -> list[str]:
    """What the U-Net reads for each row while stage 3 scores it against ``captions`` (its reward captions).
    ``stage3.reward_prompts``: "reward" (those captions themselves) or "dataset" (the row's dataset caption, what
    the gate and ``pokediff.eval`` prompt with)."""
    if cfg.stage3.reward_prompts == "reward":
        return list(captions)
    return [str(c) for c in split[cfg.data.caption_column]]


# ------------------------------------------------------------------------------------------- loss
def mix_guidance(both_halves: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance from a U-Net output whose first half is unconditional and second conditional."""
    uncond, cond = both_halves.float().chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def guided_output(unet, latents, t, embeds, masks, null_embeds, null_masks, guidance_scale: float):
    """(both halves of the U-Net's output, the guided output) for ``latents`` at sampler step ``t``."""
    out = unet(
        torch.cat([latents, latents]),
        t,
        encoder_hidden_states=torch.cat([null_embeds, embeds]),
        encoder_attention_mask=torch.cat([null_masks, masks]),
    ).sample
    return out, mix_guidance(out, guidance_scale)


class RewardLoss:
    """Stage 3's loss on a batch of reward-prompt indices (see the module docstring for its terms)."""

    def __init__(
        self,
        unet,
        sampling_unet,
        reference_unet,
        vae,
        scorer: ClipScorer,
        noise_scheduler,
        scheduler_cfg,
        cache: LatentTextCache,
        denoise: DiffusionLoss,
        *,
        prompt_embeds,
        prompt_masks,
        caption_features,
        caption_index,
        caption_candidates,
        num_inference_steps: int,
        guidance_scale: float,
        step_range: tuple[float, float],
        reward_target: str,
        reward_weight: float,
        kl_weight: float,
        denoise_weight: float,
        denoise_batch_size: int,
        latent_clamp: float,
        huber_delta: float,
        min_snr_gamma: Optional[float],
        device,
    ):
        # ``unet`` (as prepared: DDP in a multi-process run) makes the one call with gradients; ``sampling_unet``, the
        # same module unwrapped, makes the gradient-free ones, whose number differs between processes
        self.unet, self.sampling_unet, self.reference_unet = unet, sampling_unet, reference_unet
        self.vae, self.scorer = vae, scorer
        self.noise_scheduler, self.scheduler_cfg, self.cache, self.denoise = (
            noise_scheduler,
            scheduler_cfg,
            cache,
            denoise,
        )
        # row i of the reward prompts: its text embedding (what the U-Net reads) and the index of its caption
        # among ``caption_features`` (the CLIP's unit features of the distinct captions)
        self.prompt_embeds, self.prompt_masks = prompt_embeds, prompt_masks
        self.caption_features, self.caption_index = caption_features, caption_index
        self.caption_candidates = caption_candidates  # (rows, K) or None: see ``reward_targets``
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        low, high = step_range
        self.first_step = min(num_inference_steps - 1, int(math.floor(low * num_inference_steps)))
        self.last_step = max(self.first_step, min(num_inference_steps - 1, int(math.ceil(high * num_inference_steps))))
        if reward_target not in ("step", "final"):
            raise ValueError(f"reward_target must be 'step' or 'final', got {reward_target!r}")
        self.reward_target = reward_target
        self.reward_weight, self.kl_weight, self.denoise_weight = reward_weight, kl_weight, denoise_weight
        self.denoise_batch_size, self.latent_clamp = denoise_batch_size, latent_clamp
        self.huber_delta, self.min_snr_gamma = huber_delta, min_snr_gamma
        self.device = device

    @torch.no_grad()
    def _sample_to(self, step: int, embeds, masks, null_embeds, null_masks):
        """(the sampler's latents before ``step`` of ``num_inference_steps``, the timestep there, the sampler)."""
        scheduler = build_inference_scheduler(self.scheduler_cfg)  # a fresh one: multistep solvers keep history
        scheduler.set_timesteps(self.num_inference_steps, device=self.device)
        shape = (embeds.shape[0], *self.cache.mean.shape[1:])
        latents = torch.randn(shape, device=self.device) * scheduler.init_noise_sigma
        latents = self._run(scheduler, scheduler.timesteps[:step], latents, embeds, masks, null_embeds, null_masks)
        return latents, scheduler.timesteps[step], scheduler

    def _run(self, scheduler, timesteps, latents, embeds, masks, null_embeds, null_masks):
        """``scheduler``'s steps at ``timesteps`` from ``latents``; the U-Net sees them detached, without gradients,
        so gradients (where ``latents`` carries any) flow only through the solver's updates."""
        for t in timesteps:
            with torch.no_grad():
                _, guided = guided_output(
                    self.sampling_unet, latents.detach(), t, embeds, masks, null_embeds, null_masks,
                    self.guidance_scale,
                )  # fmt: skip
            latents = scheduler.step(guided.to(latents.dtype), t, latents, return_dict=False)[0]
        return latents

    def _finish(self, scheduler, step: int, latents, guided, embeds, masks, null_embeds, null_masks):
        """The finished sample from the guided output at ``step`` (with gradients): the sampler runs on with the
        U-Net's input detached (DRTune's stop-gradient), so the gradient reaches ``guided`` only through the
        solver's own update arithmetic and no later U-Net call needs a backward pass."""
        timesteps = scheduler.timesteps
        latents = scheduler.step(guided, timesteps[step], latents, return_dict=False)[0]
        return self._run(scheduler, timesteps[step + 1 :], latents, embeds, masks, null_embeds, null_masks)

    def __call__(self, index: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        cache, device = self.cache, self.device
        index = index.to(device)
        batch = index.shape[0]
        embeds, masks = self.prompt_embeds[index], self.prompt_masks[index]
        null_embeds = cache.null_embedding.expand(batch, -1, -1)
        null_masks = cache.null_mask.expand(batch, -1)
        k = int(torch.randint(self.first_step, self.last_step + 1, ()))
        latents, t, scheduler = self._sample_to(k, embeds, masks, null_embeds, null_masks)

        # one U-Net call with gradients serves the reward (both halves of guidance at step k) and the denoising
        # anchor (real latents at uniform timesteps): one forward per backward, as DDP wants
        real_index = torch.randint(0, len(cache), (self.denoise_batch_size,), device=device)
        real, real_embeds, real_masks = self.denoise.training_batch(real_index)
        noisy, target, real_t = noised_targets(self.noise_scheduler, real)
        steps = torch.cat([t.expand(2 * batch).to(device), real_t])
        out = self.unet(
            torch.cat([latents, latents, noisy]),
            steps,
            encoder_hidden_states=torch.cat([null_embeds, embeds, real_embeds]),
            encoder_attention_mask=torch.cat([null_masks, masks, real_masks]),
        ).sample.float()
        guided_pair, real_pred = out[: 2 * batch], out[2 * batch :]
        guided = mix_guidance(guided_pair, self.guidance_scale)
        if self.reward_target == "final":
            x0 = self._finish(scheduler, k, latents, guided, embeds, masks, null_embeds, null_masks)
        else:
            x0 = predict_x0(self.noise_scheduler, latents, guided, t.expand(batch).to(device))
        images = decode(self.vae, x0.clamp(-self.latent_clamp, self.latent_clamp))
        if bool(torch.rand(()) < 0.5):
            images = images.flip(-1)  # the reward should not depend on which way a sprite faces
        candidates = None if self.caption_candidates is None else self.caption_candidates[index]
        reward = contrastive_reward(self.scorer, images, self.caption_features, self.caption_index[index], candidates)
        with torch.no_grad():
            reference, _ = guided_output(
                self.reference_unet, latents, t, embeds, masks, null_embeds, null_masks, self.guidance_scale
            )
        kl = F.mse_loss(guided_pair, reference.float())
        denoise = weighted_denoising_loss(
            self.noise_scheduler, real_pred, target, real_t, self.huber_delta, self.min_snr_gamma
        )
        total = -self.reward_weight * reward.mean() + self.kl_weight * kl + self.denoise_weight * denoise
        parts = {
            "reward": reward.mean().detach(),
            "kl": kl.detach(),
            "denoise_loss": denoise.detach(),
            "reward_step": torch.tensor(float(k)),
        }
        return total, parts


# ----------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(cfg, vae, unet, text_encoder, tokenizer, scorer, val_reward, val_cache, noise_scheduler, grid_path):
    """The reward on samples for val prompts (trained against: for the log, never for the gate), the val
    denoising loss and the fixed-prompt sample grid. ``val_reward``: (the val rows' prompts, then what
    ``reward_targets`` gives for them: the captions the CLIP embeds, each row's target and candidates)."""
    s2, s3 = cfg.stage2, cfg.stage3
    prompts, table, target, candidates = val_reward
    with torch.no_grad():
        features = scorer.text_features(table).float()
    was_training = unet.training
    unet.eval()
    try:
        val_loss = validation_loss(
            unet,
            noise_scheduler,
            val_cache,
            vae.scale_latents,
            latent_clamp=s2.latent_clamp,
            huber_delta=s2.huber_delta,
            min_snr_gamma=s2.min_snr_gamma,
            seed=cfg.runtime.seed,
            batch_size=s3.batch_size,
        )
        pipe = assemble_pipeline(cfg, vae, unet, text_encoder, tokenizer, text_encoder_unchanged=True)
        num = min(s3.eval_num_prompts, len(prompts))
        rewards = []
        for start in range(0, num, s3.batch_size):
            rows = list(range(start, min(start + s3.batch_size, num)))
            generators = [torch.Generator("cpu").manual_seed(cfg.runtime.seed + i) for i in rows]
            images = pipe(
                [prompts[i] for i in rows],
                generator=generators,
                output_type="pt",  # the pipeline's default steps and guidance, as users draw
            ).images.float()
            rewards.append(
                contrastive_reward(
                    scorer,
                    images.to(scorer.device),
                    features,
                    target[rows].to(scorer.device),
                    None if candidates is None else candidates[rows].to(scorer.device),
                )
            )
        grid = stage2_sample_grid(cfg, pipe, grid_path)
    finally:
        unet.train(was_training)
    return {
        "val_reward": float(torch.cat(rewards).mean()),
        "val_denoise_loss": float(val_loss),
        "num_prompts": num,
        "grid": str(grid),
    }


# ------------------------------------------------------------------------------------------ stage
def train_stage3(cfg, vae_path, unet_path, accelerator=None, resume: Optional[str] = None) -> Path:
    """Reward fine-tuning of the stage-2 U-Net's text cross-attention; returns ``<run>/pipeline``.

    Writes ``<run>/unet_stage3`` (the tuned U-Net), ``<run>/pipeline`` (with it, the text encoder saved by name),
    ``<run>/domain_clip`` (when no pretrained CLIP), ``<run>/stage3_metrics.json`` (the inputs, the CLIP, the
    reward and val denoising loss before/after) and ``samples/stage3_{before,after}.png``. ``stage3_gate`` then
    judges it against stage 2's U-Net. Raises ``DomainClipTooWeakError`` (before any training) when the domain
    CLIP does not beat chance retrieval on val by ``clip.min_top1_over_chance``.
    """
    s3, rt = cfg.stage3, cfg.runtime
    vae_path = check_stage_weights(vae_path, "stage-1 VAE", "--vae-checkpoint")
    unet_path = check_stage_weights(unet_path, "stage-2 U-Net", "--diffusion-checkpoint")

    accelerator = build_accelerator(cfg, accelerator)
    folder = start_stage(accelerator, cfg, STAGE)
    device = accelerator.device

    vae = SpriteVAE.from_pretrained(str(vae_path)).float().requires_grad_(False).eval().to(device)
    # no dropout (stage 2's unet.dropout): the reward and the KL term compare deterministic U-Net calls
    unet = UNet2DConditionModel.from_pretrained(str(unet_path), dropout=0.0).float().to(device)
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
    text_encoder.requires_grad_(False).to(device).eval()
    reference_unet = copy.deepcopy(unet).requires_grad_(False).eval()  # DRaFT+'s anchor: stage 2 as it was
    trainable = mark_trainable(unet)
    noise_scheduler = build_noise_scheduler(cfg.scheduler)

    splits = load_splits(cfg.data, require=("train", "val"))
    checkpoints = CheckpointManager(accelerator, folder / "checkpoints" / STAGE, rt.checkpoints_total_limit)
    resume_from = checkpoints.resolve(resume)
    train_captions = reward_captions(cfg, splits["train"])
    val_captions = reward_captions(cfg, splits["val"])
    scorer, clip_info = select_clip(
        cfg,
        folder,
        splits,
        accelerator,
        reuse_domain_clip=resume_from is not None,
        captions={"train": train_captions, "val": val_captions},
    )
    train_prompts = reward_prompts(cfg, splits["train"], train_captions)
    val_reward = (reward_prompts(cfg, splits["val"], val_captions), *reward_targets(cfg, splits["val"], val_captions))
    train_table, train_target, train_candidates = reward_targets(cfg, splits["train"], train_captions)
    scorer.requires_grad_(False)

    s2 = cfg.stage2
    train_set = SpriteDataset(splits["train"], cfg.data, train=False)
    val_set = SpriteDataset(splits["val"], cfg.data, train=False)
    train_cache = build_cache(
        vae,
        tokenizer,
        text_encoder,
        train_set,
        cfg.data.max_text_length,
        device,
        flips=s2.cache_flips,
        variants=cfg.data.caption_variants,
    )
    val_cache = build_cache(
        vae, tokenizer, text_encoder, val_set, cfg.data.max_text_length, device, flips=False, desc="caching val latents"
    )
    with torch.no_grad():
        train_features = scorer.text_features(train_table).float()
        prompt_embeds, prompt_masks = encode_texts(
            tokenizer, text_encoder, train_prompts, cfg.data.max_text_length, device
        )

    # the gate judges on its own training captions: the reward never sees them
    from pokediff.training.stage3_gate import gate_prompts

    judged = set(gate_prompts(cfg, splits["train"]).rows)
    reward_rows = [i for i in range(len(train_set)) if i not in judged]
    if len(reward_rows) < s3.batch_size:
        raise ConfigError(
            f"stage 3 has {len(reward_rows)} training captions left for the reward after the gate's "
            f"{len(judged)} (stage3.gate_samples), fewer than stage3.batch_size={s3.batch_size}"
        )

    before = None
    if accelerator.is_main_process and resume_from is None:
        before = evaluate(
            cfg, vae, unet, text_encoder, tokenizer, scorer, val_reward, val_cache, noise_scheduler,
            folder / "samples" / "stage3_before.png",
        )  # fmt: skip
        logger.info(
            "stage 3 before: val reward %.3f, val denoising loss %.5f", before["val_reward"], before["val_denoise_loss"]
        )
        log_image_grid(accelerator, "stage3_before", before["grid"], 0)
    accelerator.wait_for_everyone()

    train_loader = DataLoader(reward_rows, batch_size=s3.batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(
        [p for p in unet.parameters() if p.requires_grad], lr=s3.learning_rate, weight_decay=s3.weight_decay
    )
    unet, optimizer, train_loader = accelerator.prepare(unet, optimizer, train_loader)
    training = start_training(
        accelerator,
        STAGE,
        unet,
        optimizer,
        train_loader,
        checkpoints,
        resume_from,
        folder / "losses.csv",
        s3,
        rt,
    )
    state = training.state
    if resume_from is not None:
        before = state.extra.get("before")
    training.checkpoint_extra["before"] = before

    bare_unet = unwrap(accelerator, unet)
    denoise = DiffusionLoss(
        bare_unet,
        noise_scheduler,
        train_cache,
        vae.scale_latents,
        latent_clamp=s2.latent_clamp,
        caption_dropout=cfg.data.caption_dropout,
        huber_delta=s2.huber_delta,
        min_snr_gamma=s2.min_snr_gamma,
        device=device,
    )
    loss = RewardLoss(
        unet,
        bare_unet,
        reference_unet,
        vae,
        scorer,
        noise_scheduler,
        cfg.scheduler,
        train_cache,
        denoise,
        prompt_embeds=prompt_embeds,
        prompt_masks=prompt_masks,
        caption_features=train_features,
        caption_index=train_target.to(device),
        caption_candidates=None if train_candidates is None else train_candidates.to(device),
        # what users draw with (the pipeline's defaults, as the gate and pokediff.eval sample), not the
        # training grids' scheduler.num_inference_steps / guidance_scale
        num_inference_steps=DEFAULT_NUM_INFERENCE_STEPS,
        guidance_scale=DEFAULT_GUIDANCE_SCALE,
        step_range=tuple(s3.reward_step_range),
        reward_target=s3.reward_target,
        reward_weight=s3.reward_weight,
        kl_weight=s3.kl_weight,
        denoise_weight=s3.denoise_weight,
        denoise_batch_size=s3.denoise_batch_size,
        latent_clamp=s2.latent_clamp,
        huber_delta=s2.huber_delta,
        min_snr_gamma=s2.min_snr_gamma,
        device=device,
    )
    run_epochs(
        training,
        loss,
        epochs=s3.epochs,
        seed=rt.seed,
        checkpoint_every_steps=rt.checkpoint_every_steps,
        desc="stage 3 (reward, U-Net text attention)",
        autocast=True,  # the frozen VAE and CLIP were not prepared
        max_minutes=s3.max_minutes,
    )
    training.save_checkpoint()  # final

    pipeline_dir = folder / "pipeline"
    if accelerator.is_main_process:
        model = unwrap(accelerator, unet).eval()
        after = evaluate(
            cfg, vae, model, text_encoder, tokenizer, scorer, val_reward, val_cache, noise_scheduler,
            folder / "samples" / "stage3_after.png",
        )  # fmt: skip
        log_image_grid(accelerator, "stage3_after", after["grid"], state.global_step)
        if not math.isfinite(after["val_denoise_loss"]):
            raise NoUsableWeightsError(
                f"stage 3 ended without usable weights: the tuned U-Net gives a NaN/inf validation denoising "
                f"loss, so {folder / UNET_DIRNAME} was not written; lower stage3.learning_rate"
            )
        training.log({"val_reward": after["val_reward"], "val_denoise_loss": after["val_denoise_loss"]})
        unet_dir = atomic_save_pretrained(model, folder / UNET_DIRNAME)
        report = {
            "inputs": {"vae": str(vae_path.resolve()), "unet": str(unet_path.resolve())},
            "clip": clip_info,
            "trainable": f"{len(trainable)} tensors: the key/value projections of the U-Net's text cross-attention",
            "steps": state.global_step,
            "skipped_batches": training.stepper.guard.total_skipped,
            "reward_prompts": f"{len(reward_rows)} training rows, prompted with their {s3.reward_prompts} captions",
            "reward_captions": f"{s3.reward_captions}: {len(set(train_captions))} distinct among the training rows, "
            f"each contrasted with {'every other' if train_candidates is None else 'itself naming each body shape'}",
            "reward_target": f"{s3.reward_target} (steps {s3.reward_step_range[0]:g}-{s3.reward_step_range[1]:g})",
            "before": before,
            "after": after,
        }
        if isinstance(scorer, DomainClipScorer):
            report["domain_clip_retrieval"] = scorer.metrics
        write_text_atomic(folder / METRICS_FILE, json.dumps(report, indent=2))
        if before is not None:
            logger.info(
                "stage 3: val reward %.3f -> %.3f (trained against), val denoising loss %.5f -> %.5f (%s)",
                before["val_reward"],
                after["val_reward"],
                before["val_denoise_loss"],
                after["val_denoise_loss"],
                clip_info["clip"],
            )
        extra = {
            "run": rt.experiment_name,
            "stage 3 steps": state.global_step,
            "stage 3 reward CLIP": clip_info["clip"],
        }
        extra.update({f"stage 3 {k}": v for k, v in clip_info.items() if k != "clip"})
        if before is not None:
            extra["stage 3 val reward, trained against (before -> after)"] = (
                f"{before['val_reward']:.3f} -> {after['val_reward']:.3f}"
            )
            extra["stage 3 val denoising loss (before -> after)"] = (
                f"{before['val_denoise_loss']:.5f} -> {after['val_denoise_loss']:.5f}"
            )
        # assembled from the saved folders: exactly what users will load
        pipe = assemble_pipeline(
            cfg,
            SpriteVAE.from_pretrained(str(vae_path)),
            UNet2DConditionModel.from_pretrained(str(unet_dir)),
            text_encoder,
            tokenizer,
            text_encoder_unchanged=True,
        )
        pipe.save_pretrained(pipeline_dir)
        write_model_card(pipeline_dir, stages={3: state.global_step}, extra=extra)
        logger.info("stage 3 done: %d steps -> %s", state.global_step, pipeline_dir)
    training.close()
    return pipeline_dir
