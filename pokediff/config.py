"""Typed run configuration: YAML files + ``key=value`` overrides, validated against dataclasses.

The dataclasses below *are* the schema: a key that is not a field is an error that names the key and
suggests the closest valid one. YAML files may start from another file with ``base: other.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from pokediff.fileio import atomic_write

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "pokemon"


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type or range."""


# PyYAML follows YAML 1.1, which reads `1e-4` (no dot) and `1E10` as strings; these are the spellings a
# float-typed key accepts as text. nan/inf parse too, so that validation can refuse them by key name.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?\.?(inf|infinity|nan)", re.IGNORECASE)


def _float_from_text(text: str) -> float | None:
    text = text.strip()
    if not _FLOAT_TEXT.fullmatch(text):
        return None
    return float(re.sub(r"^([-+]?)\.(?=[a-zA-Z])", r"\1", text))  # YAML's `.inf` is Python's `inf`


# ----------------------------------------------------------------------------------------- schema
@dataclass
class AugmentConfig:
    hflip: float = 0.5  # probability
    rotation: float = 10.0  # max degrees, either way
    color_jitter: list = field(default_factory=lambda: [0.1, 0.1, 0.1, 0.02])  # brightness, contrast, saturation, hue


@dataclass
class DataConfig:
    root: str = str(DEFAULT_DATA_DIR)  # a local imagefolder (metadata.csv / metadata.jsonl)
    dataset_name: Optional[str] = None  # a hub dataset id; takes precedence over `root`
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = 215
    background: list = field(default_factory=lambda: [255, 255, 255])  # RGB the alpha is composited onto
    trim: bool = False  # crop to the alpha bounding box before resizing
    # hash-bucket splits keep a row in its split when rows are added; seed 9 makes the bundled 905 rows
    # split 725/136/44, the closest to 80/15/5 among seeds 0-199
    split_seed: int = 9
    split_fractions: list = field(default_factory=lambda: [0.8, 0.15, 0.05])  # train, val, test
    filter_types: list = field(default_factory=list)  # keep rows having any of these types, e.g. [grass]
    filter_generations: list = field(default_factory=list)  # keep rows of these generations, e.g. [1, 2]
    skip_bad_images: bool = False  # False: a bad row raises naming the file; True: skipped and counted
    max_text_length: int = 32  # tokens (the design's 32; up to the encoder's limit)
    caption_dropout: float = 0.1  # probability a caption is replaced by "" (classifier-free guidance)
    # train on several short captions per sprite built from the metadata (pokediff/data/captions.py), one drawn
    # per step, instead of the single long `text` caption
    caption_variants: bool = False
    augment: bool = True  # train split only; val/test never augment
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    num_workers: int = 0
    cache_images: bool = True  # keep each decoded, resized sprite in memory (R x R x 4 bytes each, per worker)


@dataclass
class TextEncoderConfig:
    # all-MiniLM-L6-v2 ships in a pip package, so the default works offline; the design's
    # prajjwal1/bert-mini needs the hub.
    name: str = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class PerceptualConfig:
    backend: str = "auto"  # auto | lpips | stlpips ; auto = lpips if its backbone weights are present
    net: str = "alex"  # alex | vgg


@dataclass
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 8
    block_out_channels: list = field(default_factory=lambda: [64, 128, 256, 256])  # 3 downsamplings: 8x
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    decoder_cross_attention: bool = False
    cross_attention_dim: int = 384  # text encoder width, used only with decoder_cross_attention
    scaling_factor: float = 1.0  # replaced by 1/std of the latents after stage 1


