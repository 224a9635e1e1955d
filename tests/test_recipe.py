"""The quality recipe's pieces: caption variants, their cache and sampling, jitter that spares the background."""

import logging
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from tiny import tiny_text_encoder

from pokediff.config import load_config
from pokediff.data import SpriteDataset, SpriteTransform, load_splits
from pokediff.data.captions import SHAPE_PHRASES, body_description, caption_variants
from pokediff.eval.color import color_in_text
from pokediff.training.stage2_unet import LatentTextCache, build_cache, encode_texts, log_latent_range, shift_images

BULBASAUR = {
    "name": "Bulbasaur",
    "types": "grass|poison",
    "genus": "Seed Pokémon",
    "color": "green",
    "shape": "quadruped",
    "flavor_text": "A strange seed was planted on its back at birth. The plant sprouts and grows with this Pokémon.",
}


def test_caption_variants_name_the_colour_first_and_keep_the_dataset_caption():
    variants = caption_variants(BULBASAUR, "Bulbasaur, the Seed Pokémon. A green grass ...")
    assert variants[0] == "Bulbasaur, the Seed Pokémon. A green grass ..."
    assert len(variants) == len(set(variants)) >= 6
    assert all(color_in_text(v) == "green" for v in variants)
    assert any(v.startswith("a green grass and poison type creature") for v in variants)
    assert any("with a four-legged body" in v for v in variants)
    assert any("a green seed pokémon" in v for v in variants)
    assert any("on its back at birth" in v for v in variants)  # the body sentence of the flavour text
    assert sum("Bulbasaur" in v for v in variants) == 2  # with and without the name


def test_caption_variants_without_metadata_fall_back_to_the_caption():
    assert caption_variants({}, "a caption") == ["a caption"]
    assert caption_variants({"color": "red"}, "a caption") == ["a caption"]  # no types: no template


def test_body_description_picks_a_body_sentence_and_cuts_it():
    text = "It loves to nap. The flame on its tail shows its life force and burns brighter when it is angry today."
    assert body_description(text) == "the flame on its tail shows its life force and burns brighter when it"
    assert body_description("It lives in caves.") == ""
    assert set(SHAPE_PHRASES) >= {"upright", "quadruped", "wings", "fish", "blob"}


def _cfg(root, **data):
    return load_config(
        overrides={"data.root": str(root), "data.resolution": 32, **{f"data.{k}": v for k, v in data.items()}}
    )


def test_training_dataset_draws_caption_variants_and_eval_keeps_the_caption(tiny_data_root):
    cfg = _cfg(tiny_data_root, caption_variants=True)
    split = load_splits(cfg.data)["train"]
    train, val = SpriteDataset(split, cfg.data, train=True), SpriteDataset(split, cfg.data, train=False)
    assert all(len(v) > 1 for v in train.caption_variants)
    torch.manual_seed(0)
    drawn = {train[0]["text"] for _ in range(30)}
    assert len(drawn) > 2 and drawn <= set(train.caption_variants[0])
    assert {val[0]["text"] for _ in range(5)} == {val.captions[0]}
    plain = SpriteDataset(split, _cfg(tiny_data_root).data, train=True)
    assert plain.caption_variants == [[c] for c in plain.captions]


def test_latent_text_cache_samples_each_sprites_own_variants():
    counts = torch.tensor([1, 3, 2])
    rows = int(counts.sum())
    embeddings = torch.arange(rows, dtype=torch.float32).view(rows, 1, 1).expand(rows, 2, 4).clone()
    masks = torch.ones(rows, 2, dtype=torch.long)
    cache = LatentTextCache(
        torch.zeros(6, 4, 2, 2),
        torch.ones(6, 4, 2, 2),
        embeddings,
        masks,
        torch.zeros(1, 2, 4),
        torch.ones(1, 2, dtype=torch.long),
        counts,
    )
    assert cache.num_captions == 3 and len(cache) == 6  # entries 3..5 are the mirrored sprites
    first, _ = cache.text(torch.tensor([0, 1, 2, 4]))
    assert first[:, 0, 0].tolist() == [0.0, 1.0, 4.0, 1.0]  # the dataset caption of each sprite
    torch.manual_seed(0)
    index = torch.tensor([0, 1, 2, 3, 4, 5] * 50)
    drawn, _ = cache.sample_text(index)
    row = drawn[:, 0, 0].long()
    allowed = {0: {0}, 1: {1, 2, 3}, 2: {4, 5}}
    for i, r in zip(index.tolist(), row.tolist()):
        assert r in allowed[i % 3]
    assert set(row.tolist()) == {0, 1, 2, 3, 4, 5}  # every variant is reachable


def test_latent_range_reports_the_clamped_fraction():
    mean = torch.zeros(10, 2, 4, 4)
    mean[0, 0] = 10.0  # 16 of 320 elements beyond the clamp once scaled
    cache = LatentTextCache(
        mean, torch.ones_like(mean), torch.zeros(10, 1, 4), torch.ones(10, 1), torch.zeros(1, 1, 4), torch.ones(1, 1)
    )
    assert log_latent_range(cache, lambda z: z * 0.5, clamp=3.0) == pytest.approx(16 / 320)


def test_colour_jitter_tints_the_sprite_but_never_the_background(tiny_data_root):
    cfg = _cfg(
        tiny_data_root,
        **{"augmentation.color_jitter": [0.5, 0.5, 0.5, 0.1], "augmentation.rotation": 10.0, "augmentation.hflip": 0.5},
    )
    sprite = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    sprite.paste(Image.new("RGBA", (12, 12), (40, 160, 60, 255)), (10, 10))
    transform = SpriteTransform(cfg.data, train=True)
    torch.manual_seed(0)
    changed = 0
    for _ in range(10):
        x = transform(sprite)
        assert torch.equal(x[:, :4, :4], torch.ones(3, 4, 4))  # background (and rotated corners) stay white
        changed += not torch.allclose(x[:, 16, 16], SpriteTransform(cfg.data, train=False)(sprite)[:, 16, 16])
    assert changed >= 5


