"""GAN training step, checkpoints/resume, sampling API and the CLIs (tiny sizes, CPU)."""

import csv
import json
import math

import pytest
import torch

from pokediff.config import ConfigError
from pokediff.gan import generate as gan_generate
from pokediff.gan import is_gan_checkpoint, make_gifs, plot_losses
from pokediff.gan import train as gan_train
from pokediff.gan.config import GAN_CONFIG_DIR, load_gan_config
from pokediff.gan.generate import sample_from_checkpoint
from pokediff.gan.trainer import GanTrainer

TINY = {
    "model.g_features": 4,
    "model.d_features": 4,
    "model.g_max_features": 16,
    "model.d_max_features": 16,
    "model.latent_dim": 8,
    "model.attention_resolution": 8,
    "model.resolution": 16,
    "progan.resolutions": [8, 16],
    "train.batch_size": 4,
    "train.n_critic": 1,
}
PER_MODEL = {
    "dcgan": {"train.loss": "bce"},
    "cdcgan": {"train.loss": "bce"},
    "wgan_small": {"train.loss": "wgan", "train.lambda_gp": 10.0},
    "wgan_large": {"train.loss": "wgan", "train.lambda_gp": 10.0, "train.ema_decay": 0.9},
    "progan": {"train.loss": "wgan", "train.lambda_gp": 10.0, "train.drift": 0.001, "progan.steps_per_stage": 1},
    "vitgan": {
        "train.loss": "bce",
        "model.patch_size": 4,
        "train.ema_decay": 0.9,
        "train.diff_augment": "color,translation,cutout",
    },
}
N_PLUS_ONE = {"train.loss": "bce", "model.discriminator": "n_plus_one"}
SCHEDULE = {"progan.schedule": [[8, 1, 1e-3], [16, 2, 5e-4], [8, 1, 2e-3]], "progan.fade_in": 0.5}


def tiny_trainer(name, **extra):
    cfg = load_gan_config(overrides={**TINY, **PER_MODEL[name], "model.name": name, **extra})
    return GanTrainer(cfg)


def batches(resolution=16, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lambda: (
        torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1,
        torch.randint(0, 18, (batch,), generator=g),
    )


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before, model):
    return any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if v.is_floating_point())


@pytest.mark.parametrize("name", list(PER_MODEL))
def test_one_step_gives_finite_losses_and_moves_both_networks(name):
    trainer = tiny_trainer(name)
    g_before, d_before = snapshot(trainer.generator), snapshot(trainer.discriminator)
    metrics = trainer.train_step(batches())
    for key in ("d_loss", "g_loss", "gp", "d_grad_norm", "g_grad_norm"):
        assert torch.isfinite(torch.tensor(metrics[key])), (key, metrics)
    assert metrics["skipped"] == 0 and trainer.step == 1
    assert changed(g_before, trainer.generator) and changed(d_before, trainer.discriminator)
    if PER_MODEL[name].get("train.lambda_gp"):
        assert metrics["gp"] > 0
    if name in ("wgan_large", "vitgan"):
        assert trainer.ema.num_updates == 1


def test_n_plus_one_step_trains_both_networks_with_the_classification_losses():
    trainer = tiny_trainer("cdcgan", **N_PLUS_ONE, **{"train.label_smoothing": True, "train.lambda_gp": 1.0})
    g_before, d_before = snapshot(trainer.generator), snapshot(trainer.discriminator)
    metrics = trainer.train_step(batches())
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("d_loss", "g_loss", "gp", "d_real", "d_fake"))
    assert metrics["gp"] > 0 and metrics["skipped"] == 0
    assert changed(g_before, trainer.generator) and changed(d_before, trainer.discriminator)
    # an untrained 19-way classifier: each cross-entropy term starts near ln 19
    plain = tiny_trainer("cdcgan", **N_PLUS_ONE).train_step(batches())
    assert plain["d_loss"] == pytest.approx(2 * math.log(19), rel=0.1)
    assert plain["g_loss"] == pytest.approx(math.log(19), rel=0.1)