@dataclass
class UNetConfig:
    block_out_channels: list = field(default_factory=lambda: [128, 256, 384])
    down_block_types: list = field(
        default_factory=lambda: ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    )
    up_block_types: list = field(default_factory=lambda: ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
    layers_per_block: int = 2
    attention_head_dim: int = 8
    cross_attention_dim: int = 256
    norm_num_groups: int = 32
    dropout: float = 0.0  # in every ResNet block while training (against overfitting a small set); off at sampling


@dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    inference_scheduler: str = "dpm"  # dpm | ddim | ddpm
    num_inference_steps: int = 25
    guidance_scale: float = 4.0


@dataclass
class RuntimeConfig:
    seed: int = 0
    output_dir: str = "outputs"
    experiment_name: str = "pokediff"
    mixed_precision: str = "auto"  # auto (bf16 on GPU, no on CPU) | no | fp16 | bf16
    gradient_accumulation_steps: int = 1
    allow_tf32: bool = True
    compile: bool = False
    channels_last: bool = False
    report_to: str = "tensorboard"  # tensorboard | none
    max_steps: Optional[int] = None  # cap every stage (smoke runs)
    checkpoint_every_steps: int = 500
    checkpoints_total_limit: int = 2
    sample_every_epochs: int = 5
    nan_max_consecutive: int = 20  # abort after this many non-finite batches in a row
    grad_explosion_factor: float = 10.0  # grad norm above factor x running median => adaptive clip
    # read loss / grad norm / NaN count to the host every N updates (1: every step, with the adaptive clip);
    # N > 1 keeps the GPU stream free of per-step syncs: non-finite steps are neutralised on the device
    sync_every_steps: int = 1
    cpu: bool = False
    # intra-op CPU threads per process; 0: on a CPU, the machine's cores shared among the processes (accelerate
    # launch alone would leave one thread). On 2 cores busy with other jobs, 1 beats 2 fighting over a barrier
    num_threads: int = 0


@dataclass
class Stage1Config:
    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 2e-4
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1  # OneCycleLR pct_start
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    perceptual_weight: float = 0.5
    kl_weight: float = 0.1  # final KL weight
    kl_anneal_epochs: int = 20  # linear 0 -> kl_weight
    free_bits: float = 0.5  # nats per latent element, averaged per channel (channels below it get no KL push)
    # store per-channel latent mean/std in the VAE config (diffusers' latents_mean/latents_std) so stage 2 sees
    # every channel at unit variance; false: one global scaling_factor as Stable Diffusion 1.x
    per_channel_latent_norm: bool = False
    num_sample_images: int = 8  # fixed val images in the reconstruction grids
    # PatchGAN hinge term on the reconstruction, as Stable Diffusion's VAE has (0: off). From
    # adversarial_start_step on, a discriminator learns real vs reconstruction and the VAE's loss gains
    # adversarial_weight * -mean(D(reconstruction)): L1 + perceptual alone settle on a blurry average
    adversarial_weight: float = 0.0
    adversarial_start_step: int = 0
    discriminator_learning_rate: float = 2e-4
    max_minutes: Optional[float] = None  # wall-time limit: stop, checkpoint and export; --resume latest continues


@dataclass
class Stage2Config:
    epochs: int = 300
    batch_size: int = 64
    learning_rate: float = 2e-4
    weight_decay: float = 1e-2
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0
    huber_delta: float = 1.0  # SmoothL1 beta
    min_snr_gamma: Optional[float] = None  # e.g. 5.0 enables Min-SNR weighting
    ema_decay: float = 0.999
    latent_clamp: float = 3.0
    cache_flips: bool = True
    # augmentation beyond the mirror: this many extra copies of the cached sprites (and mirrors), each moved by a
    # random whole-pixel offset of at most shift_pixels either way, encoded once (docs/experiments.md, "Chunk 5")
    cache_shifted_copies: int = 0
    shift_pixels: int = 3
    max_minutes: Optional[float] = None  # wall-time limit: stop, checkpoint and export; --resume latest continues
    # warm start: a U-Net folder (or a pipeline folder) of the same architecture whose weights start this run,
    # with a fresh optimizer and schedule (how a later working period continues from committed weights)
    init_from: Optional[str] = None
    sample_prompts: list = field(
        default_factory=lambda: [
            "A red fire type Pokémon with a four-legged body.",
            "A blue water type Pokémon with a fish-like body.",
            "A green grass type Pokémon with a bipedal body.",
            "A yellow electric type Pokémon with wings.",
        ]
    )
    sample_images_per_prompt: int = 2  # fixed noise per (prompt, image) for the progress grids / GIF


@dataclass
class ClipConfig:
    source: str = "auto"  # auto (pretrained open_clip if loadable, else domain CLIP) | pretrained | domain
    model: str = "ViT-B-32"
    pretrained: str = "laion2b_s34b_b79k"  # an open_clip tag or a local weights file
    domain_clip_path: Optional[str] = None  # reuse a fitted domain CLIP folder instead of fitting one
    domain_epochs: int = 30  # fitting the offline domain CLIP
    domain_batch_size: int = 64
    domain_learning_rate: float = 1e-3
    domain_weight_decay: float = 0.05
    domain_embed_dim: int = 256
    domain_hidden_dim: int = 512  # image projection MLP width
    domain_image_backbone: str = "alex"  # alex | vgg (ST-LPIPS ImageNet trunks, shipped in stlpips-pytorch)
    domain_image_size: int = 128  # sprites are resized to this for the image tower
    # Gaussian blur (sigma in pixels of the sprite) the image tower applies before its trunk, when fitted and when
    # scoring: a CLIP that cannot see fine texture must read colour and silhouette, and stage 3 cannot please it
    # with texture (README, "Stage 3, measured"); 0 = none
    domain_blur_sigma: float = 0.0
    min_top1_over_chance: float = 2.0  # domain CLIP must beat chance top-1 by this factor (0 disables)


@dataclass
class Stage3Config:
    # "reward": reward fine-tuning of the U-Net's text cross-attention (keys and values) through the sampler, ReFL /
    # DRaFT+ (pokediff/training/stage3_reward.py); "shape_guidance": fit a body-shape classifier that the pipeline
    # guides each sample with towards the shape its prompt names (pokediff/training/stage3_shape.py). The gate
    # below judges either.
    method: str = "reward"
    shape_guidance_scale: float = 40.0  # shape_guidance: the step on the clean-latent estimate per unit of gradient
    shape_classifier_epochs: int = 80  # shape_guidance: passes over the training sprites (~2 min on 2 cores)
    epochs: int = 1  # passes over the reward prompts (the training captions the gate does not judge on)
    batch_size: int = 8  # prompts per update: each is sampled to a random step, then one U-Net call with gradients
    learning_rate: float = 5e-5
    weight_decay: float = 0.0  # AdamW decays towards 0, not towards stage 2's weights: the KL term anchors instead
    warmup_fraction: float = 0.1  # OneCycleLR pct_start
    grad_clip: float = 1.0
    reward_weight: float = 0.1  # x the CLIP's log-probability of each sample's own caption among all training captions
    kl_weight: float = 1.0  # x mean squared difference to the frozen stage-2 U-Net's output on the same input
    denoise_weight: float = 1.0  # x stage 2's denoising loss on real latents
    denoise_batch_size: int = 16  # real latents per update for the denoising term
    reward_step_range: list = field(default_factory=lambda: [0.25, 0.75])  # where in the sampler's steps to score
    # what the CLIP scores: "step" = the clean-latent estimate at the step with gradients (ReFL: blurry early on);
    # "final" = the finished sample, the sampler run on past that step with the U-Net's input detached (DRTune):
    # the gradient reaches the trained step through the solver's own arithmetic
    reward_target: str = "step"
    # the captions the reward prompts with and tells apart: "visual" = what a picture can show ("a {colour} {type}
    # type pokémon {shape}"), "dataset" = the dataset caption (names and Pokédex text no picture shows)
    reward_captions: str = "visual"
    # what the U-Net reads while its sample is scored against the reward caption: "reward" = that caption itself,
    # "dataset" = the row's dataset caption (what the gate, pokediff.eval and most users' long prompts look like)
    reward_prompts: str = "reward"
    # what the reward tells a sample's caption apart from: "captions" = every other training caption; "shape" = the
    # same visual caption naming each other body shape (visual captions only): a reward for shape alone
    reward_negatives: str = "captions"
    max_minutes: Optional[float] = None  # wall-time limit: stop, checkpoint and export; --resume latest continues
    eval_num_prompts: int = 32  # val captions sampled for the before/after reward (trained against: the log only)
    # the gate (stage3_gate.py): stage 3's U-Net ships only if colour or body-shape agreement on this many training
    # captions goes up, neither goes down, and KID rises by at most gate_max_kid_increase; 0 keeps it unjudged
    gate_samples: int = 256
    gate_max_kid_increase: float = 0.05
    gate_alpha: float = 0.05  # "up"/"down": a one-sided sign test on the per-sample hits of both arms reaches this


@dataclass
class HubConfig:
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    private: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    clip: ClipConfig = field(default_factory=ClipConfig)
    stage3: Stage3Config = field(default_factory=Stage3Config)
    hub: HubConfig = field(default_factory=HubConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------- loading
def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_key(where: str, cls) -> ConfigError:
    valid = _field_names(cls)
    parent, _, key = where.rpartition(".")
    prefix = f"{parent}." if parent else ""
    close = difflib.get_close_matches(key, valid, n=1)
    hint = (
        f"; did you mean '{prefix}{close[0]}'?"
        if close
        else f"; valid keys under '{parent or '<root>'}': {', '.join(valid)}"
    )
    return ConfigError(f"unknown config key '{where}'{hint}")


def _resolve_type(cls, name: str):
    hints = typing.get_type_hints(cls)
    tp = hints[name]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(value: Any, tp, optional: bool, where: str):
    given = value
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{where}' cannot be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif tp is int:
        if isinstance(value, str):
            value = _float_from_text(value)  # `1e3` (YAML 1.1 text) is 1000
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, str):
            value = _float_from_text(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is list:
        if isinstance(value, (list, tuple)):
            # numbers inside lists (split_fractions: [8e-1, ...]) get the same YAML 1.1 fix
            return [_float_from_text(v) if isinstance(v, str) and _float_from_text(v) is not None else v for v in value]
    else:
        return value
    raise ConfigError(f"config key '{where}' expects {tp.__name__}, got {given!r}")


def _parse_command_line_value(value: "CommandLineValue", tp, optional: bool, where: str):
    if optional and value.lower() in ("null", "none", "~"):
        return None
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError as err:
        if tp is str:
            return str(value)
        raise ConfigError(f"config key '{where}': cannot parse value {str(value)!r}: {err}") from None
    if tp is str and not isinstance(parsed, str):
        return str(value)  # `no`, `123`, `1e-4` stay text; a quoted "x" is unquoted by YAML above
    return parsed


def _merge(obj, updates: dict, prefix: str = ""):
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {updates!r}")
    for key, value in updates.items():
        where = f"{prefix}{key}"
        if key not in _field_names(type(obj)):
            raise _unknown_key(where, type(obj))
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, prefix=f"{where}.")
        else:
            tp, optional = _resolve_type(type(obj), key)
            if isinstance(value, CommandLineValue):
                value = _parse_command_line_value(value, tp, optional, where)
            setattr(obj, key, _coerce(value, tp, optional, where))


def _read_yaml(path: Path, seen: tuple = ()) -> list[dict]:
    """The chain of mappings a YAML file stands for, base first."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config 'base' chain loops at {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("base", None)
    chain = []
    if base is not None:
        chain = _read_yaml((path.parent / base), seen + (path.resolve(),))
    return chain + [data]


class CommandLineValue(str):
    """The raw text of a ``key=value`` override: parsed as YAML, except for string-typed keys, which keep
    the text as typed (YAML would turn ``mixed_precision=no`` into the boolean False)."""


def parse_override(text: str) -> tuple[str, Any]:
    """``stage1.epochs=5`` -> ("stage1.epochs", CommandLineValue("5")), typed when merged."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. stage1.epochs=5)")
    key, raw = text.split("=", 1)
    return key.strip(), CommandLineValue(raw.strip())


