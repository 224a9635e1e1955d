"""Checked before any work: --dry-run of both training CLIs, empty splits, and bad values as one `error:` line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import text_encoder_dir  # noqa: F401  (session fixture)
from test_training_cli import tiny_args

import train_3stage
from pokediff.config import ConfigError
from pokediff.data import load_splits
from pokediff.gan import train as gan_train
from pokediff.gan.config import GAN_CONFIG_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_train_3stage_dry_run_prints_the_plan_and_writes_nothing(tiny_data_root, text_encoder_dir, tmp_path, capsys):
    out = tmp_path / "out"
    result = train_3stage.main(
        [
            "--dry-run",
            "--config",
            str(REPO_ROOT / "configs" / "tiny.yaml"),
            *tiny_args(tiny_data_root, text_encoder_dir, out, perceptual=True, **{"runtime.checkpoint_every_steps": 2}),
        ]
    )
    printed = capsys.readouterr().out
    plan = result["plan"]
    n_train = plan["data"]["train"]
    assert sum(plan["data"].values()) == 24 and n_train > 4
    s1, s2, s3 = plan["stages"]["1"], plan["stages"]["2"], plan["stages"]["3"]
    # stage 1 batches images (drop_last); stages 2-3 batches cached latents and their mirror images
    assert (s1["steps_per_epoch"], s1["total_steps"], s1["batch_size"]) == (n_train // 4, n_train // 4, 4)
    assert (s2["steps_per_epoch"], s2["total_steps"]) == (2 * n_train // 4, 2 * n_train // 4)
    assert s1["checkpoints_written"] == -(-s1["total_steps"] // 2)
    assert s1["models"]["vae"][0] > 0 and s2["models"]["unet"][0] > 0
    # stage 3 trains the U-Net's text cross-attention K/V only, on the captions the gate does not judge on
    assert 0 < s3["models"]["unet"][1] < s3["models"]["unet"][0] == s2["models"]["unet"][0]
    assert s3["examples"] == n_train - 4 and s3["total_steps"] == (n_train - 4) // 4
    assert any(name.startswith("perceptual (stlpips") or name.startswith("perceptual (lpips") for name in s1["models"])
    for line in (
        "stage 1 (VAE):",
        "stage 2 (U-Net):",
        "stage 3 (U-Net text cross-attention):",
        "gate: kept only if colour or shape agreement on 4 training captions",
        f"1 epochs x {n_train // 4} steps per epoch = {n_train // 4} optimizer steps, batch size 4",
        "checkpoint every 2 steps and at the end",
        "dry run: nothing trained, nothing written",
    ):
        assert line in printed, line
    assert not out.exists()


def test_dry_run_with_max_steps_and_one_stage(tiny_data_root, text_encoder_dir, tmp_path, capsys):
    result = train_3stage.main(
        ["--dry-run", "--stage", "1", "--max-steps", "3", *tiny_args(tiny_data_root, text_encoder_dir, tmp_path)]
    )
    assert list(result["plan"]["stages"]) == ["1"] and result["plan"]["stages"]["1"]["total_steps"] == 3
    assert "= 3 optimizer steps" in capsys.readouterr().out
    # stage 2 alone needs stage 1's VAE: the dry run says so instead of a real run failing later
    with pytest.raises(FileNotFoundError, match="the stage-1 VAE not found at .*nope.*--vae-checkpoint"):
        train_3stage.main(
            [
                "--dry-run",
                "--stage",
                "2",
                "--vae-checkpoint",
                str(tmp_path / "nope"),
                *tiny_args(tiny_data_root, text_encoder_dir, tmp_path),
            ]
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"data.filter_types": ["dragon"]},
            "no rows left after filtering with data.filter_types=['dragon'], data.filter_generations=[]: widen the filters",
        ),
        (
            {"data.split_fractions": [1.0, 0.0, 0.0]},
            "the 'val' split is empty (train 24, val 0, test 0 rows) with data.filter_types=[], "
            "data.filter_generations=[] and data.split_fractions=[1.0, 0.0, 0.0]: widen the filters or change the fractions",
        ),
    ],
)
def test_an_empty_split_fails_at_data_load_naming_the_filters(tiny_data_root, overrides, message):
    from pokediff.config import load_config

    cfg = load_config(overrides={"data.root": str(tiny_data_root), **overrides})
    with pytest.raises(ConfigError) as err:
        load_splits(cfg.data, require=("train", "val"))
    assert str(err.value) == message


def test_gan_dry_run_prints_the_plan_and_writes_nothing(tiny_data_root, tmp_path, capsys):
    gan_train.main(
        [
            "--model",
            "dcgan",
            "--config",
            str(GAN_CONFIG_DIR / "tiny.yaml"),
            "--output-dir",
            str(tmp_path),
            "--dry-run",
            f"data.root={tiny_data_root}",
            "data.filter_generations=[]",
            "train.lr_g=5e-5",
            "train.max_steps=null",
            "train.epochs=2",
            "train.batch_size=4",
        ]
    )
    printed = capsys.readouterr().out
    n_train = len(load_splits(gan_train.load_gan_config(overrides={"data.root": str(tiny_data_root)}).data)["train"])
    assert f"data: {n_train} training images, batch size 4" in printed
    assert f"{n_train // 4} generator steps per epoch, {2 * (n_train // 4)} generator steps in total" in printed
    assert "dcgan: generator " in printed and "dry run: nothing trained, nothing written" in printed
    # the tiny config caps at 20 steps, but one epoch ends first: training stops at whichever comes first
    gan_train.main(
        [
            "--model",
            "dcgan",
            "--config",
            str(GAN_CONFIG_DIR / "tiny.yaml"),
            "--output-dir",
            str(tmp_path),
            "--dry-run",
            f"data.root={tiny_data_root}",
            "data.filter_generations=[]",
            "train.batch_size=4",
        ]
    )
    assert f"{n_train // 4} generator steps in total" in capsys.readouterr().out and n_train // 4 < 20
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        # flags are checked as flags (naming the flag the user typed), keys as keys
        (["--lr", "-1"], "error: --lr must be a finite number > 0, got -1.0"),
        (["--lr-d", "nan"], "error: --lr-d must be a finite number > 0, got nan"),
        (["train.lr_g=-1"], "error: train.lr_g=-1.0: must be a finite number > 0"),
        (["train.lr_d=nan"], "error: train.lr_d=nan: must be a finite number > 0"),
        (["model.latent_dim=0"], "error: model.latent_dim=0: must be an integer >= 1"),
        (["--max-steps", "0"], "error: --max-steps must be >= 1 (generator steps in total), got 0"),
        (["--max-minutes", "0"], "error: --max-minutes must be a finite number > 0, got 0.0"),
        (["train.max_steps=0"], "error: train.max_steps=0: must be an integer >= 1 (or null)"),
        (["train.max_minutes=0"], "error: train.max_minutes=0.0: must be a finite number > 0 (or null)"),
        (["train.batch_size=100"], "error: train.batch_size=100: larger than the training split"),
    ],
)
def test_gan_bad_values_are_one_error_line(tiny_data_root, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        gan_train.main(
            [
                "--model",
                "dcgan",
                "--config",
                str(GAN_CONFIG_DIR / "tiny.yaml"),
                "--output-dir",
                str(tmp_path),
                "--dry-run",
                f"data.root={tiny_data_root}",
                "data.filter_generations=[]",
                *args,
            ]
        )
    assert exit_.value.code == 2
    # datasets may draw its loading progress bar first (cold cache); ours is the one error line, last
    errors = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), errors
    assert list(tmp_path.iterdir()) == []


def test_train_3stage_bad_value_is_one_error_line_before_any_work(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "train_3stage.py"),
            "--config",
            str(REPO_ROOT / "configs" / "tiny.yaml"),
            "--output-dir",
            str(tmp_path),
            "stage1.learning_rate=-0.001",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: stage1.learning_rate=-0.001: must be a finite number > 0"]
    assert list(tmp_path.iterdir()) == []
