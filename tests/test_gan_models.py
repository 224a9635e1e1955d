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
from pokediff.gan.progan import EqualizedConv2d, ProGANDiscriminator, ProGANGenerator, progan_phase, progan_stage
from pokediff.gan.registry import build_models
from pokediff.gan.vitgan import (
    L2SelfAttention,
    ViTGANDiscriminator,
    ViTGANGenerator,
    improved_spectral_norm,
    l2_attention_lipschitz_bound,
)
from pokediff.gan.wgan_large import WGANLargeCritic, WGANLargeGenerator
from pokediff.gan.wgan_small import WGANSmallCritic

TINY = {
    "model.g_features": 4,
    "model.d_features": 4,
    "model.g_max_features": 16,
    "model.d_max_features": 16,
    "model.latent_dim": 8,
    "model.attention_resolution": 8,
    "progan.resolutions": [8, 16],
    "model.resolution": 16,
}
MODELS = ["dcgan", "cdcgan", "wgan_small", "wgan_large", "progan", "vitgan"]


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


# ------------------------------------------------------------------------------------------ vitgan
def test_vitgan_works_at_64_and_32_px_with_a_clear_error_otherwise():
    torch.manual_seed(0)
    for resolution, patch in ((64, 8), (32, 4)):
        generator = ViTGANGenerator(resolution, 8, patch, dim=8, depth=1, num_heads=2, decoder_channels=4)
        discriminator = ViTGANDiscriminator(resolution, patch, patch // 4, dim=8, depth=1, num_heads=2)
        images = generator(torch.randn(2, 8))
        assert images.shape == (2, 3, resolution, resolution) and images.abs().max() <= 1.0
        assert discriminator(images).shape == (2,)
    with pytest.raises(ValueError, match="resolution 60 must be a multiple of model.patch_size 8"):
        ViTGANGenerator(resolution=60)
    with pytest.raises(ValueError, match="width 10 is not a multiple of model.num_heads 4"):
        ViTGANDiscriminator(resolution=32, patch_size=4, dim=10, num_heads=4)
    with pytest.raises(ValueError, match=r"images are \(16, 16\) but the model works at 32px"):
        ViTGANDiscriminator(resolution=32, patch_size=4, dim=8, num_heads=2)(torch.randn(1, 3, 16, 16))


def test_vitgan_discriminator_has_overlapping_patches_isn_and_tied_l2_attention():
    discriminator = ViTGANDiscriminator(resolution=32, patch_size=8, patch_overlap=2, dim=8, depth=2, num_heads=2)
    embed = discriminator.patch_embedding
    assert embed.kernel_size == (12, 12) and embed.stride == (8, 8) and embed.padding == (2, 2)  # P + 2o every P
    layers = [m for m in discriminator.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(layers) == 1 + 2 * (3 + 2) + 1  # patch embedding, per block q=k, v, out, 2 MLP, head
    for layer in layers:  # ISN everywhere: spectral norm, then the initial sigma as a fixed factor
        assert [type(p).__name__ for p in layer.parametrizations.weight] == ["_SpectralNorm", "_ScaleBy"]
    attention = discriminator.blocks[0].attention
    assert isinstance(attention, L2SelfAttention) and not hasattr(attention, "key")  # one matrix for q and k
    assert not any(isinstance(m, nn.BatchNorm2d) for m in discriminator.modules())


def test_improved_spectral_norm_keeps_the_initial_scale():
    torch.manual_seed(0)
    layer = nn.Linear(16, 16)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    sigma_init = torch.linalg.matrix_norm(layer.weight.detach(), ord=2).item()
    improved_spectral_norm(layer)
    assert layer.parametrizations.weight[1].factor.item() == pytest.approx(sigma_init)
    for _ in range(30):  # power iterations (training mode) after a big change of the raw weight
        layer(torch.randn(2, 16))
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(10.0)
    for _ in range(30):
        layer(torch.randn(2, 16))
    # plain spectral norm would give 1; ISN keeps sigma(W_init), whatever the raw weight does
    assert torch.linalg.matrix_norm(layer.weight.detach(), ord=2).item() == pytest.approx(sigma_init, rel=1e-3)


def _dot_product_attention(attention: L2SelfAttention, x):
    """The same weights as ordinary (untied-form) dot-product attention: what the bound must NOT cover."""
    b, n, d = x.shape
    q, v = attention._heads(attention.query_key(x)), attention._heads(attention.value(x))
    weights = (q @ q.transpose(-1, -2) / math.sqrt(d // attention.num_heads)).softmax(-1)
    return attention.out((weights @ v).transpose(1, 2).reshape(b, n, d))


def test_l2_attention_is_lipschitz_bounded_as_kim_et_al_prove():
    torch.manual_seed(0)
    num_tokens, dim = 9, 8
    attention = L2SelfAttention(dim, num_heads=2, use_isn=False)
    with torch.no_grad():  # a sharp attention (big query/key weights) to make the check demanding
        attention.query_key.weight.mul_(3.0)
    bound = l2_attention_lipschitz_bound(attention, num_tokens)
    attention.double()
    worst, dot_product_worst = 0.0, 0.0
    with torch.no_grad():
        for scale in (0.1, 1.0, 10.0, 100.0):
            for eps in (1e-3, 1.0):
                for trial in range(40):
                    x = torch.randn(1, num_tokens, dim, dtype=torch.float64) * scale
                    dx = torch.randn_like(x) * eps * scale
                    if trial % 2:  # Kim et al.'s worst case for dot products: one token at 0, only it moves
                        x[:, 0], dx[:, 1:] = 0.0, 0.0
                    ratio = ((attention(x + dx) - attention(x)).norm() / dx.norm()).item()
                    worst = max(worst, ratio)
                    dot = _dot_product_attention(attention, x + dx) - _dot_product_attention(attention, x)
                    dot_product_worst = max(dot_product_worst, (dot.norm() / dx.norm()).item())
    assert 0 < worst < bound
    assert dot_product_worst > bound  # the check has teeth: dot-product attention breaks the bound


def test_vitgan_generator_is_driven_by_the_noise_through_sln():
    torch.manual_seed(0)
    generator = ViTGANGenerator(16, 8, 4, dim=8, depth=1, num_heads=2, decoder_channels=4).eval()
    z = torch.randn(2, 8)
    images = generator(z)
    assert not torch.allclose(images[0], images[1])
    assert torch.allclose(generator(z[:1]), images[:1], atol=1e-6)  # no batch coupling
    # the input sequence is the learned position embedding; z only enters through SLN's scale and shift
    sln = generator.blocks[0].norm1
    with torch.no_grad():
        for layer in [b.norm1.affine for b in generator.blocks] + [b.norm2.affine for b in generator.blocks]:
            layer.weight.zero_()
        generator.norm.affine.weight.zero_()
    assert isinstance(sln.norm, nn.LayerNorm) and not sln.norm.elementwise_affine
    flat = generator(z)
    assert torch.allclose(flat[0], flat[1], atol=1e-6)


# -------------------------------------------------------------------------------- cdcgan N+1 head
def test_n_plus_one_head_gives_n_plus_one_logits():
    generator, discriminator = tiny_models("cdcgan", **{"model.discriminator": "n_plus_one"})
    assert type(discriminator).__name__ == "NPlusOneDiscriminator"
    labels = torch.tensor([0, 5, 17])
    logits, features = discriminator(generator(torch.randn(3, 8), labels), labels, return_features=True)
    assert logits.shape == (3, 19) and features.shape[0] == 3
    with pytest.raises(ValueError, match=r"\[0, 18\)"):
        discriminator(torch.randn(1, 3, 16, 16), torch.tensor([18]))
    assert type(tiny_models("cdcgan")[1]).__name__ == "ProjectionDiscriminator"  # the default stays


def test_n_plus_one_losses():
    torch.manual_seed(0)
    logits_real, logits_fake = torch.randn(4, 19), torch.randn(4, 19)
    labels = torch.tensor([0, 3, 17, 3])
    ones, zeros = torch.ones(4), torch.zeros(4)

    def nll(logits, classes):  # by hand: -log softmax at the class
        return -(logits.log_softmax(1)[torch.arange(4), classes]).mean()

    fake_class = torch.full((4,), 18)
    d_loss = losses.n_plus_one_discriminator_loss(logits_real, logits_fake, labels, ones, zeros)
    assert d_loss.item() == pytest.approx((nll(logits_real, labels) + nll(logits_fake, fake_class)).item(), rel=1e-6)
    assert losses.n_plus_one_generator_loss(logits_fake, labels).item() == pytest.approx(
        nll(logits_fake, labels).item(), rel=1e-6
    )
    soft = losses.n_plus_one_targets(labels, torch.tensor([0.9, 0.8, 0.1, 1.0]), 19)
    assert torch.allclose(soft.sum(1), torch.ones(4))
    assert soft[0, 0] == pytest.approx(0.9) and soft[0, 18] == pytest.approx(0.1) and soft[2, 17] == pytest.approx(0.1)
    realness = losses.n_plus_one_realness(logits_real)
    probs = logits_real.softmax(1)
    assert torch.allclose(realness, (probs[:, :18].sum(1) / probs[:, 18]).log(), atol=1e-5)


def test_n_plus_one_config_errors():
    with pytest.raises(ConfigError, match="needs model.name=cdcgan"):
        load_gan_config(overrides={"model.name": "dcgan", "model.discriminator": "n_plus_one"})
    with pytest.raises(ConfigError, match="needs train.loss=bce"):
        load_gan_config(overrides={"model.name": "cdcgan", "model.discriminator": "n_plus_one", "train.loss": "wgan"})
    with pytest.raises(ConfigError, match="model.discriminator 'n_plus_1' is not one of projection, n_plus_one"):
        load_gan_config(overrides={"model.name": "cdcgan", "model.discriminator": "n_plus_1"})


# ------------------------------------------------------------------------- progan resolution cycling
def test_progan_phase_goes_down_and_up_with_fade_in_and_its_own_lr():
    phases = [(64, 10, 2e-4), (128, 20, 1e-4), (64, 10, 2e-4)]
    assert progan_phase(0, phases, 0.5, False) == (64, 1.0, 2e-4)
    assert progan_phase(10, phases, 0.5, False) == (128, 0.0, 1e-4)  # up: fade in over 0.5 * 20 steps
    assert progan_phase(15, phases, 0.5, False) == (128, pytest.approx(0.5), 1e-4)
    assert progan_phase(20, phases, 0.5, False) == (128, 1.0, 1e-4)
    assert progan_phase(30, phases, 0.5, False) == (64, 1.0, 2e-4)  # down: no fade-in
    assert progan_phase(500, phases, 0.5, False) == (64, 1.0, 2e-4)  # past the end: the last phase
    assert progan_phase(40, phases, 0.5, True) == (64, 1.0, 2e-4)  # cycle: 64 -> 64, nothing to fade
    assert progan_phase(50, phases, 0.5, True) == (128, 0.0, 1e-4)
    wrap = [(64, 10, 2e-4), (32, 10, 4e-4)]
    assert progan_phase(20, wrap, 0.5, True) == (64, 0.0, 2e-4)  # cycling back up from 32 fades in
    assert progan_phase(0, wrap, 0.5, True) == (64, 1.0, 2e-4)  # but not at the very start
    assert progan_phase(10, phases, 0.0, False) == (128, 1.0, 1e-4)  # fade_in 0: abrupt


def test_progan_schedule_from_the_command_line_and_its_errors(capsys):
    from pokediff.gan import train as gan_train

    argv = ["--model", "progan", "progan.schedule=[[64,50,2e-4],[128,200,1e-4],[64,50,2e-4]]"]
    cfg, _, _ = gan_train.config_from_args(gan_train.build_parser().parse_args(argv))
    assert cfg.progan.schedule == [[64, 50, 2e-4], [128, 200, 1e-4], [64, 50, 2e-4]]  # '2e-4' read as a number
    assert build_models(cfg)[0].config.start_resolution == 64  # the smallest phase, not progan.resolutions
    bad = {  # value -> the start of the one error line
        "[[48,5,1e-4]]": "progan.schedule[0]: resolution 48 is not a stage of this model (model.resolution 128)",
        "[[256,5,1e-4]]": "progan.schedule[0]: resolution 256 is not a stage",
        "[[64,0,1e-4]]": "progan.schedule[0]: epochs must be a positive whole number, got 0",
        "[[64,5,-1e-4]]": "progan.schedule[0]: lr must be a finite number > 0",
        "[[64,5,.nan]]": "progan.schedule[0]: lr must be a finite number > 0",
        "[[64,5]]": "progan.schedule[0] must be [resolution, epochs, lr], got [64, 5]",
        "[[32,5,1e-4],[128,5,1e-4]]": "progan.schedule[1] goes up from 32 to 128: go up one doubling at a time",
    }
    for value, message in bad.items():
        with pytest.raises(SystemExit) as exit_info:
            gan_train.main(["--model", "progan", f"progan.schedule={value}"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, (value, err)
    with pytest.raises(ConfigError, match="would go up from its last phase \\(32\\) to its first \\(128\\)"):
        load_gan_config(
            overrides={
                "model.name": "progan",
                "model.resolution": 128,
                "progan.cycle": True,
                "progan.schedule": [[128, 1, 1e-4], [64, 1, 1e-4], [32, 1, 1e-4]],
            }
        )