def nest(dotted: dict) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}' conflicts with another override")
        node[parts[-1]] = value
    return out


def build_config(cls, path=None, overrides=None):
    """An instance of the dataclass ``cls`` from an optional YAML file, then overrides (later wins).

    ``overrides`` may be a list of ``key=value`` strings or a (dotted or nested) dict.
    """
    cfg = cls()
    if path is not None:
        for layer in _read_yaml(Path(path)):
            _merge(cfg, layer)
    if overrides:
        if isinstance(overrides, dict):
            layer = nest({k: v for k, v in overrides.items() if "." in k})
            layer.update({k: v for k, v in overrides.items() if "." not in k})
        else:
            layer = nest(dict(parse_override(o) for o in overrides))
        _merge(cfg, layer)
    return cfg


# ------------------------------------------------------------------------------------- validation
# Choices the consumers accept (tests/test_config.py checks these lists against pokediff.schedulers / perceptual).
PERCEPTUAL_BACKENDS = ("auto", "lpips", "stlpips")
PERCEPTUAL_NETS = ("alex", "vgg")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
PREDICTION_TYPES = ("epsilon", "v_prediction")
INFERENCE_SCHEDULER_NAMES = ("dpm", "ddim", "ddpm")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "none")
CLIP_SOURCES = ("auto", "pretrained", "domain")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ConfigChecker:
    """Range, choice and cross-field checks on a loaded config; the first failure raises a ``ConfigError``
    of the form ``<key>=<value>: <what is allowed>``."""

    def __init__(self, cfg):
        self.cfg = cfg

    def value(self, key: str):
        node = self.cfg
        for part in key.split("."):
            node = getattr(node, part)
        return node

    @staticmethod
    def fail(key: str, value, allowed: str):
        raise ConfigError(f"{key}={value!r}: {allowed}")

    def _each(self, keys, ok, allowed: str, optional: bool = False):
        for key in keys:
            value = self.value(key)
            if value is None and optional:
                continue
            if not ok(value):
                self.fail(key, value, allowed + (" (or null)" if optional else ""))

    def ints_at_least(self, low: int, *keys, optional: bool = False):
        self._each(keys, lambda v: isinstance(v, int) and v >= low, f"must be an integer >= {low}", optional)

    def positive(self, *keys, optional: bool = False):
        self._each(
            keys, lambda v: _is_number(v) and math.isfinite(v) and v > 0, "must be a finite number > 0", optional
        )

    def non_negative(self, *keys):
        self._each(keys, lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "must be a finite number >= 0")

    def at_least_one(self, *keys):
        self._each(keys, lambda v: _is_number(v) and math.isfinite(v) and v >= 1, "must be a finite number >= 1")

    def fraction(self, *keys, low_open: bool = False, high_open: bool = False, optional: bool = False):
        def ok(v):
            return _is_number(v) and (0 < v if low_open else 0 <= v) and (v < 1 if high_open else v <= 1)

        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        self._each(keys, ok, f"must be a number in {interval}", optional)

    def choice(self, key: str, options):
        if self.value(key) not in options:
            self.fail(key, self.value(key), f"must be one of {', '.join(options)}")

    def non_empty_text(self, *keys):
        self._each(keys, lambda v: isinstance(v, str) and v.strip() != "", "must be a non-empty string")

    def finite_floats(self, node=None, prefix: str = ""):
        """Every float anywhere in the config is finite (nan/inf are never a meaningful setting)."""
        node = self.cfg if node is None else node
        for f in dataclasses.fields(node):
            value, key = getattr(node, f.name), f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                self.finite_floats(value, f"{key}.")
            elif isinstance(value, float) and not math.isfinite(value):
                self.fail(key, value, "must be a finite number")
            elif isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
                self.fail(key, value, "must hold finite numbers only")

    def channels(self, section: str):
        channels, groups = self.value(f"{section}.block_out_channels"), self.value(f"{section}.norm_num_groups")
        if not channels or not all(isinstance(c, int) and c >= 1 and c % groups == 0 for c in channels):
            self.fail(
                f"{section}.block_out_channels",
                channels,
                f"must be a non-empty list of integers >= 1, each divisible by {section}.norm_num_groups={groups}",
            )


