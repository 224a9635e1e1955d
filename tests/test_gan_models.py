"""GAN architectures and loss pieces (pokediff.gan), on tiny sizes."""

import math

import pytest
import torch
from torch import nn

from pokediff.config import ConfigError
from pokediff.data import diff_augment
from pokediff.gan import losses
from pokediff.gan.cdcgan import ConditionalDCGANGenerator, ProjectionDiscriminator
from pokediff.gan.checkpoint import flatten_optimizer_state, unflatten_optimizer_state
from pokediff.gan.config import load_gan_config
from pokediff.gan.dcgan import DCGANDiscriminator, DCGANGenerator
from pokediff.gan.ema import GeneratorEMA
from pokediff.gan.progan import EqualizedConv2d, ProGANDiscriminator, ProGANGenerator, progan_stage
from pokediff.gan.registry import build_models
from pokediff.gan.wgan_large import WGANLargeCritic, WGANLargeGenerator
from pokediff.gan.wgan_small import WGANSmallCritic


TINY = {
    "model.g_features": 4, "model.d_features": 4, "model.g_max_features": 16, "model.d_max_features": 16,
    "model.latent_dim": 8, "model.attention_resolution": 8, "progan.resolutions": [8, 16], "model.resolution": 16,
}
MODELS = ["dcgan", "cdcgan", "wgan_small", "wgan_large", "progan"]


def tiny_models(name, **extra):
    torch.manual_seed(0)
    return build_models(load_gan_config(overrides={**TINY, "model.name": name, **extra}))


@pytest.mark.parametrize("name", MODELS)
def test_output_shapes(name):
    generator, discriminator = tiny_models(name)
    z, labels = torch.randn(3, 8), torch.tensor([0, 5, 17])
    images = generator(z, labels)
    assert images.shape == (3, 3, 16, 16)
    if name != "progan":  # progan's to_rgb is linear, as in the paper
        assert images.abs().max() <= 1.0
    scores, features = discriminator(images, labels, return_features=True)
    assert scores.shape == (3,)
    assert features.ndim == 2 and features.shape[0] == 3


def test_dcgan_default_architecture_matches_the_spec():
    generator = DCGANGenerator()  # 96x96, latent 50
    deconvs = [m for m in generator.modules() if isinstance(m, nn.ConvTranspose2d)]
    expected = [(50, 512), (512, 512), (512, 256), (256, 128), (128, 64)]
    assert [(m.in_channels, m.out_channels) for m in deconvs] == expected
    assert deconvs[0].kernel_size == (6, 6)
    assert any(isinstance(m, nn.BatchNorm2d) for m in generator.modules())
    last_conv = [m for m in generator.modules() if isinstance(m, nn.Conv2d)][-1]
    assert last_conv.kernel_size == (3, 3) and last_conv.out_channels == 3
    discriminator = DCGANDiscriminator()
    convs = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [64, 128, 256, 512, 1024, 1]
    assert convs[0].kernel_size == (3, 3) and convs[-1].kernel_size == (6, 6)
    assert all(hasattr(m, "parametrizations") for m in convs)  # spectral norm everywhere in D
    assert not any(isinstance(m, nn.BatchNorm2d) for m in discriminator.modules())


