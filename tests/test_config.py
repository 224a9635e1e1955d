import pytest
import yaml

from pokediff.config import CONFIG_DIR, Config, ConfigError, load_config, save_config


def test_defaults_and_yaml_files_load():
    default = load_config(CONFIG_DIR / "default.yaml")
    tiny = load_config(CONFIG_DIR / "tiny.yaml")
    assert isinstance(default, Config)
    assert default.data.resolution == 215 and default.vae.latent_channels == 8
    # tiny inherits from default through `base:` and overrides model sizes
    assert tiny.data.resolution == default.data.resolution
    assert tiny.unet.block_out_channels != default.unet.block_out_channels


def test_cli_overrides_win_and_are_typed():
    cfg = load_config(
        CONFIG_DIR / "tiny.yaml", ["stage1.epochs=7", "data.background=[0, 0, 0]", "stage2.min_snr_gamma=5"]
    )
    assert cfg.stage1.epochs == 7
    assert cfg.data.background == [0, 0, 0]
    assert cfg.stage2.min_snr_gamma == 5.0 and isinstance(cfg.stage2.min_snr_gamma, float)
    cfg = load_config(overrides={"runtime.seed": 3, "data": {"trim": True}})
    assert cfg.runtime.seed == 3 and cfg.data.trim is True