def test_every_dcgan_trick_runs_in_one_step():
    trainer = tiny_trainer(
        "dcgan",
        **{
            "train.label_smoothing": True,
            "train.label_flip_prob": 0.05,
            "model.g_dropout": 0.2,
            "train.feature_matching": 1.0,
            "train.lambda_gp": 1.0,
            "train.grad_clip": 1.0,
            "train.n_critic": 3,
            "train.diff_augment": "color,translation,cutout",
        },
    )
    calls = []
    source = batches()
    metrics = trainer.train_step(lambda: calls.append(1) or source())
    assert len(calls) == 3  # one fresh real batch per discriminator step
    assert metrics["fm_loss"] > 0 and metrics["gp"] > 0
    # clipping bounds the update: the norm reported is the pre-clip norm, the weights moved anyway
    assert torch.isfinite(torch.tensor(metrics["g_grad_norm"]))


def test_progan_step_follows_the_stage_schedule():
    trainer = tiny_trainer("progan", **{"progan.steps_per_stage": 2, "progan.fade_in": 0.5})
    seen = [trainer.train_step(batches())["resolution"] for _ in range(3)]
    assert seen == [8, 8, 16]
    assert trainer.train_step(batches())["alpha"] == 1.0  # faded in after half a stage (1 step)
    assert trainer.generate(trainer.sample_noise(2)).shape == (2, 3, 16, 16)


def test_progan_schedule_visits_its_phases_in_order_with_their_learning_rates():
    trainer = tiny_trainer("progan", **SCHEDULE, **{"progan.cycle": True})
    trainer.steps_per_epoch = 2  # phases of 2, 4 and 2 steps
    seen = []
    for _ in range(10):
        metrics = trainer.train_step(batches())
        seen.append((metrics["resolution"], metrics["alpha"], trainer.opt_g.param_groups[0]["lr"]))
        assert trainer.opt_d.param_groups[0]["lr"] == seen[-1][2]
    assert seen == [
        (8, 1.0, 1e-3),
        (8, 1.0, 1e-3),  # phase 0
        (16, 0.0, 5e-4),
        (16, 0.5, 5e-4),
        (16, 1.0, 5e-4),
        (16, 1.0, 5e-4),  # up: fade-in over 2 of 4 steps
        (8, 1.0, 2e-3),
        (8, 1.0, 2e-3),  # back down, with its own lr
        (8, 1.0, 1e-3),
        (8, 1.0, 1e-3),  # cycled to phase 0
    ]
    assert trainer.generate(trainer.sample_noise(2)).shape == (2, 3, 8, 8)  # the phase last trained
    with pytest.raises(ValueError, match="progan.schedule counts epochs"):
        tiny_trainer("progan", **SCHEDULE).train_step(batches())


