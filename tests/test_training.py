"""Training loop pieces and stages 1-2 on tiny models (CPU)."""

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from tiny import TINY_TEXT_DIM, save_tiny_text_encoder, tiny_config_overrides, tiny_unet, tiny_vae

from pokediff.config import load_config
from pokediff.models.patch_discriminator import PatchDiscriminator
from pokediff.training import checkpoints, guards, seeding, setup
from pokediff.training.checkpoints import CheckpointManager, TrainingState
from pokediff.training.guards import GradExplosionDetector, NonFiniteGuard, NonFiniteLossError
from pokediff.training.metrics import LossLogger, read_losses
from pokediff.training.stage1_vae import (
    AdversarialTerm,
    VAETrainingModule,
    _vae_losses,
    kl_weight_at,
    kl_with_free_bits,
    train_stage1,
)
from pokediff.training.stage2_unet import diffusion_loss, train_stage2

# 64 px instead of 215 keeps the loop tests fast; the smoke run in test_training_cli.py uses the real geometry.
SMALL = {"data.resolution": 64, "stage1.perceptual_weight": 0.0, "data.augmentation.rotation": 10.0}


@pytest.fixture(scope="session")
def text_encoder_dir(tmp_path_factory):
    """The tiny text encoder, saved once per session (test_training_cli.py imports this fixture)."""
    return save_tiny_text_encoder(tmp_path_factory.mktemp("tiny_te"))


def make_cfg(data_root, text_encoder_dir, out, **extra):
    overrides = tiny_config_overrides(data_root, text_encoder_dir, out)
    overrides.update(SMALL)
    overrides.update(extra)
    return load_config(overrides=overrides)


def fixed_batch(cfg, n=4):
    from pokediff.data import build_dataloader

    return next(iter(build_dataloader(cfg.data, "train", n, shuffle=False)))


def no_text(captions):
    return {}


def vae_weights(s1):
    """The loss weights ``_vae_losses`` takes after its sample_posterior flag."""
    return s1.l1_weight, s1.perceptual_weight, s1.free_bits


# ------------------------------------------------------------------------------------ loss terms
def test_free_bits_hold_each_channel_at_the_floor():
    mean, logvar = torch.zeros(2, 4, 3, 3, requires_grad=True), torch.zeros(2, 4, 3, 3, requires_grad=True)
    term, raw = kl_with_free_bits(mean, logvar, free_bits=0.5)
    assert raw.item() == pytest.approx(0.0)
    assert term.item() == pytest.approx(0.5 * 4)
    term.backward()  # below the floor: no pressure towards the prior
    assert mean.grad.abs().sum() == 0 and logvar.grad.abs().sum() == 0

    big = torch.full((2, 4, 3, 3), 3.0)  # KL per element = 0.5 * 9 = 4.5 nats
    term, raw = kl_with_free_bits(big, torch.zeros_like(big), free_bits=0.5)
    assert term.item() == pytest.approx(raw.item()) == pytest.approx(4 * 4.5)


def test_kl_weight_anneals_linearly_then_holds(tmp_path):
    s1 = load_config(overrides={"stage1.kl_weight": 0.1, "stage1.kl_anneal_epochs": 4}).stage1
    assert kl_weight_at(0, 10, s1.kl_weight, s1.kl_anneal_epochs) == 0.0
    assert kl_weight_at(20, 10, s1.kl_weight, s1.kl_anneal_epochs) == pytest.approx(0.05)
    assert kl_weight_at(40, 10, s1.kl_weight, s1.kl_anneal_epochs) == pytest.approx(0.1)
    assert kl_weight_at(400, 10, s1.kl_weight, s1.kl_anneal_epochs) == pytest.approx(0.1)