def test_per_channel_latent_scaling_round_trips_and_whitens_each_channel():
    from tiny import tiny_vae

    from pokediff.training.stage1_vae import latent_statistics

    vae = tiny_vae().eval()
    torch.manual_seed(0)
    images = torch.rand(12, 3, vae.config.sample_size, vae.config.sample_size) * 2 - 1
    images[:, 0] *= 0.2  # channels of unequal spread
    loader = [{"pixel_values": images[i : i + 4]} for i in range(0, 12, 4)]
    mean, std, overall = latent_statistics(vae, loader, "cpu", seed=0)
    assert len(mean) == len(std) == vae.config.latent_channels and overall > 0

    z = torch.randn(3, vae.config.latent_channels, 4, 4)
    vae.register_to_config(scaling_factor=0.5)
    assert torch.allclose(vae.scale_latents(z), z * 0.5)  # no statistics: one global factor, as before
    assert torch.allclose(vae.unscale_latents(vae.scale_latents(z)), z, atol=1e-6)

    vae.register_to_config(scaling_factor=1.0, latents_mean=mean, latents_std=std)
    assert torch.allclose(vae.unscale_latents(vae.scale_latents(z)), z, atol=1e-5)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        samples = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    scaled = vae.scale_latents(samples).transpose(0, 1).flatten(1)
    assert torch.allclose(scaled.mean(dim=1), torch.zeros(len(mean)), atol=1e-4)
    assert torch.allclose(scaled.std(dim=1, unbiased=False), torch.ones(len(mean)), atol=1e-3)


def test_encode_texts_warns_once_and_matches_one_at_a_time_encoding(caplog):
    tokenizer, encoder = tiny_text_encoder()
    captions = [f"a {colour} creature " + "with a long tail " * 8 for colour in ("red", "blue", "green")] + ["a cat"]
    with caplog.at_level(logging.WARNING):
        embeds, masks = encode_texts(tokenizer, encoder, captions, max_length=16, device="cpu", batch_size=2)
    assert caplog.text.count("longer than 16 tokens") == 1 and "3 of 4 captions" in caplog.text
    assert embeds.shape == (4, 16, encoder.config.hidden_size) and masks.shape == (4, 16)
    for i, caption in enumerate(captions):
        alone, alone_mask = encode_texts(tokenizer, encoder, [caption], max_length=16, device="cpu")
        assert torch.equal(alone_mask[0], masks[i])
        torch.testing.assert_close(alone[0], embeds[i], atol=1e-5, rtol=1e-5)


def test_shift_images_moves_each_image_and_fills_with_the_background():
    images = torch.full((2, 3, 8, 8), 1.0)
    images[:, :, 5, 5] = -1.0  # one dark pixel on white
    images[1, :, 0, :] = 0.0  # a grey top row that a downward shift pushes in from the edge
    moved = shift_images(images, torch.tensor([[2, -1], [1, 0]]), torch.ones(1, 3, 1, 1))
    assert moved.shape == images.shape
    assert (moved[0, :, 7, 4] == -1).all() and (moved[0] == -1).sum() == 3  # down 2, left 1
    assert (moved[1, :, 6, 5] == -1).all() and (moved[1, :, 1, :] == 0).all()  # down 1: the grey row follows
    assert (moved[1, :, 0, :] == 1).all()  # what came in from outside is background


class _IdentityVAE:
    """Encodes an image as itself (mean) with std 1, so the cache's rows can be compared with pixels."""

    def encode(self, pixels):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=pixels, std=torch.ones_like(pixels)))


def test_cache_holds_mirrors_and_seeded_shifted_copies_in_sprite_order(tiny_data_root):
    cfg = _cfg(tiny_data_root)
    dataset = SpriteDataset(load_splits(cfg.data)["train"], cfg.data, train=False)
    tokenizer, encoder = tiny_text_encoder()

    def build(seed):
        return build_cache(
            _IdentityVAE(), tokenizer, encoder, dataset, 16, "cpu", flips=True, batch_size=3, shifted_copies=2,
            shift_pixels=2, seed=seed,
        )  # fmt: skip

    cache = build(seed=0)
    n = len(dataset)
    assert len(cache) == n * 2 * 3 and cache.num_captions == n  # entry i is sprite i % n
    plain = torch.stack([dataset[i]["pixel_values"] for i in range(n)])
    versions = cache.mean.view(6, n, *plain.shape[1:])
    assert torch.equal(versions[0], plain) and torch.equal(versions[1], plain.flip(-1))
    white = torch.ones(1, 3, 1, 1)
    offsets = [torch.tensor([[dy, dx]]) for dy in range(-2, 3) for dx in range(-2, 3)]
    for block, source in ((2, plain), (3, plain.flip(-1)), (4, plain), (5, plain.flip(-1))):
        for i in range(n):  # each copy is its own sprite (or mirror) moved by at most 2 pixels
            assert any(torch.equal(versions[block, i], shift_images(source[i : i + 1], o, white)[0]) for o in offsets)
    assert not torch.equal(versions[2], versions[4])  # two copies, two draws
    assert torch.equal(build(seed=0).mean, cache.mean) and not torch.equal(build(seed=1).mean, cache.mean)