def _check_data(c: ConfigChecker) -> None:
    c.ints_at_least(1, "data.resolution", "data.max_text_length")
    c.ints_at_least(0, "data.num_workers")
    c.non_empty_text("data.root", "data.image_column", "data.caption_column")
    background = c.value("data.background")
    if len(background) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in background):
        c.fail("data.background", background, "must be three integers in [0, 255] (R, G, B)")
    fractions = c.value("data.split_fractions")
    if (
        len(fractions) != 3
        or not all(_is_number(v) and 0 <= v <= 1 for v in fractions)
        or abs(sum(fractions) - 1.0) > 1e-6
    ):
        c.fail("data.split_fractions", fractions, "must be three numbers in [0, 1] summing to 1 (train, val, test)")
    generations = c.value("data.filter_generations")
    if not all(isinstance(g, int) and g >= 1 for g in generations):
        c.fail("data.filter_generations", generations, "must be a list of integers >= 1, e.g. [1, 2]")
    if not all(isinstance(t, str) and t.strip() for t in c.value("data.filter_types")):
        c.fail("data.filter_types", c.value("data.filter_types"), "must be a list of type names, e.g. [grass]")
    c.fraction("data.caption_dropout", "data.augmentation.hflip")
    c.non_negative("data.augmentation.rotation")
    jitter = c.value("data.augmentation.color_jitter")
    if len(jitter) != 4 or not all(_is_number(v) and v >= 0 for v in jitter) or (len(jitter) == 4 and jitter[3] > 0.5):
        c.fail(
            "data.augmentation.color_jitter",
            jitter,
            "must be four numbers >= 0 (brightness, contrast, saturation, hue <= 0.5)",
        )


