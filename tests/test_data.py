import csv
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from pokediff.config import load_config
from pokediff.data import (
    BadDataError,
    SpriteDataset,
    SpriteTransform,
    build_dataloader,
    composite_on_background,
    data_stats,
    diff_augment,
    drop_captions,
    load_splits,
    load_sprite_dataset,
    pad_to_square_and_resize,
    split_assignment,
    split_dataset,
    tokenize_captions,
    trim_to_alpha,
)
from pokediff.models.text import load_text_encoder


def data_cfg(root, **overrides):
    return load_config(overrides={"data.root": str(root), **{f"data.{k}": v for k, v in overrides.items()}}).data


def rgba_sprite(size=(40, 20), colour=(200, 30, 30)):
    """A transparent canvas holding an opaque rectangle; transparent pixels hold black RGB."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (10, 6), colour + (255,)), (5, 4))
    return image


def test_transparent_pixels_become_the_background_colour():
    out = composite_on_background(rgba_sprite(), background=(10, 220, 30))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (10, 220, 30)  # was transparent black
    assert out.getpixel((6, 5)) == (200, 30, 30)  # opaque pixel untouched
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    assert composite_on_background(half, (255, 255, 255)).getpixel((0, 0)) == pytest.approx((127, 127, 127), abs=1)


def test_pad_resize_keeps_aspect_and_pads_with_background():
    out = pad_to_square_and_resize(Image.new("RGB", (40, 20), (0, 0, 0)), 32, background=(255, 255, 255))
    assert out.size == (32, 32)
    arr = np.asarray(out)
    assert (arr[0] == 255).all() and (arr[-1] == 255).all()  # top and bottom bands padded
    assert (arr[16] == 0).all()  # the content fills the width


def test_trim_crops_to_alpha_bbox():
    assert trim_to_alpha(rgba_sprite()).size == (10, 6)


def test_sprite_transform_range_shape_and_background(tiny_data_root):
    cfg = data_cfg(tiny_data_root, resolution=64, background=[255, 255, 255])
    x = SpriteTransform(cfg, train=False)(rgba_sprite())
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[:, 0, 0], torch.ones(3))  # white background -> +1


def test_augmentation_only_in_training(tiny_data_root):
    cfg = data_cfg(tiny_data_root, resolution=32)
    sprite = rgba_sprite((32, 32))
    eval_tf = SpriteTransform(cfg, train=False)
    assert eval_tf.train is False
    assert torch.equal(eval_tf(sprite), eval_tf(sprite))
    train_tf = SpriteTransform(cfg, train=True)
    torch.manual_seed(0)
    assert any(not torch.equal(train_tf(sprite), eval_tf(sprite)) for _ in range(5))
    assert SpriteTransform(data_cfg(tiny_data_root, augment=False), train=True).train is False


def test_split_is_deterministic_and_stable_when_rows_are_added():
    keys = [f"{i:04d}.webp" for i in range(1000)]
    first = split_assignment(keys, seed=9, fractions=[0.8, 0.15, 0.05])
    assert first == split_assignment(keys, seed=9, fractions=[0.8, 0.15, 0.05])
    grown = split_assignment(keys + ["new1.webp", "new2.webp"], seed=9, fractions=[0.8, 0.15, 0.05])
    assert grown[:1000] == first
    assert first != split_assignment(keys, seed=10, fractions=[0.8, 0.15, 0.05])
    counts = {s: first.count(s) for s in ("train", "val", "test")}
    assert 740 < counts["train"] < 860 and 110 < counts["val"] < 190 and counts["test"] > 25
    with pytest.raises(ValueError, match="split_fractions"):
        split_assignment(keys, 0, [0.8, 0.3, 0.05])


def test_bundled_data_splits_80_15_5():
    cfg = load_config().data
    splits = split_dataset(load_sprite_dataset(cfg), cfg)
    sizes = {k: len(v) for k, v in splits.items()}
    assert sum(sizes.values()) == 905
    assert sizes == {"train": 725, "val": 136, "test": 44}


def test_filters_by_type_and_generation(tiny_data_root):
    ds = load_sprite_dataset(data_cfg(tiny_data_root, filter_types=["grass"]))
    assert len(ds) > 0 and all("grass" in t.split("|") for t in ds["types"])
    with pytest.raises(ValueError, match="no rows left"):
        load_sprite_dataset(data_cfg(tiny_data_root, filter_generations=[8]))


def test_dataloader_batches(tiny_data_root):
    cfg = data_cfg(tiny_data_root, resolution=48)
    batch = next(iter(build_dataloader(cfg, "train", batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 48, 48)
    assert len(batch["text"]) == 4 and all(isinstance(t, str) and t for t in batch["text"])
    assert batch["type_id"].dtype == torch.long and (batch["type_id"] >= 0).all()
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataloader(cfg, "validation", batch_size=4)


def test_cached_sprites_give_the_same_items_and_stay_unmodified(tiny_data_root):
    cached_cfg = data_cfg(tiny_data_root, resolution=32, cache_images=True)
    split = load_splits(cached_cfg)["train"]
    for train in (False, True):
        cached = SpriteDataset(split, cached_cfg, train=train)
        plain = SpriteDataset(split, data_cfg(tiny_data_root, resolution=32, cache_images=False), train=train)
        for epoch in range(2):  # the second epoch reads the cache, after the first one's augmentations
            for index in range(3):
                torch.manual_seed(100 * epoch + index)
                expected = plain[index]["pixel_values"]
                torch.manual_seed(100 * epoch + index)
                assert torch.equal(cached[index]["pixel_values"], expected)
        assert sorted(cached._prepared) == [0, 1, 2] and plain._prepared == {}


def test_tokenizer_max_length_and_truncation_warning(caplog):
    tokenizer, _ = load_text_encoder("sentence-transformers/all-MiniLM-L6-v2")
    with caplog.at_level(logging.WARNING):
        out = tokenize_captions(tokenizer, ["a small green creature", "word " * 100], max_length=32)
    assert out["input_ids"].shape == (2, 32)
    assert out["attention_mask"][0].sum() < 32 and out["attention_mask"][1].sum() == 32
    assert "1 of 2 captions are longer than 32 tokens" in caplog.text
    assert tokenize_captions(tokenizer, ["x"], max_length=128)["input_ids"].shape == (1, 128)
    with pytest.raises(ValueError, match="exceeds the tokenizer's limit"):
        tokenize_captions(tokenizer, ["x"], max_length=10_000)


def test_caption_dropout():
    import random

    captions = [f"caption {i}" for i in range(2000)]
    dropped = drop_captions(captions, 0.1, random.Random(0))
    assert 150 < dropped.count("") < 250
    assert drop_captions(captions, 0.0) == captions
    with pytest.raises(ValueError, match="caption_dropout"):
        drop_captions(captions, 1.5)


def test_diff_augment_differentiable_and_reproducible():
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    out = diff_augment(x, generator=torch.Generator().manual_seed(1))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    again = diff_augment(x.detach(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.detach(), again)
    with pytest.raises(ValueError, match="unknown DiffAugment policy 'blur'"):
        diff_augment(x, "color,blur")


# ------------------------------------------------------------------------------------------ bad data
def _rewrite_rows(root, edit):
    path = root / "metadata.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows, fields = list(reader), reader.fieldnames
    edit(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("fault", ["corrupt", "missing", "no_caption"])
def test_bad_rows_raise_naming_the_file_or_are_skipped_and_counted(data_subset, fault):
    root = data_subset(6)
    if fault == "corrupt":
        (root / "images" / "0003.webp").write_bytes(b"not an image at all")
        expected = r"cannot read image .*0003\.webp"
    elif fault == "missing":
        (root / "images" / "0003.webp").unlink()
        expected = r"missing: .*0003\.webp"
    else:
        _rewrite_rows(root, lambda rows: rows[2].update(text=""))
        expected = r"0003\.webp.*has no caption"
    with pytest.raises(BadDataError, match=expected):
        load_sprite_dataset(data_cfg(root))
    ds, problems = load_sprite_dataset(data_cfg(root, skip_bad_images=True), return_problems=True)
    assert len(ds) == 5 and len(problems) == 1 and "0003.webp" in problems[0]


def test_missing_folder_and_non_imagefolder(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        load_sprite_dataset(data_cfg(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no metadata.csv"):
        load_sprite_dataset(data_cfg(tmp_path))


def test_hub_name_offline_fails_fast(tiny_data_root, monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = data_cfg(tiny_data_root)
    cfg.dataset_name = "someone/not-cached-anywhere"
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="not in the local cache and HF_HUB_OFFLINE=1"):
        load_sprite_dataset(cfg)
    assert time.monotonic() - start < 10


def test_data_stats_summary(tiny_data_root):
    tokenizer, _ = load_text_encoder("sentence-transformers/all-MiniLM-L6-v2")
    stats = data_stats(data_cfg(tiny_data_root), tokenizer)
    assert stats["rows"] == 24 and sum(stats["splits"].values()) == 24
    assert stats["image_sizes"] == {"215x215": 24}
    assert stats["caption_tokens"]["max"] >= stats["caption_tokens"]["min"] > 0
    assert sum(stats["colors"].values()) == 24 and "grass" in stats["types"]
