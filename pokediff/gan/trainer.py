"""One object holding a GAN's networks, optimizers and EMA, with the training step and checkpoint I/O.

``train_step`` runs ``train.n_critic`` discriminator updates (each on a fresh real batch) and one
generator update; every model and every trick of :class:`GanTrainConfig` goes through it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from pokediff.data import diff_augment
from pokediff.gan import losses
from pokediff.gan.checkpoint import load_tensors, read_meta, save_gan_checkpoint, unflatten_optimizer_state
from pokediff.gan.config import GanConfig, gan_config_from_dict
from pokediff.gan.ema import GeneratorEMA
from pokediff.gan.progan import progan_phase, progan_stage
from pokediff.gan.registry import build_models

BatchFn = Callable[[], tuple[torch.Tensor, torch.Tensor]]


class GanTrainer:
    def __init__(self, cfg: GanConfig, device="cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        torch.manual_seed(cfg.runtime.seed)
        generator, discriminator = build_models(cfg)
        self.generator = generator.to(self.device)
        self.discriminator = discriminator.to(self.device)
        train_cfg = cfg.train
        betas = (train_cfg.beta1, train_cfg.beta2)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=train_cfg.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=train_cfg.lr_d, betas=betas)
        self.ema = GeneratorEMA(self.generator, train_cfg.ema_decay) if train_cfg.ema_decay else None
        self.step = 0  # generator updates so far
        self.epoch = 0  # passes over the data completed
        self.class_counts: list[int] | None = None  # primary-type histogram of the training data
        self.steps_per_epoch: int | None = None  # generator steps per pass over the data; train() sets it
        # cdcgan with an N+1-class head: D returns (B, N+1) logits, trained with the classification losses
        self.n_plus_one = cfg.model.name == "cdcgan" and cfg.model.discriminator == "n_plus_one"
        self.aug_rng = torch.Generator(device=self.device).manual_seed(cfg.runtime.seed + 1)
        self.noise_rng = torch.Generator().manual_seed(cfg.runtime.seed + 2)
        self._nonfinite_streak = {"discriminator loss": 0, "generator loss": 0}

    # ------------------------------------------------------------------------------------ helpers
    @property
    def is_conditional(self) -> bool:
        return self.generator.is_conditional

    @property
    def uses_schedule(self) -> bool:
        return self.cfg.model.name == "progan" and bool(self.cfg.progan.schedule)

    def phase_at(self, step: int) -> tuple[int, float, float]:
        """(resolution, alpha, lr) of ``progan.schedule`` at generator step ``step``."""
        if self.steps_per_epoch is None:
            raise ValueError("progan.schedule counts epochs: set GanTrainer.steps_per_epoch (pokediff.gan.train does)")
        p = self.cfg.progan
        phases = [(resolution, epochs * self.steps_per_epoch, lr) for resolution, epochs, lr in p.schedule]
        return progan_phase(step, phases, p.fade_in, p.cycle)

    def stage_at(self, step: int) -> tuple[int, float]:
        """(resolution, fade-in alpha) the networks run at in generator step ``step``."""
        if self.cfg.model.name != "progan":
            return self.cfg.model.resolution, 1.0
        if self.uses_schedule:
            return self.phase_at(step)[:2]
        p = self.cfg.progan
        return progan_stage(step, p.resolutions, p.steps_per_stage, p.fade_in, p.cycle)

    @property
    def stage(self) -> tuple[int, float]:
        return self.stage_at(self.step)

    def _stage_kwargs(self, step: int) -> tuple[dict, dict]:
        if self.cfg.model.name != "progan":
            return {}, {}
        resolution, alpha = self.stage_at(step)
        return {"resolution": resolution, "alpha": alpha}, {"alpha": alpha}

    def sample_noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        # drawn on the CPU so that a seed gives the same noise on every device
        return torch.randn(n, self.cfg.model.latent_dim, generator=generator or self.noise_rng).to(self.device)

    def augment(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        policy = self.cfg.train.diff_augment
        return diff_augment(images, policy, generator=generator or self.aug_rng) if policy else images

    def prepare_real(self, images: torch.Tensor) -> torch.Tensor:
        """Real batch at the current stage's size (progan: area-downsampled, blended during fade-in)."""
        images = images.to(self.device)
        resolution, alpha = self.stage
        if self.cfg.model.name != "progan":
            if images.shape[-1] != resolution or images.shape[-2] != resolution:
                raise ValueError(f"real images are {tuple(images.shape[-2:])} but the model works at {resolution}px")
            return images
        if images.shape[-1] != resolution:
            images = F.interpolate(images, size=(resolution, resolution), mode="area")
        if alpha < 1.0:
            coarse = F.interpolate(F.avg_pool2d(images, 2), scale_factor=2, mode="nearest")
            images = torch.lerp(coarse, images, alpha)
        return images

    def _score(self, d_output: torch.Tensor) -> torch.Tensor:
        """One real-vs-fake score per image (N+1 logits -> their binary logit) for the metrics and the GP."""
        return losses.n_plus_one_realness(d_output) if self.n_plus_one else d_output

    def _labels(self, labels) -> torch.Tensor | None:
        return labels.to(self.device) if self.is_conditional else None

    @torch.no_grad()
    def generate(self, z: torch.Tensor, labels=None, use_ema: bool = True) -> torch.Tensor:
        """Images in [-1, 1] at the stage last trained, in eval mode (BatchNorm running statistics)."""
        g_kwargs, _ = self._stage_kwargs(max(self.step - 1, 0))
        model = self.ema.module if (use_ema and self.ema is not None) else self.generator
        was_training = model.training
        model.eval()
        images = model(z.to(self.device), self._labels(labels) if labels is not None else None, **g_kwargs)
        model.train(was_training)
        return images.clamp(-1, 1)

    def _check_finite(self, loss: torch.Tensor, what: str) -> bool:
        if torch.isfinite(loss):
            self._nonfinite_streak[what] = 0
            return True
        self._nonfinite_streak[what] += 1
        if self._nonfinite_streak[what] >= self.cfg.train.nan_max_consecutive:
            raise FloatingPointError(
                f"{what} was non-finite for {self._nonfinite_streak[what]} steps in a row at step {self.step}; "
                "lower the learning rates (train.lr_g / train.lr_d) or enable train.grad_clip"
            )
        return False

    def _clip(self, params) -> torch.Tensor:
        limit = self.cfg.train.grad_clip
        return torch.nn.utils.clip_grad_norm_(list(params), limit if limit else math.inf)

    # ------------------------------------------------------------------------------- the step
    def train_step(self, next_batch: BatchFn) -> dict:
        """``next_batch()`` -> (images (B,3,R,R) in [-1,1], primary type ids (B,)). Returns float metrics."""
        train_cfg = self.cfg.train
        G, D = self.generator, self.discriminator
        G.train()
        D.train()
        g_kwargs, d_kwargs = self._stage_kwargs(self.step)
        if self.uses_schedule:  # each phase of the schedule has its own learning rate, for G and D
            lr = self.phase_at(self.step)[2]
            self.set_learning_rates(lr, lr)
        zero = torch.zeros((), device=self.device)
        skipped = 0

        D.requires_grad_(True)
        for _ in range(train_cfg.n_critic):
            real, labels = next_batch()
            real, labels = self.prepare_real(real), self._labels(labels)
            batch = real.shape[0]
            with torch.no_grad():
                fake = G(self.sample_noise(batch), labels, **g_kwargs)
            real_in, fake_in = self.augment(real), self.augment(fake)
            out_real, features_real = D(real_in, labels, return_features=True, **d_kwargs)
            out_fake = D(fake_in, labels, **d_kwargs)
            if train_cfg.loss == "bce":
                targets = dict(
                    smoothing=train_cfg.label_smoothing,
                    real_range=train_cfg.real_label_range,
                    fake_range=train_cfg.fake_label_range,
                    flip_prob=train_cfg.label_flip_prob,
                    device=self.device,
                    generator=self.noise_rng,
                )
                targets_real = losses.discriminator_targets(batch, real=True, **targets)
                targets_fake = losses.discriminator_targets(batch, real=False, **targets)
                if self.n_plus_one:
                    d_loss = losses.n_plus_one_discriminator_loss(
                        out_real, out_fake, labels, targets_real, targets_fake
                    )
                else:
                    d_loss = losses.bce_discriminator_loss(out_real, out_fake, targets_real, targets_fake)
            else:
                d_loss = losses.wasserstein_critic_loss(out_real, out_fake, drift=train_cfg.drift)
            gp = zero
            if train_cfg.lambda_gp > 0:
                gp = losses.gradient_penalty(
                    lambda x: self._score(D(x, labels, **d_kwargs)), real_in, fake_in, self.noise_rng
                )
            d_total = d_loss + train_cfg.lambda_gp * gp
            self.opt_d.zero_grad(set_to_none=True)
            if self._check_finite(d_total, "discriminator loss"):
                d_total.backward()
                d_grad_norm = self._clip(D.parameters())
                self.opt_d.step()
            else:
                skipped += 1
                d_grad_norm = torch.tensor(float("nan"))

        D.requires_grad_(False)  # G's update needs gradients through D, not for D
        fake = G(self.sample_noise(batch), labels, **g_kwargs)
        out_gen, features_fake = D(self.augment(fake), labels, return_features=True, **d_kwargs)
        if self.n_plus_one:
            g_loss = losses.n_plus_one_generator_loss(out_gen, labels)
        elif train_cfg.loss == "bce":
            g_loss = losses.bce_generator_loss(out_gen)
        else:
            g_loss = losses.wasserstein_generator_loss(out_gen)
        fm = losses.feature_matching_loss(features_real, features_fake) if train_cfg.feature_matching > 0 else zero
        g_total = g_loss + train_cfg.feature_matching * fm
        self.opt_g.zero_grad(set_to_none=True)
        if self._check_finite(g_total, "generator loss"):
            g_total.backward()
            g_grad_norm = self._clip(G.parameters())
            self.opt_g.step()
            if self.ema is not None:
                self.ema.update(G)
        else:
            skipped += 1
            g_grad_norm = torch.tensor(float("nan"))
        D.requires_grad_(True)

        resolution, alpha = self.stage
        self.step += 1
        return {
            "d_loss": float(d_loss.detach()),
            "g_loss": float(g_loss.detach()),
            "gp": float(gp.detach()),
            "fm_loss": float(fm.detach()),
            "d_real": float(self._score(out_real.detach()).mean()),
            "d_fake": float(self._score(out_fake.detach()).mean()),
            "d_grad_norm": float(d_grad_norm.detach()),
            "g_grad_norm": float(g_grad_norm.detach()),
            "resolution": resolution,
            "alpha": alpha,
            "skipped": skipped,
        }

    # ------------------------------------------------------------------------------ checkpoints
    def set_learning_rates(self, lr_g: float | None = None, lr_d: float | None = None) -> None:
        for optimizer, lr in ((self.opt_g, lr_g), (self.opt_d, lr_d)):
            if lr is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr

    def save(self, path, extra_tensors: dict | None = None, extra_meta: dict | None = None):
        resolution, alpha = self.stage_at(max(self.step - 1, 0))  # the stage the weights were last trained at
        meta = {
            "model_name": self.cfg.model.name,
            "step": self.step,
            "epoch": self.epoch,
            "stage": {"resolution": resolution, "alpha": alpha},
            "class_counts": self.class_counts,
            "steps_per_epoch": self.steps_per_epoch,
            "ema_updates": self.ema.num_updates if self.ema is not None else 0,
            "gan_config": self.cfg.to_dict(),
            **(extra_meta or {}),
        }
        tensors = {"noise_rng": self.noise_rng.get_state(), **(extra_tensors or {})}
        if self.device.type == "cpu":
            tensors["aug_rng"] = self.aug_rng.get_state()
        return save_gan_checkpoint(
            path,
            generator=self.generator,
            discriminator=self.discriminator,
            optimizers={"generator": self.opt_g, "discriminator": self.opt_d},
            meta=meta,
            ema_module=self.ema.module if self.ema is not None else None,
            extra_tensors=tensors,
        )

    @classmethod
    def from_checkpoint(cls, path, cfg: GanConfig | None = None, device="cpu") -> tuple["GanTrainer", dict]:
        """Rebuild a trainer exactly where a checkpoint left off. ``cfg`` (default: the saved one) may change
        training knobs; the learning rates of ``cfg`` replace the saved ones, so ``--lr`` works on resume."""
        meta = read_meta(path)
        cfg = cfg or gan_config_from_dict(meta["gan_config"])
        if cfg.model.name != meta["model_name"]:
            raise ValueError(f"checkpoint {path} holds a '{meta['model_name']}' model, not '{cfg.model.name}'")
        trainer = cls(cfg, device=device)
        trainer.generator.load_state_dict(load_tensors(path, "generator"))
        trainer.discriminator.load_state_dict(load_tensors(path, "discriminator"))
        opt_tensors = load_tensors(path, "optimizers")
        trainer.opt_g.load_state_dict(
            unflatten_optimizer_state(opt_tensors, meta["optimizers"]["generator"], "generator")
        )
        trainer.opt_d.load_state_dict(
            unflatten_optimizer_state(opt_tensors, meta["optimizers"]["discriminator"], "discriminator")
        )
        trainer.set_learning_rates(cfg.train.lr_g, cfg.train.lr_d)
        if trainer.ema is not None:
            if meta.get("has_ema"):
                trainer.ema.load_module_state(load_tensors(path, "generator_ema", device), meta.get("ema_updates", 0))
            else:  # EMA switched on at resume: start averaging from the current weights
                trainer.ema.load_module_state(trainer.generator.state_dict(), 0)
        extra = load_tensors(path, "extra")
        trainer.noise_rng.set_state(extra["noise_rng"])
        if "aug_rng" in extra and trainer.device.type == "cpu":
            trainer.aug_rng.set_state(extra["aug_rng"])
        trainer.step = int(meta["step"])
        trainer.epoch = int(meta["epoch"])
        trainer.class_counts = meta.get("class_counts")
        trainer.steps_per_epoch = meta.get("steps_per_epoch")
        return trainer, {"meta": meta, "extra": extra}