def test_wgan_critics_have_no_batchnorm_and_large_has_spectral_norm_and_attention():
    small = WGANSmallCritic(resolution=64)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in small.modules())
    assert any(isinstance(m, nn.GroupNorm) and m.num_groups == 1 for m in small.modules())  # LayerNorm
    critic = WGANLargeCritic(resolution=32, base_channels=4, max_channels=8, attention_resolution=16)
    convs = [m for m in critic.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(hasattr(m, "parametrizations") for m in convs)
    generator = WGANLargeGenerator(
        resolution=32, latent_dim=8, base_channels=4, max_channels=8, attention_resolution=16
    )
    deconvs = [m for m in generator.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(deconvs) == 1  # only 1x1 -> 4x4; the rest is Upsample + Conv
    assert any(isinstance(m, nn.Upsample) for m in generator.modules())
    for model, size in ((generator, 16), (critic, 16)):
        seen = []
        hook = lambda mod, inp, out: seen.append(inp[0].shape[-1])  # noqa: E731
        for m in model.modules():
            if type(m).__name__ == "SelfAttention2d":
                m.register_forward_hook(hook)
        model(torch.randn(2, 8)) if model is generator else model(torch.randn(2, 3, 32, 32))
        assert seen == [size]


def test_bad_resolution_is_a_clear_error():
    with pytest.raises(ValueError, match="wgan_small: resolution 48"):
        build_models(load_gan_config(overrides={"model.name": "wgan_small", "model.resolution": 48}))
    with pytest.raises(ValueError, match="dcgan: resolution 100"):
        DCGANGenerator(resolution=100)
    with pytest.raises(ConfigError, match="progan.resolutions"):
        load_gan_config(overrides={"model.name": "progan", "model.resolution": 64, "progan.resolutions": [32, 128]})
    with pytest.raises(ConfigError, match="lambda_gp"):
        load_gan_config(overrides={"train.lambda_g": 1.0})


def test_conditional_generator_output_changes_with_the_type():
    torch.manual_seed(0)
    generator = ConditionalDCGANGenerator(resolution=12, latent_dim=8, base_channels=4, max_channels=8).eval()
    z = torch.randn(1, 8).repeat(2, 1)
    images = generator(z, torch.tensor([3, 9]))
    assert not torch.allclose(images[0], images[1])
    assert torch.allclose(generator(z[:1], torch.tensor([3])), images[:1], atol=1e-6)
    with pytest.raises(ValueError, match="class_labels"):
        generator(z)
    with pytest.raises(ValueError, match=r"\[0, 18\)"):
        generator(z, torch.tensor([0, 18]))


def test_projection_discriminator_depends_on_the_type():
    torch.manual_seed(0)
    discriminator = ProjectionDiscriminator(resolution=12, base_channels=4, max_channels=8)
    with torch.no_grad():
        discriminator.class_projection.parametrizations.weight.original.normal_()
    x = torch.randn(1, 3, 12, 12).repeat(2, 1, 1, 1)
    scores = discriminator(x, torch.tensor([1, 2]))
    assert scores[0] != scores[1]


def test_progan_fade_in_blends_the_previous_resolution():
    torch.manual_seed(0)
    generator = ProGANGenerator(resolution=16, start_resolution=8, latent_dim=8, base_channels=4, max_channels=8)
    z = torch.randn(2, 8)
    low = generator(z, resolution=8)
    assert low.shape == (2, 3, 8, 8)
    faded_out = generator(z, resolution=16, alpha=0.0)
    assert torch.allclose(faded_out, nn.functional.interpolate(low, scale_factor=2, mode="nearest"), atol=1e-6)
    full = generator(z, resolution=16, alpha=1.0)
    half = generator(z, resolution=16, alpha=0.5)
    assert torch.allclose(half, 0.5 * (faded_out + full), atol=1e-5)
    with pytest.raises(ValueError, match="resolution 4"):
        generator(z, resolution=4)
    discriminator = ProGANDiscriminator(resolution=16, start_resolution=8, base_channels=4, max_channels=8)
    assert discriminator(low).shape == (2,)
    assert discriminator(full, alpha=0.3).shape == (2,)


def test_progan_schedule_fades_grows_and_cycles():
    stages = [32, 64, 128]
    assert progan_stage(0, stages, 10, 0.5, False) == (32, 1.0)
    assert progan_stage(10, stages, 10, 0.5, False) == (64, 0.0)
    assert progan_stage(12, stages, 10, 0.5, False) == (64, pytest.approx(0.4))
    assert progan_stage(16, stages, 10, 0.5, False) == (64, 1.0)
    assert progan_stage(21, stages, 10, 0.0, False) == (128, 1.0)  # no fade-in
    assert progan_stage(99, stages, 10, 0.5, False) == (128, 1.0)
    assert progan_stage(30, stages, 10, 0.5, True) == (32, 1.0)  # cycling restarts, without fading
    assert progan_stage(45, stages, 10, 0.5, True) == (64, 1.0)


def test_equalized_conv_scales_weights_at_run_time():
    conv = EqualizedConv2d(4, 2, 3, padding=1)
    assert conv.weight.std().item() == pytest.approx(1.0, abs=0.35)  # stored weights are N(0, 1)
    x = torch.randn(1, 4, 5, 5)
    expected = nn.functional.conv2d(x, conv.weight * math.sqrt(2 / 36), conv.bias, padding=1)
    assert torch.allclose(conv(x), expected)


def test_gradient_penalty_is_zero_for_a_1_lipschitz_linear_critic():
    torch.manual_seed(0)
    real, fake = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    weight = torch.randn(3 * 4 * 4)
    unit = weight / weight.norm()
    assert losses.gradient_penalty(lambda x: x.flatten(1) @ unit, real, fake).item() == pytest.approx(0.0, abs=1e-10)
    steep = losses.gradient_penalty(lambda x: x.flatten(1) @ (3 * unit), real, fake)
    assert steep.item() == pytest.approx(4.0, rel=1e-5)  # (||grad|| - 1)^2 = (3 - 1)^2
    nonlinear = losses.gradient_penalty(lambda x: (x.flatten(1) ** 2).sum(1), real, fake)
    assert nonlinear.item() > 0


def test_gradient_penalty_trains_the_critic():
    critic = nn.Linear(4, 1)
    gp = losses.gradient_penalty(lambda x: critic(x).squeeze(1), torch.randn(5, 4), torch.randn(5, 4))
    gp.backward()
    assert critic.weight.grad is not None and critic.weight.grad.abs().sum() > 0


def test_diff_augment_is_seeded_identically_and_differentiable():
    torch.manual_seed(0)
    real = torch.rand(4, 3, 16, 16) * 2 - 1
    fake = real.clone().requires_grad_(True)
    policy = "color,translation,cutout"
    aug_real = diff_augment(real, policy, generator=torch.Generator().manual_seed(7))
    aug_fake = diff_augment(fake, policy, generator=torch.Generator().manual_seed(7))
    assert torch.equal(aug_real, aug_fake.detach())  # same draws for real and fake given the same seed
    assert not torch.equal(aug_real, real)
    other = diff_augment(real, policy, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(aug_real, other)
    aug_fake.sum().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_diff_augment_passes_gradients_back_to_the_generator():
    generator, discriminator = tiny_models("wgan_small")
    images = generator(torch.randn(2, 8))
    scores = discriminator(diff_augment(images, "color,translation,cutout", generator=torch.Generator().manual_seed(0)))
    scores.sum().backward()
    assert all(p.grad is not None for p in generator.parameters())
    assert sum(p.grad.abs().sum() for p in generator.parameters()) > 0


def test_label_smoothing_and_flips():
    g = torch.Generator().manual_seed(0)
    real = losses.discriminator_targets(1000, real=True, smoothing=True, generator=g)
    fake = losses.discriminator_targets(1000, real=False, smoothing=True, generator=g)
    assert 0.7 <= real.min() and real.max() <= 1.0 and real.std() > 0.05
    assert 0.0 <= fake.min() and fake.max() <= 0.3
    assert torch.equal(losses.discriminator_targets(3, real=True, smoothing=False), torch.ones(3))
    flipped = losses.discriminator_targets(1000, real=True, smoothing=True, flip_prob=1.0, generator=g)
    assert flipped.max() <= 0.3
    some = losses.discriminator_targets(4000, real=True, smoothing=False, flip_prob=0.05, generator=g)
    assert 0.02 < (some == 0).float().mean() < 0.08


def test_feature_matching_loss():
    a = torch.randn(6, 5)
    assert losses.feature_matching_loss(a, a.clone()).item() == 0.0
    assert losses.feature_matching_loss(a, a + 1).item() == pytest.approx(1.0)


def test_wasserstein_losses():
    real, fake = torch.tensor([2.0, 4.0]), torch.tensor([1.0, -1.0])
    assert losses.wasserstein_critic_loss(real, fake).item() == pytest.approx(0.0 - 3.0)
    assert losses.wasserstein_critic_loss(real, fake, drift=0.1).item() == pytest.approx(-3.0 + 0.1 * 10.0)
    assert losses.wasserstein_generator_loss(fake).item() == pytest.approx(0.0)


def test_ema_update_arithmetic():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = GeneratorEMA(model, decay=0.9)
    start = [p.detach().clone() for p in model.parameters()]
    assert ema.current_decay() == 0.0  # EMAModel: the first update copies the weights
    ema.update(model)
    for mine, theirs in zip(ema.module.parameters(), start):
        assert torch.allclose(mine, theirs)
    for n in range(2, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        model.train()(torch.randn(4, 3))  # moves the BatchNorm running statistics
        decay = ema.current_decay()
        assert decay == pytest.approx(min(0.9, n / (n + 9)))  # diffusers' warm-up (1+k)/(10+k), k = n-1
        before = [p.detach().clone() for p in ema.module.parameters()]
        ema.update(model)
        for mine, old, new in zip(ema.module.parameters(), before, model.parameters()):
            assert torch.allclose(mine, decay * old + (1 - decay) * new, atol=1e-6)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert ema.num_updates == 4
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_optimizer_state_round_trips_without_pickle():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.0, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    tensors, meta = flatten_optimizer_state(optimizer, "g")
    assert all(k.startswith("g.") for k in tensors)
    restored_model = nn.Linear(3, 2)
    restored = torch.optim.Adam(restored_model.parameters(), lr=0.5)
    restored.load_state_dict(unflatten_optimizer_state(tensors, meta, "g"))
    assert restored.param_groups[0]["lr"] == 1e-3 and restored.param_groups[0]["betas"] == (0.0, 0.9)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(restored.state[restored_model.weight][key], optimizer.state[model.weight][key])
