"""Typed GAN run configuration (YAML in ``configs/gan/`` + ``key=value`` overrides).

Loaded with the project's generic ``pokediff.config.build_config``, so unknown keys are errors that
suggest the closest valid key, and ``base: other.yaml`` inheritance works as for the diffusion configs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pokediff.config import (
    CONFIG_DIR,
    REPORT_TO,
    ConfigChecker,
    ConfigError,
    DataConfig,
    _check_data,
    build_config,
    config_from_dict,
)

GAN_CONFIG_DIR = CONFIG_DIR / "gan"
MODEL_NAMES = ("dcgan", "wgan_small", "wgan_large", "progan", "cdcgan", "vitgan")
CDCGAN_DISCRIMINATORS = ("projection", "n_plus_one")
LOSS_NAMES = ("bce", "wgan")


@dataclass
class GanModelConfig:
    name: str = "dcgan"  # dcgan | wgan_small | wgan_large | progan | cdcgan | vitgan
    resolution: int = 96  # output size; progan: the last stage
    latent_dim: int = 50
    g_features: int = 64  # feature maps of G's last (widest-resolution) block; earlier blocks double it
    d_features: int = 64  # feature maps of D's first block; later blocks double it (vitgan: token widths)
    g_max_features: int = 512
    d_max_features: int = 1024
    g_dropout: float = 0.0  # dropout after each G upsampling block (a DCGAN trick)
    spectral_norm: bool = True  # on the discriminator's convolutions (dcgan, cdcgan, wgan_large)
    attention_resolution: int = 32  # wgan_large: self-attention at this feature size (0 = none)
    num_classes: int = 18  # cdcgan: number of primary types (len(pokediff.data.TYPE_NAMES))
    class_embed_dim: int = 16  # cdcgan: type embedding concatenated to the noise
    discriminator: str = "projection"  # cdcgan: projection | n_plus_one (N types + "fake" classifier)
    patch_size: int = 8  # vitgan: pixels per patch side (one token per patch in G and D)
    g_depth: int = 4  # vitgan: transformer blocks in G
    d_depth: int = 4  # vitgan: transformer blocks in D
    num_heads: int = 4  # vitgan: attention heads (g_features and d_features must be multiples of it)
    decoder_channels: int = 32  # vitgan: width of G's implicit (Fourier-feature, sin) patch decoder


@dataclass
class GanTrainConfig:
    loss: str = "bce"  # bce (non-saturating, label tricks apply) | wgan (critic scores, use lambda_gp)
    batch_size: int = 64
    epochs: int = 100
    max_steps: Optional[int] = None  # generator steps in total (also across resumes)
    max_minutes: Optional[float] = None  # wall-clock budget of this invocation
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    n_critic: int = 1  # discriminator steps per generator step, each on a fresh real batch
    lambda_gp: float = 0.0  # gradient-penalty weight (10 for WGAN-GP; 0 = off)
    drift: float = 0.0  # ProGAN's epsilon_drift * D(real)^2 keeps critic scores near 0
    label_smoothing: bool = False  # bce: real targets drawn from real_label_range, fake from fake_label_range
    real_label_range: list = field(default_factory=lambda: [0.7, 1.0])
    fake_label_range: list = field(default_factory=lambda: [0.0, 0.3])
    label_flip_prob: float = 0.0  # bce: probability that a discriminator target is swapped real<->fake
    feature_matching: float = 0.0  # weight of the feature-matching term added to the G loss
    grad_clip: Optional[float] = None  # max grad norm for both networks (null = no clipping)
    diff_augment: str = ""  # DiffAugment policy applied to real and fake, e.g. "color,translation,cutout"
    ema_decay: Optional[float] = None  # EMA of G (e.g. 0.999); null = off
    nan_max_consecutive: int = 20  # abort after this many non-finite steps in a row


@dataclass
class ProganConfig:
    resolutions: list = field(default_factory=lambda: [32, 64, 128])  # stages; the last = model.resolution
    steps_per_stage: int = 3000  # generator steps spent at each resolution
    fade_in: float = 0.5  # fraction of a new stage spent blending the new block in (0 = no fade-in)
    cycle: bool = False  # after the last stage (or schedule phase), start again at the first
    # PokéGAN's resolution cycling: [[resolution, epochs, lr], ...] phases in order, down as well as up
    # (an increase is one doubling, faded in); replaces resolutions / steps_per_stage when given.
    # lr is the learning rate of G and D during the phase.
    schedule: list = field(default_factory=list)


@dataclass
class PretrainConfig:
    dataset: Optional[str] = None  # a `datasets` hub name (e.g. cifar10) or a local image folder
    image_column: str = "image"  # cifar10: img
    caption_column: str = "text"  # any non-empty column; the data layer checks it (cifar10: label)
    steps: int = 0  # generator steps on the pretraining data before switching to Pokémon


@dataclass
class GanRuntimeConfig:
    seed: int = 0
    output_dir: str = "outputs/gan"
    experiment_name: Optional[str] = None  # run folder name; default: the model name
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:1 ...
    checkpoint_every_steps: int = 1000
    checkpoints_total_limit: int = 3
    sample_every_epochs: int = 1  # fixed-noise grid into samples/ (and TensorBoard)
    num_sample_images: int = 64
    log_every_steps: int = 10
    report_to: str = "tensorboard"  # tensorboard | none


@dataclass
class GanConfig:
    model: GanModelConfig = field(default_factory=GanModelConfig)
    train: GanTrainConfig = field(default_factory=GanTrainConfig)
    data: DataConfig = field(default_factory=DataConfig)  # data.resolution is set from model.resolution
    progan: ProganConfig = field(default_factory=ProganConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    runtime: GanRuntimeConfig = field(default_factory=GanRuntimeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_ranges(cfg: GanConfig) -> None:
    """Ranges and finiteness, as ``pokediff.config.validate_config`` does for diffusion: ``key=value: allowed``."""
    c = ConfigChecker(cfg)
    c.choice("model.name", MODEL_NAMES)
    c.choice("train.loss", LOSS_NAMES)
    c.ints_at_least(
        1,
        "model.resolution",
        "model.latent_dim",
        "model.g_features",
        "model.d_features",
        "model.g_max_features",
        "model.d_max_features",
        "model.num_classes",
        "model.class_embed_dim",
        "train.batch_size",
        "train.epochs",
        "train.n_critic",
    )
    c.ints_at_least(0, "model.attention_resolution", "pretrain.steps")
    c.fraction("model.g_dropout", high_open=True)
    c.ints_at_least(1, "train.max_steps", optional=True)
    c.positive("train.max_minutes", "train.grad_clip", optional=True)
    c.positive("train.lr_g", "train.lr_d")
    c.fraction("train.beta1", "train.beta2", high_open=True)
    c.non_negative("train.lambda_gp", "train.drift", "train.feature_matching")
    c.fraction("train.label_flip_prob")
    c.fraction("train.ema_decay", low_open=True, high_open=True, optional=True)
    c.ints_at_least(
        1,
        "train.nan_max_consecutive",
        "runtime.checkpoint_every_steps",
        "runtime.checkpoints_total_limit",
        "runtime.sample_every_epochs",
        "runtime.num_sample_images",
        "runtime.log_every_steps",
    )
    c.fraction("progan.fade_in", high_open=True)
    c.choice("runtime.report_to", REPORT_TO)
    c.non_empty_text("runtime.output_dir", "runtime.device")
    _check_data(c)
    c.finite_floats()


def validate_gan_config(cfg: GanConfig) -> GanConfig:
    """Check ranges and cross-field rules once, with errors that name the bad key; syncs data.resolution."""
    _check_ranges(cfg)
    if cfg.model.name not in MODEL_NAMES:
        raise ConfigError(f"model.name '{cfg.model.name}' is not one of {', '.join(MODEL_NAMES)}")
    if cfg.train.loss not in LOSS_NAMES:
        raise ConfigError(f"train.loss '{cfg.train.loss}' is not one of {', '.join(LOSS_NAMES)}")
    if cfg.train.n_critic < 1:
        raise ConfigError(f"train.n_critic must be >= 1, got {cfg.train.n_critic}")
    if cfg.train.batch_size < 1:
        raise ConfigError(f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
    for key in ("real_label_range", "fake_label_range"):
        lo_hi = getattr(cfg.train, key)
        if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0:
            raise ConfigError(f"train.{key} must be [low, high] within [0, 1], got {lo_hi}")
    if not 0.0 <= cfg.train.label_flip_prob <= 1.0:
        raise ConfigError(f"train.label_flip_prob must be in [0, 1], got {cfg.train.label_flip_prob}")
    if cfg.train.ema_decay is not None and not 0.0 < cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in (0, 1) or null, got {cfg.train.ema_decay}")
    if cfg.model.discriminator not in CDCGAN_DISCRIMINATORS:
        raise ConfigError(
            f"model.discriminator '{cfg.model.discriminator}' is not one of {', '.join(CDCGAN_DISCRIMINATORS)}"
        )
    if cfg.model.discriminator == "n_plus_one":
        if cfg.model.name != "cdcgan":
            raise ConfigError(f"model.discriminator=n_plus_one needs model.name=cdcgan, got {cfg.model.name}")
        if cfg.train.loss != "bce":
            raise ConfigError("model.discriminator=n_plus_one is a classifier: it needs train.loss=bce")
    if cfg.model.name == "progan" and cfg.progan.schedule:
        cfg.progan.schedule = validate_progan_schedule(cfg.progan.schedule, cfg.model.resolution)
        _check_schedule_wrap(cfg)
    elif cfg.model.name == "progan":
        stages = cfg.progan.resolutions
        if not stages or stages != sorted(stages) or stages[-1] != cfg.model.resolution:
            raise ConfigError(
                f"progan.resolutions must increase and end at model.resolution ({cfg.model.resolution}), got {stages}"
            )
        if cfg.progan.steps_per_stage < 1:
            raise ConfigError(f"progan.steps_per_stage must be >= 1, got {cfg.progan.steps_per_stage}")
    if cfg.pretrain.dataset and cfg.pretrain.steps < 1:
        raise ConfigError("pretrain.dataset is set but pretrain.steps is 0: give --pretrain-steps N (generator steps)")
    for key in ("checkpoint_every_steps", "sample_every_epochs", "log_every_steps"):
        if getattr(cfg.runtime, key) < 1:
            raise ConfigError(f"runtime.{key} must be >= 1, got {getattr(cfg.runtime, key)}")
    if cfg.runtime.report_to not in ("tensorboard", "none"):
        raise ConfigError(f"runtime.report_to must be 'tensorboard' or 'none', got '{cfg.runtime.report_to}'")
    # GANs work at one fixed size: the data layer must deliver exactly what G produces.
    cfg.data.resolution = cfg.model.resolution
    return cfg


def validate_progan_schedule(schedule, model_resolution: int) -> list:
    """``progan.schedule`` checked phase by phase, with the learning rates as floats (YAML reads ``2e-4``,
    without a dot, as text)."""
    if not isinstance(schedule, (list, tuple)):
        raise ConfigError(f"progan.schedule must be a list of [resolution, epochs, lr] phases, got {schedule!r}")
    supported = [8 * 2**k for k in range(12) if 8 * 2**k <= model_resolution]
    phases = []
    for i, phase in enumerate(schedule):
        where = f"progan.schedule[{i}]"
        if not isinstance(phase, (list, tuple)) or len(phase) != 3:
            raise ConfigError(f"{where} must be [resolution, epochs, lr], got {phase!r}")
        resolution, epochs, lr = phase
        if isinstance(resolution, bool) or resolution not in supported:
            raise ConfigError(
                f"{where}: resolution {resolution!r} is not a stage of this model (model.resolution "
                f"{model_resolution}); use one of {', '.join(map(str, supported))}"
            )
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"{where}: epochs must be a positive whole number, got {epochs!r}")
        try:
            lr = float(lr) if not isinstance(lr, bool) else math.nan
        except (TypeError, ValueError):
            lr = math.nan
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"{where}: lr must be a finite number > 0, got {phase[2]!r}")
        if phases and resolution > 2 * phases[-1][0]:
            raise ConfigError(
                f"{where} goes up from {phases[-1][0]} to {resolution}: go up one doubling at a time "
                "(the fade-in blends in one new block)"
            )
        phases.append([resolution, epochs, lr])
    return phases


def _check_schedule_wrap(cfg: GanConfig) -> None:
    first, last = cfg.progan.schedule[0][0], cfg.progan.schedule[-1][0]
    if cfg.progan.cycle and first > 2 * last:
        raise ConfigError(
            f"progan.cycle: progan.schedule would go up from its last phase ({last}) to its first ({first}); "
            "go up one doubling at a time"
        )


def progan_start_resolution(cfg: GanConfig) -> int:
    """The smallest resolution the progan networks must run at."""
    return min(r for r, _, _ in cfg.progan.schedule) if cfg.progan.schedule else cfg.progan.resolutions[0]


def default_config_path(model_name: str) -> Path:
    if model_name not in MODEL_NAMES:
        raise ValueError(f"unknown GAN model '{model_name}'; choose one of {', '.join(MODEL_NAMES)}")
    return GAN_CONFIG_DIR / f"{model_name}.yaml"


def load_gan_config(path=None, overrides=None) -> GanConfig:
    return validate_gan_config(build_config(GanConfig, path, overrides))


def gan_config_from_dict(data: dict) -> GanConfig:
    return validate_gan_config(config_from_dict(GanConfig, data))