@pytest.mark.parametrize("name", ["vitgan", "progan"])
def test_resume_is_exact_for_vitgan_and_the_progan_schedule(tmp_path, name):
    extra = SCHEDULE if name == "progan" else {}
    trainer = tiny_trainer(name, **extra)
    trainer.steps_per_epoch = 1
    for _ in range(3):  # progan: into the 16px phase, mid fade-in
        trainer.train_step(batches())
    path = trainer.save(tmp_path / "ckpt")
    resumed, _ = GanTrainer.from_checkpoint(path)
    assert resumed.steps_per_epoch == 1 and resumed.stage == trainer.stage
    m1, m2 = trainer.train_step(batches(seed=5)), resumed.train_step(batches(seed=5))
    assert m1 == m2  # every metric, bit for bit
    for a, b in ((trainer.generator, resumed.generator), (trainer.discriminator, resumed.discriminator)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    if name == "vitgan":
        assert all(torch.equal(x, y) for x, y in zip(trainer.ema.module.parameters(), resumed.ema.module.parameters()))


def test_non_finite_steps_are_skipped_then_abort():
    trainer = tiny_trainer("wgan_small", **{"train.nan_max_consecutive": 2})
    before = snapshot(trainer.discriminator)
    nan_batch = lambda: (torch.full((4, 3, 16, 16), float("nan")), torch.zeros(4, dtype=torch.long))  # noqa: E731
    metrics = trainer.train_step(nan_batch)
    assert metrics["skipped"] == 1  # the critic step; the generator loss does not see the real batch
    assert not changed(before, trainer.discriminator)
    with pytest.raises(FloatingPointError, match="non-finite for 2 steps"):
        trainer.train_step(nan_batch)
    assert all(torch.isfinite(p).all() for p in trainer.discriminator.parameters())


def test_checkpoint_resume_continues_exactly(tmp_path):
    trainer = tiny_trainer("wgan_large")
    source = batches()
    for _ in range(2):
        trainer.train_step(source)
    trainer.epoch = 3
    path = trainer.save(tmp_path / "step_2", extra_tensors={"fixed_noise": torch.randn(4, 8)})
    assert sorted(p.name for p in path.iterdir()) == [
        "discriminator.safetensors",
        "extra.safetensors",
        "gan_checkpoint.json",
        "generator.safetensors",
        "generator_ema.safetensors",
        "optimizers.safetensors",
    ]
    assert not list(tmp_path.glob(".tmp-*"))

    resumed, state = GanTrainer.from_checkpoint(path)
    assert resumed.step == 2 and resumed.epoch == 3 and resumed.ema.num_updates == 2
    assert state["extra"]["fixed_noise"].shape == (4, 8)
    for a, b in (
        (trainer.generator, resumed.generator),
        (trainer.discriminator, resumed.discriminator),
        (trainer.ema.module, resumed.ema.module),
    ):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    p0 = next(iter(trainer.generator.parameters()))
    r0 = next(iter(resumed.generator.parameters()))
    assert torch.equal(trainer.opt_g.state[p0]["exp_avg"], resumed.opt_g.state[r0]["exp_avg"])

    # both continue identically from here (same RNG streams, same optimizer state)
    m1, m2 = trainer.train_step(batches(seed=5)), resumed.train_step(batches(seed=5))
    assert resumed.step == 3
    assert m1["g_loss"] == pytest.approx(m2["g_loss"], rel=1e-4)


def test_resume_with_a_new_learning_rate_applies_it_to_both(tmp_path):
    trainer = tiny_trainer("dcgan")
    trainer.train_step(batches())
    path = trainer.save(tmp_path / "ckpt")
    cfg = load_gan_config(
        overrides={**TINY, **PER_MODEL["dcgan"], "model.name": "dcgan", "train.lr_g": 1e-5, "train.lr_d": 1e-5}
    )
    resumed, _ = GanTrainer.from_checkpoint(path, cfg)
    assert resumed.opt_g.param_groups[0]["lr"] == 1e-5 and resumed.opt_d.param_groups[0]["lr"] == 1e-5
    wrong = load_gan_config(overrides={**TINY, "model.name": "wgan_small"})
    with pytest.raises(ValueError, match="holds a 'dcgan' model"):
        GanTrainer.from_checkpoint(path, wrong)


def test_sample_from_checkpoint(tmp_path):
    trainer = tiny_trainer("cdcgan")
    trainer.train_step(batches())
    trainer.class_counts = [0] * 18
    trainer.class_counts[4] = 10  # only type 4 seen in training
    path = trainer.save(tmp_path / "run" / "checkpoints" / "step_0000001")
    assert is_gan_checkpoint(path) and is_gan_checkpoint(tmp_path / "run") and not is_gan_checkpoint(tmp_path)

    images = sample_from_checkpoint(tmp_path / "run", 5, seed=1, batch_size=2)
    assert images.shape == (5, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert torch.allclose(images, sample_from_checkpoint(path, 5, seed=1), atol=1e-5)  # batching aside
    assert not torch.equal(images, sample_from_checkpoint(path, 5, seed=2))
    fire = sample_from_checkpoint(path, 5, seed=1, type_name="fire")
    assert not torch.allclose(fire, images)
    from pokediff.data import TYPE_NAMES

    assert TYPE_NAMES[4] != "fire"
    # with no type asked for, types follow the training counts: here always type 4
    assert torch.allclose(sample_from_checkpoint(path, 5, seed=1, type_name=TYPE_NAMES[4]), images)
    with pytest.raises(ValueError, match="unknown type 'plasma'"):
        sample_from_checkpoint(path, 2, type_name="plasma")
    with pytest.raises(FileNotFoundError, match="not a GAN checkpoint"):
        sample_from_checkpoint(tmp_path, 2)


def test_sampling_an_unconditional_model_by_type_is_an_error(tmp_path):
    trainer = tiny_trainer("wgan_large")
    trainer.train_step(batches())
    path = trainer.save(tmp_path / "ckpt")
    ema = sample_from_checkpoint(path, 3)
    raw = sample_from_checkpoint(path, 3, use_ema=False)
    assert ema.shape == raw.shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match="needs a conditional model"):
        sample_from_checkpoint(path, 2, type_name="fire")


def test_train_cli_writes_a_run_that_generate_plot_and_gif_read(tmp_path, tiny_data_root):
    out = tmp_path / "runs"
    common = [
        "--config",
        str(GAN_CONFIG_DIR / "tiny.yaml"),
        "--output-dir",
        str(out),
        f"data.root={tiny_data_root}",
        "data.filter_generations=[]",
        "train.batch_size=8",
        "runtime.checkpoint_every_steps=1",
        "runtime.checkpoints_total_limit=2",
        "runtime.log_every_steps=1",
        "train.epochs=5",
    ]
    run = gan_train.main(["--model", "dcgan", "--max-steps", "2", *common])
    assert run == out / "dcgan"
    assert (run / "config.yaml").is_file() and (run / "samples" / "epoch_0001.png").is_file()  # 19 images / 8 = 2 steps
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]

    run = gan_train.main(["--resume", str(run), "--max-steps", "3", "--lr", "1e-3", "runtime.report_to=none"])
    meta = json.loads((run / "checkpoints" / "step_0000003" / "gan_checkpoint.json").read_text())
    assert meta["step"] == 3 and meta["epoch"] == 1
    assert {g["lr"] for o in meta["optimizers"].values() for g in o["param_groups"]} == {1e-3}
    assert len(list((run / "checkpoints").iterdir())) == 2  # retention
    with open(run / "losses.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(float(r["d_loss"]) == float(r["d_loss"]) for r in rows)

    with pytest.raises(SystemExit):  # a fresh run must not mix with an old run's checkpoints
        gan_train.main(["--model", "dcgan", "--max-steps", "1", *common])

    output = gan_generate.main(["--checkpoint", str(run), "--num", "3", "--output", str(tmp_path / "gen")])
    names = sorted(p.name for p in output.iterdir())
    assert names == ["grid.png", "sample_0000.png", "sample_0001.png", "sample_0002.png"]
    assert plot_losses.main([str(run)]).is_file()
    assert make_gifs.main([str(run)]).stat().st_size > 0


def test_train_cli_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gan_train.main([])
    assert "--model is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gan_train.main(["--model", "dcgan", "--type", "plasma"])
    assert "unknown --type plasma" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gan_train.main(["--model", "dcgan", "train.n_critics=2"])
    assert "did you mean 'train.n_critic'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gan_train.main(["--model", "dcgan", "--config", str(GAN_CONFIG_DIR / "cdcgan.yaml")])
    assert "model.name=cdcgan" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gan_train.main(["--resume", str(tmp_path)])
    assert "not a GAN checkpoint" in capsys.readouterr().err


def test_type_flag_filters_the_data_and_names_the_run():
    argv = ["--model", "cdcgan", "--type", "Grass", "--lr", "3e-4", "--lr-d", "1e-4"]
    args = gan_train.build_parser().parse_args(argv)
    cfg, checkpoint, run_dir = gan_train.config_from_args(args)
    assert cfg.data.filter_types == ["grass"] and checkpoint is None and run_dir is None
    assert cfg.train.lr_g == 3e-4 and cfg.train.lr_d == 1e-4
    assert cfg.data.resolution == cfg.model.resolution == 96
    assert gan_train.default_run_dir(cfg).name == "cdcgan-grass"


def test_vitgan_and_scheduled_progan_train_resume_and_generate_from_the_cli(tmp_path, tiny_data_root):
    common = [
        "--config",
        str(GAN_CONFIG_DIR / "tiny.yaml"),
        "--output-dir",
        str(tmp_path),
        f"data.root={tiny_data_root}",
        "data.filter_generations=[]",
        "train.batch_size=8",
        "runtime.report_to=none",
        "train.epochs=5",
    ]  # 19 training sprites / 8 = 2 steps per epoch
    run = gan_train.main(["--model", "vitgan", "--max-steps", "1", *common, "model.patch_size=4"])
    run = gan_train.main(["--resume", str(run), "--max-steps", "2"])
    meta = json.loads((run / "checkpoints" / "step_0000002" / "gan_checkpoint.json").read_text())
    assert meta["generator"]["class"] == "ViTGANGenerator" and meta["has_ema"]
    assert sample_from_checkpoint(run, 3).shape == (3, 3, 16, 16)

    run = gan_train.main(
        [
            "--model",
            "progan",
            "--max-steps",
            "3",
            *common,
            "progan.schedule=[[16,1,1e-3],[8,1,2e-3]]",
        ]
    )
    with open(run / "losses.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["resolution"], float(r["lr_g"])) for r in rows] == [("16", 1e-3), ("16", 1e-3), ("8", 2e-3)]
    meta = json.loads((run / "checkpoints" / "step_0000003" / "gan_checkpoint.json").read_text())
    assert meta["steps_per_epoch"] == 2 and meta["stage"]["resolution"] == 8
    assert sample_from_checkpoint(run, 2).shape == (2, 3, 8, 8)


@pytest.mark.parametrize("name", ["dcgan", "wgan_small", "wgan_large", "progan", "cdcgan", "vitgan"])
def test_cpu_protocol_overlays_train_at_64_px_for_45_minutes(name):
    args = gan_train.build_parser().parse_args(
        ["--model", name, "--config", str(GAN_CONFIG_DIR / "cpu" / f"{name}.yaml")]
    )
    cfg, _, _ = gan_train.config_from_args(args)
    assert cfg.model.resolution == 64 and cfg.train.max_minutes == 45 and cfg.train.batch_size == 32
    assert cfg.train.max_steps is None and cfg.runtime.output_dir == "outputs/gan-cpu"
    if name == "progan":  # PokéGAN-style cycling that ends on a long full-resolution phase
        resolutions = [r for r, _, _ in cfg.progan.schedule]
        assert resolutions[:3] == [32, 64, 32] and resolutions[-1] == 64 and not cfg.progan.cycle


@pytest.mark.parametrize("name", ["dcgan", "wgan_small", "wgan_large", "progan", "cdcgan", "vitgan"])
def test_shipped_configs_load_and_follow_the_spec(name):
    cfg = load_gan_config(GAN_CONFIG_DIR / f"{name}.yaml")
    assert cfg.model.name == name
    if name.startswith("wgan"):
        assert cfg.train.loss == "wgan" and cfg.train.lambda_gp == 10 and cfg.train.n_critic == 5
        assert (cfg.train.beta1, cfg.train.beta2) == (0.0, 0.9)
    if name == "wgan_small":
        m = cfg.model
        assert (m.resolution, m.latent_dim, m.g_features, cfg.train.batch_size) == (64, 128, 64, 64)
        assert cfg.train.lr_g == cfg.train.lr_d == 1e-4
    if name == "wgan_large":
        assert cfg.train.ema_decay == 0.999 and cfg.train.lr_g < cfg.train.lr_d and cfg.train.batch_size == 32
        assert cfg.model.g_features == 96 and cfg.model.attention_resolution == 32
    if name == "progan":
        assert cfg.progan.resolutions == [32, 64, 128]
    if name in ("dcgan", "cdcgan"):
        assert cfg.model.resolution == 96 and cfg.model.latent_dim == 50 and cfg.train.label_smoothing
    if name == "cdcgan":
        assert cfg.model.discriminator == "projection"
    if name == "vitgan":
        assert cfg.model.resolution == 64 and cfg.model.patch_size == 8 and cfg.model.spectral_norm
        assert cfg.train.ema_decay and "translation" in cfg.train.diff_augment and cfg.train.batch_size == 32


def test_pretraining_on_another_dataset_then_the_sprites(tmp_path, tiny_data_root):
    run = gan_train.main(
        [
            "--model",
            "wgan_small",
            "--config",
            str(GAN_CONFIG_DIR / "tiny.yaml"),
            "--output-dir",
            str(tmp_path),
            "--pretrain-dataset",
            str(tiny_data_root),
            "--pretrain-steps",
            "1",
            "--max-steps",
            "2",
            f"data.root={tiny_data_root}",
            "data.filter_generations=[]",
            "train.batch_size=8",
            "train.n_critic=1",
        ]
    )
    with open(run / "losses.csv", newline="") as f:
        assert [r["phase"] for r in csv.DictReader(f)] == ["pretrain", "train"]
    assert (run / "samples" / "pretrain_final.png").is_file()
    with pytest.raises(ConfigError, match="pretrain.steps is 0"):
        load_gan_config(overrides={"pretrain.dataset": "cifar10"})
    with pytest.raises(ConnectionError, match="missing"):  # offline: a name that is no folder is a hub id
        overrides = {"pretrain.dataset": str(tmp_path / "missing"), "pretrain.steps": 1}
        gan_train.build_pretrain_data(load_gan_config(overrides=overrides))


def test_generator_learns_a_constant_colour():
    # the smallest honest check that the adversarial game trains: G's mean colour moves toward the data's
    trainer = tiny_trainer("dcgan", **{"train.lr_g": 1e-3, "train.lr_d": 1e-3})
    target = torch.tensor([0.8, -0.6, 0.2])
    real = target.view(1, 3, 1, 1).expand(4, 3, 16, 16).clone()
    z = trainer.sample_noise(16, torch.Generator().manual_seed(0))

    def colour_error():
        return (trainer.generate(z).mean(dim=(0, 2, 3)) - target).abs().mean().item()

    before = colour_error()
    for _ in range(40):
        trainer.train_step(lambda: (real, torch.zeros(4, dtype=torch.long)))
    assert colour_error() < 0.5 * before


def test_plot_losses_and_gif_from_files(tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    with open(run / "losses.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=gan_train.CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for step in range(1, 31):
            writer.writerow(
                {
                    "step": step,
                    "d_loss": 1.4 - step / 100,
                    "g_loss": 0.7,
                    "gp": 0,
                    "fm_loss": 0,
                    "d_real": 0.1,
                    "d_fake": -0.1,
                    "d_grad_norm": 2,
                    "g_grad_norm": 1,
                    "phase": "train",
                }
            )
    image = Image.open(plot_losses.plot_losses(run, smooth=5))
    assert image.size == (900, 3 * 220)  # the all-zero gp / feature-matching panel is left out
    with pytest.raises(FileNotFoundError, match="losses file not found"):
        plot_losses.plot_losses(tmp_path)

    for epoch, colour in ((10, "red"), (2, "blue")):
        Image.new("RGB", (8, 8), colour).save(run / "samples" / f"epoch_{epoch:04d}.png")
    gif = Image.open(make_gifs.make_gif(run))
    assert gif.n_frames == 2
    assert gif.convert("RGB").getpixel((0, 0))[2] > 200  # epoch 2 (blue) comes first, not sorted as text
    with pytest.raises(FileNotFoundError, match="no samples/ folder"):
        make_gifs.make_gif(tmp_path)