def test_stage1_loss_falls_on_a_fixed_batch(tiny_data_root, text_encoder_dir, tmp_path):
    cfg = make_cfg(tiny_data_root, text_encoder_dir, tmp_path, **{"data.augment": False})
    batch = fixed_batch(cfg)
    torch.manual_seed(0)
    from pokediff.models.vae import build_vae

    module = VAETrainingModule(build_vae(cfg.vae, cfg.data.resolution))
    optimizer = torch.optim.AdamW(module.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss, parts, recon = _vae_losses(module, batch, None, no_text, 0.01, True, *vae_weights(cfg.stage1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert recon.shape == batch["pixel_values"].shape
    assert losses[-1] < 0.6 * losses[0], losses


def test_stage1_perceptual_term_enters_the_loss(tiny_data_root, text_encoder_dir, tmp_path):
    cfg = make_cfg(tiny_data_root, text_encoder_dir, tmp_path, **{"stage1.perceptual_weight": 2.0})
    batch = fixed_batch(cfg, 2)
    module = VAETrainingModule(tiny_vae().train())

    def perceptual(x, y):  # a cheap stand-in with the adapter's contract: per-sample distance
        return (x - y).pow(2).mean(dim=(1, 2, 3))

    torch.manual_seed(0)
    with_p, parts, recon = _vae_losses(module, batch, perceptual, no_text, 0.0, False, *vae_weights(cfg.stage1))
    without, _, _ = _vae_losses(module, batch, None, no_text, 0.0, False, *vae_weights(cfg.stage1))
    expected = 2.0 * perceptual(recon, batch["pixel_values"]).mean()
    assert (with_p - without).item() == pytest.approx(expected.item(), rel=1e-4)
    assert parts["perceptual"].item() == pytest.approx(expected.item() / 2.0, rel=1e-4)


def test_adversarial_term_trains_the_discriminator_from_its_start_step(tiny_data_root, text_encoder_dir, tmp_path):
    cfg = make_cfg(tiny_data_root, text_encoder_dir, tmp_path)
    real = fixed_batch(cfg)["pixel_values"]
    blurred = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(real, 4), scale_factor=4.0)
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(base_channels=8)
    optimizer = torch.optim.AdamW(discriminator.parameters(), lr=2e-3, betas=(0.5, 0.9))
    term = AdversarialTerm(Accelerator(cpu=True), discriminator, optimizer, weight=0.5, start_step=3)
    before = [p.detach().clone() for p in discriminator.parameters()]

    recon = blurred.clone().requires_grad_(True)
    loss, parts = term(real, recon, step=2)
    assert loss.item() == 0.0 and parts == {}
    assert all(torch.equal(a, b) for a, b in zip(before, discriminator.parameters()))  # untrained before its start

    d_losses = []
    for step in range(3, 33):
        loss, parts = term(real, recon, step=step)
        d_losses.append(parts["d_loss"].item())
    assert not all(torch.equal(a, b) for a, b in zip(before, discriminator.parameters()))
    assert d_losses[-1] < 0.5 * d_losses[0], d_losses  # it learns to tell the sprites from their blur
    assert loss.item() == pytest.approx(0.5 * parts["g_loss"].item())
    loss.backward()  # the VAE's term reaches the reconstruction
    assert recon.grad is not None and recon.grad.abs().sum() > 0


@pytest.mark.parametrize("prediction_type,gamma", [("epsilon", None), ("v_prediction", 5.0)])
def test_stage2_loss_falls_on_a_fixed_batch(prediction_type, gamma):
    from pokediff.schedulers import build_noise_scheduler

    cfg = load_config(overrides={"scheduler.prediction_type": prediction_type, "stage2.min_snr_gamma": gamma})
    scheduler = build_noise_scheduler(cfg.scheduler)
    unet = tiny_unet().train()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 16, 16, generator=g)
    embeddings = torch.randn(4, 16, TINY_TEXT_DIM, generator=g)
    masks = torch.ones(4, 16, dtype=torch.long)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.tensor([10, 200, 500, 900])
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = diffusion_loss(
            unet,
            scheduler,
            latents,
            embeddings,
            masks,
            cfg.stage2.huber_delta,
            cfg.stage2.min_snr_gamma,
            noise,
            timesteps,
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses


# ------------------------------------------------------------------------------ stability guards
def test_non_finite_guard_counts_and_aborts_after_n_in_a_row():
    guard = NonFiniteGuard(max_consecutive=3, stage="stageX")
    assert guard.all_finite(torch.tensor(1.0))
    assert not guard.all_finite(torch.tensor(float("nan")))
    assert not guard.all_finite(torch.tensor([1.0, float("inf")]))
    guard.skip(1, "loss")
    guard.skip(2, "loss")
    guard.ok()  # a good batch resets the run
    guard.skip(4, "loss")
    guard.skip(5, "loss")
    assert guard.total_skipped == 4 and guard.consecutive == 2
    with pytest.raises(NonFiniteLossError, match="3 batches in a row had a non-finite loss.*step 6"):
        guard.skip(6, "loss")


def test_gradient_explosion_is_clipped_to_the_running_median():
    detector = GradExplosionDetector(factor=10.0, window=50, min_history=5)
    for norm in [1.0, 1.2, 0.8, 1.1, 0.9, 1.0]:
        clip, exploded = detector.clip_value(norm, base_clip=5.0)
        assert clip == 5.0 and not exploded
    clip, exploded = detector.clip_value(100.0, base_clip=5.0)
    assert exploded and clip == pytest.approx(1.0) and detector.events == 1
    clip, exploded = detector.clip_value(3.0, base_clip=5.0)  # high but within factor x median
    assert not exploded
    restored = GradExplosionDetector(factor=10.0, window=50, min_history=5)
    restored.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert list(restored.history) == list(detector.history)


def test_clip_gradients_scales_an_exploding_gradient():
    acc = Accelerator(cpu=True)
    layer = torch.nn.Linear(4, 1)
    detector = GradExplosionDetector(factor=10.0, min_history=3)
    for _ in range(3):
        detector.clip_value(1.0, 100.0)
    layer.weight.grad = torch.full_like(layer.weight, 50.0)
    layer.bias.grad = torch.zeros_like(layer.bias)
    norm, exploded = guards.clip_gradients(acc, layer.parameters(), 100.0, detector)
    assert exploded and norm.item() == pytest.approx(100.0)
    after = torch.cat([layer.weight.grad.flatten(), layer.bias.grad.flatten()]).norm()
    assert after.item() == pytest.approx(1.0, rel=1e-3)


class RandomItems(torch.utils.data.Dataset):
    """Stands in for an augmenting dataset: every item draws from torch's global RNG."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        return torch.rand(2)


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_seeded_augmentation_depends_on_seed_epoch_and_index_only(workers):
    loader = seeding.wrap_dataloader_seeded(
        torch.utils.data.DataLoader(RandomItems(), batch_size=3, num_workers=workers, persistent_workers=workers > 0),
        seed=1,
    )
    assert not loader.persistent_workers

    def epoch(e):
        loader.dataset.set_epoch(e)
        return torch.cat(list(loader))

    torch.manual_seed(123)
    first = epoch(0)
    torch.manual_seed(456)  # the global RNG state does not matter ...
    assert torch.equal(epoch(0), first)
    assert not torch.equal(epoch(1), first)  # ... the epoch does
    state = torch.get_rng_state()
    loader.dataset[0]
    assert torch.equal(torch.get_rng_state(), state)  # and loading leaves the training RNG alone


# ----------------------------------------------------------------------------------- checkpoints
def _prepared_linear(tmp_path):
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = acc.prepare(model, optimizer)
    return acc, model, optimizer


def _train_step(model, optimizer):
    loss = model(torch.ones(1, 3)).pow(2).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_interrupted_checkpoint_write_leaves_the_previous_one_usable(tmp_path, monkeypatch):
    acc, model, optimizer = _prepared_linear(tmp_path)
    manager = CheckpointManager(acc, tmp_path / "ckpt", total_limit=2)
    _train_step(model, optimizer)
    saved_weight = model.weight.detach().clone()
    first = manager.save(TrainingState(stage="stage1", global_step=1, epoch=0, batches_in_epoch=1))

    _train_step(model, optimizer)
    real_save = checkpoints.Accelerator.save_state

    def crash_half_way(self, output_dir, **kw):
        real_save(self, output_dir, **kw)
        Path(output_dir, "model.safetensors").write_bytes(b"truncated")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.Accelerator, "save_state", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        manager.save(TrainingState(stage="stage1", global_step=2, epoch=0, batches_in_epoch=2))
    monkeypatch.setattr(checkpoints.Accelerator, "save_state", real_save)

    assert manager.latest() == first
    assert manager.resolve("latest") == first
    assert (tmp_path / "ckpt" / ".tmp-checkpoint-0000002").exists()  # the half-written one, ignored
    state = manager.load(manager.latest())
    assert state.global_step == 1 and state.batches_in_epoch == 1
    assert torch.equal(model.weight.detach(), saved_weight)

    # the next save clears the debris and retention keeps the newest two
    for step in (2, 3, 4):
        manager.save(TrainingState(stage="stage1", global_step=step))
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["checkpoint-0000003", "checkpoint-0000004"]
    manager.close()


def test_resume_path_errors_name_the_folder(tmp_path):
    acc, _, _ = _prepared_linear(tmp_path)
    manager = CheckpointManager(acc, tmp_path / "ckpt", total_limit=1)
    assert manager.resolve("latest") is None
    with pytest.raises(FileNotFoundError, match="nope"):
        manager.resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="training_state.json"):
        manager.resolve(str(tmp_path / "empty"))
    manager.close()


def test_loss_logger_drops_rows_past_the_resume_step(tmp_path):
    path = tmp_path / "losses.csv"
    log = LossLogger(path, "stage1")
    for step in range(1, 6):
        log.log(step, 0, {"loss": 1.0 / step})
    LossLogger(path, "stage2").log(1, 0, {"loss": 9.0})
    log.truncate_after(3)
    rows = read_losses(path)
    assert [(r["stage"], r["step"]) for r in rows] == [("stage1", 1), ("stage1", 2), ("stage1", 3), ("stage2", 1)]


def test_mixed_precision_resolution():
    assert setup.resolve_mixed_precision("auto", on_cpu=True) == "no"
    assert setup.resolve_mixed_precision("bf16", on_cpu=True) == "bf16"
    with pytest.raises(ValueError, match="mixed_precision"):
        setup.resolve_mixed_precision("fp8", on_cpu=True)


def test_cpu_threads_per_process():
    # a set value wins; 0 shares the cores among the processes instead of accelerate launch's OMP_NUM_THREADS=1
    assert setup.cpu_threads_per_process(3, num_processes=1, cores=2) == 3
    assert setup.cpu_threads_per_process(0, num_processes=1, cores=2) == 2
    assert setup.cpu_threads_per_process(0, num_processes=2, cores=8) == 4
    assert setup.cpu_threads_per_process(0, num_processes=4, cores=2) == 1


def test_build_accelerator_sets_the_cpu_thread_count(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(setup.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    try:
        for threads, expected in ((0, 3), (1, 1)):
            overrides = {"runtime.num_threads": threads, "runtime.output_dir": str(tmp_path), "runtime.cpu": True}
            cfg = load_config(overrides=overrides)
            setup.build_accelerator(cfg)
            assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)


# -------------------------------------------------------------------------------- whole stages
def _state(run, stage):
    latest = sorted((run / "checkpoints" / stage).glob("checkpoint-*"))[-1]
    return json.loads((latest / "training_state.json").read_text()), latest


class Interrupt(Exception):
    pass


def _interrupt_after_checkpoint(monkeypatch, step):
    real = CheckpointManager.save

    def save(self, state):
        path = real(self, state)
        if state.global_step == step:
            raise Interrupt(f"killed after checkpoint {step}")
        return path

    monkeypatch.setattr(CheckpointManager, "save", save)


@pytest.mark.parametrize("adversarial", [{}, {"stage1.adversarial_weight": 0.1, "stage1.adversarial_start_step": 2}])
def test_stage1_resume_matches_an_uninterrupted_run(
    tiny_data_root, text_encoder_dir, tmp_path, monkeypatch, adversarial
):
    # ~20 train sprites / batch 4 = 4-5 steps per epoch: interrupted mid-epoch at step 3, ends in epoch 2
    extra = {"stage1.epochs": 2, "runtime.max_steps": 7, "runtime.checkpoint_every_steps": 3, **adversarial}
    full = train_stage1(make_cfg(tiny_data_root, text_encoder_dir, tmp_path / "a", **extra))

    cfg = make_cfg(tiny_data_root, text_encoder_dir, tmp_path / "b", **extra)
    with monkeypatch.context() as m:
        _interrupt_after_checkpoint(m, 3)
        with pytest.raises(Interrupt):
            train_stage1(cfg)
    resumed = train_stage1(cfg, resume="latest")

    state_a, ckpt_a = _state(tmp_path / "a" / "pokediff", "stage1")
    state_b, ckpt_b = _state(tmp_path / "b" / "pokediff", "stage1")
    assert state_a["global_step"] == state_b["global_step"] == 7
    assert state_a["epoch"] == state_b["epoch"] == 1  # crossed an epoch boundary after the resume
    assert state_a["batches_in_epoch"] == state_b["batches_in_epoch"] > 0
    weights_a, weights_b = load_file(ckpt_a / "model.safetensors"), load_file(ckpt_b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    best_a = load_file(full / "diffusion_pytorch_model.safetensors")
    best_b = load_file(resumed / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    scaling = json.loads((resumed / "config.json").read_text())["scaling_factor"]
    assert scaling != 1.0 and math.isfinite(scaling)
    steps = [r["step"] for r in read_losses(tmp_path / "b" / "pokediff" / "losses.csv") if r["metric"] == "loss"]
    assert steps == list(range(1, 8))  # no step logged twice after the resume
    if adversarial:  # the discriminator and its optimizer travel in the checkpoint, and it trained from step 2
        d_a, d_b = load_file(ckpt_a / "model_1.safetensors"), load_file(ckpt_b / "model_1.safetensors")
        assert d_a.keys() and all(torch.equal(d_a[k], d_b[k]) for k in d_a)
        rows = read_losses(tmp_path / "b" / "pokediff" / "losses.csv")
        # rows carry the step count after the update: the update at step 2 (0-based) is row 3
        assert [r["step"] for r in rows if r["metric"] == "d_loss"] == list(range(3, 8))


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    vae = tiny_vae()
    vae.register_to_config(sample_size=64, scaling_factor=0.9)
    vae.save_pretrained(folder)
    return folder


def test_stage2_refuses_a_vae_of_another_resolution(tiny_data_root, text_encoder_dir, tiny_vae_dir, tmp_path):
    cfg = make_cfg(tiny_data_root, text_encoder_dir, tmp_path, **{"data.resolution": 96})
    with pytest.raises(ValueError, match="64px sprites but data.resolution is 96"):
        train_stage2(cfg, tiny_vae_dir)
    with pytest.raises(FileNotFoundError, match="VAE folder not found"):
        train_stage2(cfg, tmp_path / "missing")


def test_stage2_resume_matches_an_uninterrupted_run(
    tiny_data_root, text_encoder_dir, tiny_vae_dir, tmp_path, monkeypatch
):
    # 20 sprites + 20 mirrored = 40 cache entries / batch 8 = 5 steps per epoch
    extra = {
        "stage2.epochs": 2,
        "stage2.batch_size": 8,
        "runtime.max_steps": 7,
        "runtime.checkpoint_every_steps": 3,
        "stage2.sample_images_per_prompt": 1,
        "stage2.sample_prompts": ["a red fire type"],
    }
    full = train_stage2(make_cfg(tiny_data_root, text_encoder_dir, tmp_path / "a", **extra), tiny_vae_dir)

    cfg = make_cfg(tiny_data_root, text_encoder_dir, tmp_path / "b", **extra)
    with monkeypatch.context() as m:
        _interrupt_after_checkpoint(m, 3)
        with pytest.raises(Interrupt):
            train_stage2(cfg, tiny_vae_dir)
    resumed = train_stage2(cfg, tiny_vae_dir, resume="latest")

    state_a, ckpt_a = _state(tmp_path / "a" / "pokediff", "stage2")
    card = (tmp_path / "a" / "pokediff" / "pipeline" / "README.md").read_text()  # a stage-2-only pipeline
    assert "Stage 2: ran for these weights, 7 optimizer steps." in card
    assert "Stage 3: ran" not in card and "did not run for these weights" in card
    state_b, ckpt_b = _state(tmp_path / "b" / "pokediff", "stage2")
    assert state_a["global_step"] == state_b["global_step"] == 7
    ema_a = load_file(full / "diffusion_pytorch_model.safetensors")  # EMA weights: EMA state resumed too
    ema_b = load_file(resumed / "diffusion_pytorch_model.safetensors")
    for key in ema_a:
        assert torch.equal(ema_a[key], ema_b[key]), key
    raw_a, raw_b = load_file(ckpt_a / "model.safetensors"), load_file(ckpt_b / "model.safetensors")
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)
    assert not all(torch.equal(raw_a[k], ema_a[k]) for k in ema_a)  # the saved U-Net is the EMA, not the raw one
    assert (tmp_path / "b" / "pokediff" / "pipeline" / "model_index.json").is_file()
    assert (tmp_path / "b" / "pokediff" / "samples" / "stage2_epoch0002.png").is_file()


def test_an_injected_nan_batch_is_skipped_and_counted(tiny_data_root, text_encoder_dir, tmp_path, monkeypatch):
    from pokediff.training import stage1_vae

    real = stage1_vae._vae_losses
    calls = {"n": 0}

    def poisoned(module, batch, *args):
        calls["n"] += 1
        if calls["n"] == 2 and module.training:  # the second training batch carries a NaN pixel
            batch = dict(batch, pixel_values=batch["pixel_values"].clone())
            batch["pixel_values"][0, 0, 0, 0] = float("nan")
        return real(module, batch, *args)

    monkeypatch.setattr(stage1_vae, "_vae_losses", poisoned)
    cfg = make_cfg(tiny_data_root, text_encoder_dir, tmp_path, **{"runtime.max_steps": 4})
    vae_dir = train_stage1(cfg)

    state, ckpt = _state(tmp_path / "pokediff", "stage1")
    assert state["global_step"] == 4
    assert state["extra"]["guard"]["total_skipped"] == 1
    rows = read_losses(tmp_path / "pokediff" / "losses.csv")
    updated = {r["step"]: r["value"] for r in rows if r["metric"] == "updated"}
    assert updated == {1: 1.0, 2: 0.0, 3: 1.0, 4: 1.0}
    assert [r["value"] for r in rows if r["metric"] == "skipped_batches"] == [0, 1, 1, 1]
    weights = load_file(vae_dir / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


# every update is skipped, so torch warns that the LR scheduler stepped before the optimizer: expected here
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_stage1_aborts_after_n_non_finite_batches_in_a_row(tiny_data_root, text_encoder_dir, tmp_path, monkeypatch):
    from pokediff.training import stage1_vae

    real = stage1_vae._vae_losses

    def always_nan(module, batch, *args):
        loss, parts, recon = real(module, batch, *args)
        return loss * float("nan"), parts, recon

    monkeypatch.setattr(stage1_vae, "_vae_losses", always_nan)
    cfg = make_cfg(tiny_data_root, text_encoder_dir, tmp_path, **{"runtime.nan_max_consecutive": 2})
    with pytest.raises(NonFiniteLossError, match="2 batches in a row"):
        train_stage1(cfg)