def _check_models(c: ConfigChecker) -> None:
    c.non_empty_text("text_encoder.name")
    c.choice("perceptual.backend", PERCEPTUAL_BACKENDS)
    c.choice("perceptual.net", PERCEPTUAL_NETS)
    if c.value("vae.in_channels") != 3:
        c.fail("vae.in_channels", c.value("vae.in_channels"), "must be 3 (sprites are composited to RGB)")
    c.ints_at_least(
        1,
        "vae.latent_channels",
        "vae.layers_per_block",
        "vae.norm_num_groups",
        "vae.cross_attention_dim",
        "unet.layers_per_block",
        "unet.attention_head_dim",
        "unet.cross_attention_dim",
        "unet.norm_num_groups",
    )
    c.positive("vae.scaling_factor")
    c.fraction("unet.dropout", high_open=True)
    c.channels("vae")
    c.channels("unet")
    channels = c.value("unet.block_out_channels")
    for key in ("unet.down_block_types", "unet.up_block_types"):
        if len(c.value(key)) != len(channels):
            c.fail(key, c.value(key), f"must name one block per unet.block_out_channels entry ({len(channels)})")
    if not any("CrossAttn" in b for b in c.value("unet.down_block_types") + c.value("unet.up_block_types")):
        c.fail(
            "unet.down_block_types",
            c.value("unet.down_block_types"),
            "needs a CrossAttn block (here or in unet.up_block_types), or the text is ignored",
        )
    c.ints_at_least(1, "scheduler.num_train_timesteps", "scheduler.num_inference_steps")
    c.choice("scheduler.beta_schedule", BETA_SCHEDULES)
    c.choice("scheduler.prediction_type", PREDICTION_TYPES)
    c.choice("scheduler.inference_scheduler", INFERENCE_SCHEDULER_NAMES)
    c.at_least_one("scheduler.guidance_scale")