def test_string_keys_keep_the_typed_text():
    # YAML alone would read `no` as the boolean False and `null` as None
    cfg = load_config(overrides=["runtime.mixed_precision=no", "text_encoder.name=yes", "stage2.min_snr_gamma=null"])
    assert cfg.runtime.mixed_precision == "no" and cfg.text_encoder.name == "yes"
    assert load_config(overrides=['text_encoder.name="/a b/c"']).text_encoder.name == "/a b/c"
    assert cfg.stage2.min_snr_gamma is None
    with pytest.raises(ConfigError, match="'runtime.seed' cannot be null"):
        load_config(overrides=["runtime.seed=null"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage1.epoch=5", "unknown config key 'stage1.epoch'; did you mean 'stage1.epochs'?"),
        ("stag1.epochs=5", "did you mean 'stage1'?"),
        ("data.augmentation.hflp=1", "did you mean 'data.augmentation.hflip'?"),
        ("stage1.epochs=abc", "'stage1.epochs' expects int"),
        ("stage1.epochs", "must look like key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("[", r"\[")):
        load_config(CONFIG_DIR / "default.yaml", [override])


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: " + str(CONFIG_DIR / "default.yaml") + "\nvae:\n  latent_chanels: 4\n")
    with pytest.raises(ConfigError, match="vae.latent_channels"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIG_DIR / "tiny.yaml", ["stage2.epochs=11"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    data = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert data["stage2"]["epochs"] == 11
    assert load_config(tmp_path / "run" / "config.yaml") == cfg


# ------------------------------------------------------------------------------ validation at load
@pytest.mark.parametrize(
    "override, message",
    [
        ("stage1.learning_rate=-0.001", "stage1.learning_rate=-0.001: must be a finite number > 0"),
        ("runtime.num_threads=-1", "runtime.num_threads=-1: must be an integer >= 0"),
        ("stage3.kl_weight=-1", "stage3.kl_weight=-1.0: must be a finite number >= 0"),
        ("stage3.learning_rate=0", "stage3.learning_rate=0.0: must be a finite number > 0"),
        ("stage2.epochs=0", "stage2.epochs=0: must be an integer >= 1"),
        ("stage1.batch_size=-4", "stage1.batch_size=-4: must be an integer >= 1"),
        ("data.resolution=0", "data.resolution=0: must be an integer >= 1"),
        ("data.caption_dropout=1.5", "data.caption_dropout=1.5: must be a number in [0, 1]"),
        ("stage2.warmup_fraction=0", "stage2.warmup_fraction=0.0: must be a number in (0, 1)"),
        (
            "stage3.reward_step_range=[0.8, 0.2]",
            "stage3.reward_step_range=[0.8, 0.2]: must be [low, high] with 0 <= low <= high <= 1 (fractions of the "
            "steps)",
        ),
        (
            "data.split_fractions=[0.8, 0.15, 0.15]",
            "data.split_fractions=[0.8, 0.15, 0.15]: must be three numbers in [0, 1] summing to 1 (train, val, test)",
        ),
        ("clip.source=openai", "clip.source='openai': must be one of auto, pretrained, domain"),
        ("stage3.reward_target=end", "stage3.reward_target='end': must be one of step, final"),
        ("stage3.reward_prompts=visual", "stage3.reward_prompts='visual': must be one of reward, dataset"),
        ("stage3.reward_negatives=body", "stage3.reward_negatives='body': must be one of captions, shape"),
        (
            "scheduler.prediction_type=sample",
            "scheduler.prediction_type='sample': must be one of epsilon, v_prediction",
        ),
        (
            "scheduler.beta_schedule=cosine",
            "scheduler.beta_schedule='cosine': must be one of linear, scaled_linear, squaredcos_cap_v2, sigmoid, laplace",
        ),
        (
            "scheduler.inference_scheduler=euler",
            "scheduler.inference_scheduler='euler': must be one of dpm, ddim, ddpm",
        ),
        ("perceptual.backend=vgg", "perceptual.backend='vgg': must be one of auto, lpips, stlpips"),
        ("runtime.checkpoint_every_steps=0", "runtime.checkpoint_every_steps=0: must be an integer >= 1"),
        ("runtime.max_steps=0", "runtime.max_steps=0: must be an integer >= 1 (or null)"),
        ("runtime.mixed_precision=fp8", "runtime.mixed_precision='fp8': must be one of auto, no, fp16, bf16"),
        ("stage1.kl_weight=-0.1", "stage1.kl_weight=-0.1: must be a finite number >= 0"),
        ("stage1.adversarial_weight=-0.1", "stage1.adversarial_weight=-0.1: must be a finite number >= 0"),
        ("stage1.adversarial_start_step=-5", "stage1.adversarial_start_step=-5: must be an integer >= 0"),
        (
            "stage1.discriminator_learning_rate=0",
            "stage1.discriminator_learning_rate=0.0: must be a finite number > 0",
        ),
        ("scheduler.guidance_scale=0.5", "scheduler.guidance_scale=0.5: must be a finite number >= 1"),
        ("stage2.ema_decay=1", "stage2.ema_decay=1.0: must be a number in [0, 1)"),
        ("stage2.cache_shifted_copies=-1", "stage2.cache_shifted_copies=-1: must be an integer >= 0"),
        ("stage2.shift_pixels=0", "stage2.shift_pixels=0: must be an integer >= 1"),
        ("unet.dropout=1", "unet.dropout=1.0: must be a number in [0, 1)"),
        ("data.background=[255, 255]", "data.background=[255, 255]: must be three integers in [0, 255] (R, G, B)"),
        (
            "unet.block_out_channels=[32, 64]",
            "unet.down_block_types=['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D']: must name one block "
            "per unet.block_out_channels entry (2)",
        ),
        (
            "vae.block_out_channels=[16, 24]",
            "vae.block_out_channels=[16, 24]: must be a non-empty list of integers >= 1, each divisible by "
            "vae.norm_num_groups=32",
        ),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG_DIR / "default.yaml", [override])
    assert str(err.value) == message


def test_cross_field_rules():
    with pytest.raises(ConfigError, match=r"^stage3.reward_weight=0.0: must be > 0 \(stage 3 would learn no reward\)"):
        load_config(overrides={"stage3.reward_weight": 0.0})
    with pytest.raises(ConfigError, match=r"reward_negatives='shape': needs stage3.reward_captions=visual"):
        load_config(overrides={"stage3.reward_negatives": "shape", "stage3.reward_captions": "dataset"})
    with pytest.raises(ConfigError, match=r"^stage1.l1_weight=0.0: must be > 0 when stage1.perceptual_weight is 0"):
        load_config(overrides={"stage1.l1_weight": 0.0, "stage1.perceptual_weight": 0.0})


def test_a_bad_value_in_a_yaml_file_is_caught_at_load(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(f"base: {CONFIG_DIR / 'tiny.yaml'}\nstage2:\n  learning_rate: -2.0e-4\n")
    with pytest.raises(ConfigError, match=r"^stage2.learning_rate=-0.0002: must be a finite number > 0$"):
        load_config(path)


def test_the_choices_are_the_ones_the_code_accepts():
    from diffusers import DDPMScheduler

    from pokediff import config
    from pokediff.models import perceptual
    from pokediff.schedulers import INFERENCE_SCHEDULERS

    assert config.PERCEPTUAL_BACKENDS == perceptual.BACKENDS and config.PERCEPTUAL_NETS == perceptual.NETS
    assert config.INFERENCE_SCHEDULER_NAMES == tuple(INFERENCE_SCHEDULERS)
    for schedule in config.BETA_SCHEDULES:
        DDPMScheduler(beta_schedule=schedule)
    with pytest.raises(NotImplementedError):
        DDPMScheduler(beta_schedule="cosine")


# ------------------------------------------------------------------------- numbers spelled as usual
@pytest.mark.parametrize(
    "text, value",
    [("1e-4", 1e-4), ("1E-4", 1e-4), ("5e-5", 5e-5), ("1e10", 1e10), ("2.0e-4", 2e-4), (".5", 0.5), ("3", 3.0)],
)
def test_exponent_floats_parse_on_the_command_line_and_in_yaml(tmp_path, text, value):
    cfg = load_config(overrides=[f"stage1.learning_rate={text}"])
    assert cfg.stage1.learning_rate == value and isinstance(cfg.stage1.learning_rate, float)
    path = tmp_path / "c.yaml"
    path.write_text(f"stage1:\n  learning_rate: {text}\ndata:\n  split_fractions: [8e-1, 1.5e-1, 5E-2]\n")
    cfg = load_config(path)
    assert cfg.stage1.learning_rate == value and cfg.data.split_fractions == [0.8, 0.15, 0.05]


def test_exponent_integers_and_gan_floats():
    from pokediff.gan.config import load_gan_config

    assert load_config(overrides=["stage2.epochs=1e2"]).stage2.epochs == 100
    with pytest.raises(ConfigError, match="'stage2.epochs' expects int, got '1.5e0'"):
        load_config(overrides=["stage2.epochs=1.5e0"])
    gan = load_gan_config(overrides=["train.lr_g=5e-5", "train.lr_d=1E-4"])
    assert (gan.train.lr_g, gan.train.lr_d) == (5e-5, 1e-4)


@pytest.mark.parametrize("text", [".nan", "nan", "NaN", ".inf", "inf", "-.inf", "-inf", ".Inf"])
def test_nan_and_inf_are_refused_naming_the_key(text):
    value = repr(float(text.replace(".", "")))
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"stage1.learning_rate={text}"])
    assert str(err.value) == f"stage1.learning_rate={value}: must be a finite number > 0"
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"stage2.min_snr_gamma={text}"])
    assert str(err.value) == f"stage2.min_snr_gamma={value}: must be a finite number > 0 (or null)"
    with pytest.raises(ConfigError, match=r"^vae.scaling_factor="):
        load_config(overrides=[f"vae.scaling_factor={text}"])
