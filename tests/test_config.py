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
    cfg = load_config(CONFIG_DIR / "tiny.yaml", ["stage1.epochs=7", "data.background=[0, 0, 0]", "stage2.min_snr_gamma=5"])
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