def _check_runtime(c: ConfigChecker) -> None:
    c.choice("runtime.mixed_precision", MIXED_PRECISIONS)
    c.choice("runtime.report_to", REPORT_TO)
    c.non_empty_text("runtime.output_dir", "runtime.experiment_name")
    c.ints_at_least(
        1,
        "runtime.gradient_accumulation_steps",
        "runtime.checkpoint_every_steps",
        "runtime.checkpoints_total_limit",
        "runtime.sample_every_epochs",
        "runtime.nan_max_consecutive",
        "runtime.sync_every_steps",
    )
    c.ints_at_least(1, "runtime.max_steps", optional=True)
    c.at_least_one("runtime.grad_explosion_factor")
    c.ints_at_least(0, "runtime.num_threads")


def _check_stages(c: ConfigChecker) -> None:
    for stage in ("stage1", "stage2", "stage3"):
        c.ints_at_least(1, f"{stage}.epochs", f"{stage}.batch_size")
        c.positive(f"{stage}.learning_rate", f"{stage}.grad_clip")
        c.non_negative(f"{stage}.weight_decay")
        c.fraction(f"{stage}.warmup_fraction", low_open=True, high_open=True)  # OneCycleLR's pct_start
    c.non_negative("stage1.l1_weight", "stage1.perceptual_weight", "stage1.kl_weight", "stage1.free_bits")
    c.ints_at_least(0, "stage1.kl_anneal_epochs", "stage1.adversarial_start_step")
    c.non_negative("stage1.adversarial_weight")
    c.positive("stage1.discriminator_learning_rate")
    c.ints_at_least(1, "stage1.num_sample_images", "stage2.sample_images_per_prompt", "stage3.eval_num_prompts")
    c.ints_at_least(0, "stage3.gate_samples")
    c.positive("stage1.max_minutes", "stage2.max_minutes", optional=True)
    if c.value("stage1.l1_weight") + c.value("stage1.perceptual_weight") == 0:
        c.fail(
            "stage1.l1_weight",
            c.value("stage1.l1_weight"),
            "must be > 0 when stage1.perceptual_weight is 0 (nothing would teach reconstruction)",
        )
    c.positive("stage2.huber_delta", "stage2.latent_clamp")
    c.positive("stage2.min_snr_gamma", optional=True)
    c.fraction("stage2.ema_decay", high_open=True)
    c.ints_at_least(0, "stage2.cache_shifted_copies")
    c.ints_at_least(1, "stage2.shift_pixels")
    prompts = c.value("stage2.sample_prompts")
    if not prompts or not all(isinstance(p, str) for p in prompts):
        c.fail("stage2.sample_prompts", prompts, "must be a non-empty list of prompts")
    c.choice("clip.source", CLIP_SOURCES)
    c.non_empty_text("clip.model", "clip.pretrained")
    c.ints_at_least(
        1,
        "clip.domain_epochs",
        "clip.domain_batch_size",
        "clip.domain_embed_dim",
        "clip.domain_hidden_dim",
        "clip.domain_image_size",
    )
    c.positive("clip.domain_learning_rate")
    c.non_negative("clip.domain_weight_decay", "clip.min_top1_over_chance", "clip.domain_blur_sigma")
    c.choice("clip.domain_image_backbone", PERCEPTUAL_NETS)
    c.non_negative("stage3.reward_weight", "stage3.kl_weight", "stage3.denoise_weight", "stage3.gate_max_kid_increase")
    if c.value("stage3.reward_weight") == 0:
        c.fail("stage3.reward_weight", c.value("stage3.reward_weight"), "must be > 0 (stage 3 would learn no reward)")
    c.ints_at_least(1, "stage3.denoise_batch_size")
    c.choice("stage3.reward_captions", ("visual", "dataset"))
    c.choice("stage3.reward_target", ("step", "final"))
    c.choice("stage3.reward_prompts", ("reward", "dataset"))
    c.choice("stage3.reward_negatives", ("captions", "shape"))
    c.choice("stage3.method", ("reward", "shape_guidance"))
    c.positive("stage3.shape_guidance_scale")
    c.ints_at_least(1, "stage3.shape_classifier_epochs")
    if c.value("stage3.reward_negatives") == "shape" and c.value("stage3.reward_captions") != "visual":
        c.fail("stage3.reward_negatives", "shape", "needs stage3.reward_captions=visual (captions that name a shape)")
    c.positive("stage3.max_minutes", optional=True)
    c.fraction("stage3.gate_alpha", low_open=True, high_open=True)
    steps = c.value("stage3.reward_step_range")
    if not (
        isinstance(steps, (list, tuple))
        and len(steps) == 2
        and all(_is_number(v) and 0 <= v <= 1 for v in steps)
        and steps[0] <= steps[1]
    ):
        c.fail(
            "stage3.reward_step_range", steps, "must be [low, high] with 0 <= low <= high <= 1 (fractions of the steps)"
        )


def validate_config(cfg: Config) -> Config:
    """Check every range, choice and cross-field rule once, before any work; raise ``ConfigError`` naming the
    key, its value and what is allowed (e.g. ``stage1.learning_rate=-0.001: must be a finite number > 0``)."""
    checker = ConfigChecker(cfg)
    for check in (_check_data, _check_models, _check_runtime, _check_stages):
        check(checker)
    checker.finite_floats()
    return cfg


def load_config(path=None, overrides=None) -> Config:
    return validate_config(build_config(Config, path, overrides))


def config_from_dict(cls, data: dict):
    cfg = cls()
    _merge(cfg, data)
    return cfg


def save_config(cfg, path) -> None:
    """Write the resolved config as YAML, atomically."""
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
