"""Stage 1: train the sprite VAE (L1 + perceptual + annealed KL with free bits, optionally a PatchGAN term),
keep the best by val loss, then set its latent scaling factor to 1/std of the training latents."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pokediff.data import SpriteDataset, build_dataloader, collate_sprites, load_splits, tokenize_captions
from pokediff.errors import NoUsableWeightsError
from pokediff.images import save_image_grid
from pokediff.models.patch_discriminator import PatchDiscriminator
from pokediff.models.perceptual import load_perceptual
from pokediff.models.vae import SpriteVAE, build_vae
from pokediff.training.checkpoints import CheckpointManager, atomic_save_pretrained
from pokediff.training.loop import run_epochs, start_training
from pokediff.training.metrics import log_image_grid
from pokediff.training.seeding import wrap_dataloader_seeded
from pokediff.training.setup import build_accelerator, maybe_compile, start_stage, to_channels_last, unwrap

logger = logging.getLogger(__name__)
STAGE = "stage1"


def kl_per_element(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) of each latent element, in float32."""
    return 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float())


def kl_with_free_bits(mean: torch.Tensor, logvar: torch.Tensor, free_bits: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL term to optimise, raw KL), both summed over channels of the per-element KL averaged per channel.

    Free bits: a channel whose average KL is below ``free_bits`` nats contributes the constant ``free_bits``,
    so the KL pressure cannot collapse it to the prior (posterior collapse).
    """
    per_channel = kl_per_element(mean, logvar).mean(dim=(0, 2, 3))
    return per_channel.clamp(min=free_bits).sum(), per_channel.sum()


def kl_weight_at(step: int, updates_per_epoch: int, kl_weight: float, anneal_epochs: float) -> float:
    """Linear KL annealing 0 -> ``kl_weight`` over ``anneal_epochs`` (fractional epochs)."""
    if anneal_epochs <= 0:
        return kl_weight
    progress = step / (updates_per_epoch * anneal_epochs)
    return kl_weight * min(1.0, progress)


class VAETrainingModule(torch.nn.Module):
    """Wraps the VAE so one ``forward`` (the call DDP synchronises) returns reconstruction and posterior."""

    def __init__(self, vae: SpriteVAE):
        super().__init__()
        self.vae = vae

    def forward(
        self, pixel_values, sample_posterior: bool = True, encoder_hidden_states=None, encoder_attention_mask=None
    ):
        posterior = self.vae.encode(pixel_values).latent_dist
        z = posterior.sample() if sample_posterior else posterior.mode()
        recon = self.vae.decode(
            z, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask
        ).sample
        recon = recon[..., : pixel_values.shape[-2], : pixel_values.shape[-1]]
        return recon, posterior.mean, posterior.logvar


class _TextConditioner:
    """Frozen text features for a VAE built with ``decoder_cross_attention`` (else a no-op)."""

    def __init__(self, cfg, vae: SpriteVAE, device):
        self.enabled = bool(vae.config.decoder_cross_attention)
        if not self.enabled:
            return
        from pokediff.models.text import load_text_encoder

        self.tokenizer, self.encoder = load_text_encoder(cfg.text_encoder.name)
        self.encoder.requires_grad_(False).eval().to(device)
        self.max_length = cfg.data.max_text_length
        self.device = device

    @torch.no_grad()
    def __call__(self, captions) -> dict:
        if not self.enabled:
            return {}
        tokens = tokenize_captions(self.tokenizer, list(captions), self.max_length)
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        return {
            "encoder_hidden_states": self.encoder(ids, attention_mask=mask).last_hidden_state,
            "encoder_attention_mask": mask,
        }


def _vae_losses(
    module,
    batch,
    perceptual,
    text,
    kl_weight: float,
    sample_posterior: bool,
    l1_weight: float,
    perceptual_weight: float,
    free_bits: float,
):
    """(loss, its logged parts, reconstruction) of one batch."""
    pixels = batch["pixel_values"]
    recon, mean, logvar = module(pixels, sample_posterior=sample_posterior, **text(batch["text"]))
    recon = recon.float()
    l1 = (recon - pixels.float()).abs().mean()
    perc = perceptual(recon, pixels.float()).mean() if perceptual is not None else torch.zeros((), device=l1.device)
    kl_term, kl_raw = kl_with_free_bits(mean, logvar, free_bits)
    loss = l1_weight * l1 + perceptual_weight * perc + kl_weight * kl_term
    return loss, {"l1": l1.detach(), "perceptual": perc.detach(), "kl": kl_raw.detach()}, recon


class AdversarialTerm:
    """Stable Diffusion's VAE GAN term: a PatchGAN learns real vs reconstruction with the hinge loss, and the
    VAE is pushed towards what it calls real, both from ``start_step`` on (a fixed weight, not SD's adaptive
    one: that needs two extra backward passes through the decoder, too dear on a CPU)."""

    def __init__(self, accelerator, discriminator, optimizer, *, weight: float, start_step: int):
        self.accelerator, self.discriminator, self.optimizer = accelerator, discriminator, optimizer
        self.weight, self.start_step = weight, start_step

    def discriminator_step(self, real: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """One update of the discriminator; returns its hinge loss (detached)."""
        # one forward over real and fake together: one forward per backward, as DDP wants
        logits = self.discriminator(torch.cat([real, recon.detach()]).float())
        logits_real, logits_fake = logits.chunk(2)
        loss = 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.optimizer.step()
        return loss.detach()

    def generator_loss(self, recon: torch.Tensor) -> torch.Tensor:
        """-mean(D(recon)), differentiable in ``recon`` only: the VAE's backward computes no discriminator
        gradients (nor, through the unwrapped module, a DDP all-reduce of them)."""
        discriminator = self.accelerator.unwrap_model(self.discriminator)
        discriminator.requires_grad_(False)  # recorded at forward time, so it holds for the later backward
        try:
            return -discriminator(recon.float()).mean()
        finally:
            discriminator.requires_grad_(True)

    def __call__(self, real: torch.Tensor, recon: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """(the VAE's adversarial loss, logged parts); zero and untrained before ``start_step``."""
        if step < self.start_step:
            return torch.zeros((), device=recon.device), {}
        d_loss = self.discriminator_step(real, recon)
        g_loss = self.generator_loss(recon)
        return self.weight * g_loss, {"d_loss": d_loss, "g_loss": g_loss.detach()}


class VAELoss:
    """Stage 1's training loss: L1 + perceptual + KL with free bits, the KL weight annealed by step."""

    def __init__(
        self,
        module,
        perceptual,
        text,
        *,
        l1_weight: float,
        perceptual_weight: float,
        kl_weight: float,
        kl_anneal_epochs: float,
        free_bits: float,
        updates_per_epoch: int,
        adversarial: AdversarialTerm | None = None,
    ):
        self.module, self.perceptual, self.text, self.adversarial = module, perceptual, text, adversarial
        self.l1_weight, self.perceptual_weight, self.free_bits = l1_weight, perceptual_weight, free_bits
        self.kl_weight, self.kl_anneal_epochs = kl_weight, kl_anneal_epochs
        self.updates_per_epoch = updates_per_epoch

    def __call__(self, batch, step: int):
        kl_weight = kl_weight_at(step, self.updates_per_epoch, self.kl_weight, self.kl_anneal_epochs)
        # positional: tests wrap _vae_losses as (module, batch, *args)
        loss, parts, recon = _vae_losses(
            self.module,
            batch,
            self.perceptual,
            self.text,
            kl_weight,
            True,
            self.l1_weight,
            self.perceptual_weight,
            self.free_bits,
        )
        if self.adversarial is not None:
            adversarial_loss, adversarial_parts = self.adversarial(batch["pixel_values"], recon, step)
            loss, parts = loss + adversarial_loss, {**parts, **adversarial_parts}
        return loss, {**parts, "kl_weight": kl_weight}


@torch.no_grad()
def evaluate_vae(
    accelerator,
    module,
    loader,
    perceptual,
    text,
    *,
    l1_weight: float,
    perceptual_weight: float,
    kl_weight: float,
    free_bits: float,
) -> float:
    """Mean per-image val loss: posterior mode and the final KL weight, so epochs compare while annealing."""
    module.eval()
    per_image = []
    for batch in loader:
        pixels = batch["pixel_values"].float()
        with accelerator.autocast():
            recon, mean, logvar = module(batch["pixel_values"], sample_posterior=False, **text(batch["text"]))
            perc = perceptual(recon.float(), pixels) if perceptual is not None else None
        recon = recon.float()
        loss = l1_weight * (recon - pixels).abs().mean(dim=(1, 2, 3))
        if perc is not None:
            loss = loss + perceptual_weight * perc.float().view(-1)
        kl = kl_per_element(mean, logvar)
        loss = loss + kl_weight * kl.mean(dim=(2, 3)).clamp(min=free_bits).sum(dim=1)
        per_image.append(accelerator.gather_for_metrics(loss))
    module.train()
    return float(torch.cat(per_image).mean())


@torch.no_grad()
def save_reconstruction_grid(accelerator, module, images, captions, text, path) -> Path:
    """Top row: inputs; bottom row: reconstructions (posterior mode), both in [0, 1]."""
    module.eval()
    with accelerator.autocast():
        recon, _, _ = unwrap(accelerator, module)(images, sample_posterior=False, **text(captions))
    module.train()
    grid = torch.cat([images.float(), recon.float()]).add(1).div(2)
    return save_image_grid(grid, path, nrow=images.shape[0])


@torch.no_grad()
def latent_statistics(vae: SpriteVAE, loader, device, seed: int) -> tuple[list[float], list[float], float]:
    """(per-channel mean, per-channel std, overall std) of posterior samples over ``loader``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    count, total, total_sq = 0, 0.0, 0.0
    for batch in tqdm(loader, desc="latent statistics", leave=False):
        posterior = vae.encode(batch["pixel_values"].to(device)).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        z = (posterior.mean + posterior.std * noise).double().transpose(0, 1).flatten(1)  # (C, N*H*W)
        count += z.shape[1]
        total = total + z.sum(dim=1)
        total_sq = total_sq + (z * z).sum(dim=1)
    mean = total / count
    var = total_sq / count - mean**2
    overall = float(total_sq.sum() / (count * len(var)) - (total.sum() / (count * len(var))) ** 2)
    if not torch.isfinite(var).all() or (var <= 0).any() or not math.isfinite(overall) or overall <= 0:
        raise RuntimeError(f"cannot compute the latent statistics: latent variances are {var.tolist()}")
    return mean.tolist(), var.sqrt().tolist(), math.sqrt(overall)


def compute_scaling_factor(vae: SpriteVAE, loader, device, seed: int) -> float:
    """1 / std of posterior samples over ``loader`` (as Stable Diffusion's 0.18215 was found)."""
    return 1.0 / latent_statistics(vae, loader, device, seed)[2]


def train_stage1(cfg, accelerator=None, resume: Optional[str] = None) -> Path:
    """Train the VAE; returns ``<run>/vae`` (best by val loss, ``scaling_factor`` set)."""
    s1, rt = cfg.stage1, cfg.runtime
    accelerator = build_accelerator(cfg, accelerator)
    folder = start_stage(accelerator, cfg, STAGE)
    vae_dir = folder / "vae"

    splits = load_splits(cfg.data, require=("train", "val"))
    train_loader = wrap_dataloader_seeded(
        build_dataloader(cfg.data, "train", s1.batch_size, shuffle=True, drop_last=True, dataset=splits["train"]),
        rt.seed,
    )
    val_loader = build_dataloader(cfg.data, "val", s1.batch_size, shuffle=False, dataset=splits["val"])

    vae = to_channels_last(build_vae(cfg.vae, cfg.data.resolution), rt.channels_last)
    module = maybe_compile(VAETrainingModule(vae), rt.compile)
    text = _TextConditioner(cfg, vae, accelerator.device)
    perceptual = None
    if s1.perceptual_weight > 0:
        perceptual = load_perceptual(cfg.perceptual).to(accelerator.device)

    optimizer = torch.optim.AdamW(vae.parameters(), lr=s1.learning_rate, weight_decay=s1.weight_decay)
    module, optimizer, train_loader, val_loader = accelerator.prepare(module, optimizer, train_loader, val_loader)
    adversarial = None
    if s1.adversarial_weight > 0:
        # prepared before the checkpoint is resolved, so save_state / load_state carry it with the VAE
        discriminator = PatchDiscriminator()
        d_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=s1.discriminator_learning_rate, betas=(0.5, 0.9))
        discriminator, d_optimizer = accelerator.prepare(discriminator, d_optimizer)
        adversarial = AdversarialTerm(
            accelerator, discriminator, d_optimizer, weight=s1.adversarial_weight, start_step=s1.adversarial_start_step
        )
    checkpoints = CheckpointManager(accelerator, folder / "checkpoints" / STAGE, rt.checkpoints_total_limit)
    training = start_training(
        accelerator,
        STAGE,
        module,
        optimizer,
        train_loader,
        checkpoints,
        checkpoints.resolve(resume),
        folder / "losses.csv",
        s1,
        rt,
    )
    state = training.state
    loss = VAELoss(
        module,
        perceptual,
        text,
        l1_weight=s1.l1_weight,
        perceptual_weight=s1.perceptual_weight,
        kl_weight=s1.kl_weight,
        kl_anneal_epochs=s1.kl_anneal_epochs,
        free_bits=s1.free_bits,
        updates_per_epoch=training.updates_per_epoch,
        adversarial=adversarial,
    )

    fixed = next(iter(build_dataloader(cfg.data, "val", s1.num_sample_images, shuffle=False, dataset=splits["val"])))
    fixed_images = fixed["pixel_values"].to(accelerator.device)

    def validate_and_keep_best():
        val_loss = evaluate_vae(
            accelerator,
            module,
            val_loader,
            perceptual,
            text,
            l1_weight=s1.l1_weight,
            perceptual_weight=s1.perceptual_weight,
            kl_weight=s1.kl_weight,
            free_bits=s1.free_bits,
        )
        training.log({"val_loss": val_loss})
        if val_loss < state.best_val_loss:
            state.best_val_loss = val_loss
            if accelerator.is_main_process:
                atomic_save_pretrained(unwrap(accelerator, module).vae, vae_dir)
        accelerator.wait_for_everyone()

    def end_of_epoch(epoch: int, finished: bool):
        validate_and_keep_best()
        if accelerator.is_main_process and (finished or (epoch + 1) % rt.sample_every_epochs == 0):
            grid = save_reconstruction_grid(
                accelerator,
                module,
                fixed_images,
                fixed["text"],
                text,
                folder / "samples" / f"{STAGE}_epoch{epoch + 1:04d}.png",
            )
            log_image_grid(accelerator, "reconstructions", grid, state.global_step)

    run_epochs(
        training,
        loss,
        epochs=s1.epochs,
        seed=rt.seed,
        checkpoint_every_steps=rt.checkpoint_every_steps,
        desc="stage 1 (VAE)",
        end_of_epoch=end_of_epoch,
        max_minutes=s1.max_minutes,
    )
    if not vae_dir.is_dir():  # resumed from a final checkpoint whose best weights were lost
        validate_and_keep_best()
    if not vae_dir.is_dir():
        raise NoUsableWeightsError(
            f"stage 1 ended without usable weights: every validation loss was NaN/inf, so {vae_dir} was never "
            "written; lower stage1.learning_rate or check the data, then train stage 1 again"
        )
    training.save_checkpoint()  # final

    # The scaling factor is a property of the best weights, computed once on clean (un-augmented) train images.
    if accelerator.is_main_process:
        best = SpriteVAE.from_pretrained(str(vae_dir)).to(accelerator.device).eval()
        clean = DataLoader(
            SpriteDataset(splits["train"], cfg.data, train=False), batch_size=s1.batch_size, collate_fn=collate_sprites
        )
        channel_mean, channel_std, overall_std = latent_statistics(best, clean, accelerator.device, rt.seed)
        factor = 1.0 / overall_std
        if s1.per_channel_latent_norm:
            # each channel to zero mean, unit std: one global scale leaves a low-variance channel under the noise
            # from the first timesteps (diffusers' latents_mean / latents_std, as SDXL-family VAEs carry them)
            factor = 1.0
            best.register_to_config(latents_mean=channel_mean, latents_std=channel_std)
        best.register_to_config(scaling_factor=factor)
        atomic_save_pretrained(best, vae_dir)
        training.log({"scaling_factor": factor})
        logger.info("stage 1 done: best val loss %.4f, scaling factor %.4f -> %s", state.best_val_loss, factor, vae_dir)
    training.close()
    return vae_dir
