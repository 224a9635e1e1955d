"""Domain CLIP (offline) and the CLIP scorer: learning, save/load, retrieval metrics, clear errors."""

import math

import pytest
import torch
from tiny import save_tiny_text_encoder

from pokediff.config import ClipConfig, load_config
from pokediff.models import clip as clip_mod
from pokediff.models.clip import (
    ClipUnavailableError,
    DomainClipTooWeakError,
    build_domain_clip,
    check_domain_clip,
    fit_domain_clip,
    load_clip_scorer,
    load_domain_clip,
    retrieval_accuracy,
    save_domain_clip,
)

CAPTIONS = [
    "A red fire type Pokémon.",
    "A blue water type Pokémon.",
    "A green grass type Pokémon.",
    "A yellow electric type Pokémon.",
    "A purple poison type Pokémon.",
    "A brown ground type Pokémon.",
]
COLOURS = [(1, -1, -1), (-1, -1, 1), (-1, 1, -1), (1, 1, -1), (0.5, -1, 0.5), (0.2, -0.3, -0.8)]


def tiny_clip_cfg(**kw) -> ClipConfig:
    cfg = ClipConfig(
        domain_embed_dim=16,
        domain_hidden_dim=32,
        domain_image_size=32,
        domain_batch_size=6,
        domain_epochs=2,
        domain_learning_rate=1e-2,
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def coloured_sprites() -> torch.Tensor:
    """One flat-coloured blob on white per caption, (6, 3, 48, 48) in [-1, 1]."""
    x = torch.ones(len(COLOURS), 3, 48, 48)
    for i, c in enumerate(COLOURS):
        x[i, :, 12:36, 12:36] = torch.tensor(c).view(3, 1, 1)
    return x


@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
    return save_tiny_text_encoder(tmp_path_factory.mktemp("clip_text"))


@pytest.fixture(scope="module")
def trained_clip(text_path):
    """A tiny domain CLIP whose heads were fitted on the coloured batch; returns (model, tokenizer, losses)."""
    from open_clip.loss import ClipLoss

    from pokediff.data import tokenize_captions

    torch.manual_seed(0)
    model, tokenizer = build_domain_clip(text_path, tiny_clip_cfg(), max_text_length=16)
    tokens = tokenize_captions(tokenizer, CAPTIONS, 16)
    images = coloured_sprites()
    with torch.no_grad():
        model.fit_feature_stats(
            model.visual.backbone_features(images),
            model.text_backbone_features(tokens["input_ids"], tokens["attention_mask"]),
        )
    optimizer = torch.optim.AdamW(model.head_parameters(), lr=1e-2)
    loss_fn = ClipLoss()
    model.train()
    losses = []
    for _ in range(40):
        out = model(images, tokens["input_ids"], tokens["attention_mask"])
        loss = loss_fn(**out)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), tokenizer, losses


def test_domain_clip_contrastive_loss_falls_and_only_heads_train(text_path, trained_clip):
    model, _, losses = trained_clip
    assert losses[0] > math.log(len(CAPTIONS)) * 0.5  # starts near chance
    assert losses[-1] < 0.3 * losses[0]
    fresh, _ = build_domain_clip(text_path, tiny_clip_cfg(), max_text_length=16)
    # frozen trunks are untouched by the fit
    for name, p in model.text.transformer.state_dict().items():
        assert torch.equal(p, fresh.text.transformer.state_dict()[name]), name
    for name, p in model.visual.trunk.state_dict().items():
        assert torch.equal(p, fresh.visual.trunk.state_dict()[name]), name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("text.proj", "visual.proj", "logit_scale")) for n in trainable)


def test_domain_clip_round_trip(tmp_path, trained_clip):
    model, tokenizer, _ = trained_clip
    metrics = {"top1": 0.5, "chance_top1": 1 / 6, "n": 6}
    path = save_domain_clip(model, tokenizer, tmp_path / "domain_clip", metrics)
    assert (path / "config.json").is_file()
    assert list(path.glob("*.safetensors"))
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt*"))  # no pickles
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write cleaned up
    loaded, loaded_tok, loaded_metrics = load_domain_clip(path)
    assert loaded_metrics == metrics
    for name, p in model.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name]), name
    from pokediff.data import tokenize_captions

    tokens = tokenize_captions(loaded_tok, CAPTIONS, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(coloured_sprites()), model.encode_image(coloured_sprites()))
        torch.testing.assert_close(
            loaded.encode_text(tokens["input_ids"], tokens["attention_mask"]),
            model.encode_text(tokens["input_ids"], tokens["attention_mask"]),
        )


def test_a_blurring_domain_clip_cannot_see_fine_texture_and_keeps_its_blur(tmp_path, text_path):
    """clip.domain_blur_sigma: the image tower blurs before its trunk, so a one-pixel checkerboard on a flat colour
    moves its features far less than without blur; the setting is saved with the folder; pixels still get gradients."""
    from pokediff.models.clip import build_domain_clip, gaussian_blur

    flat = torch.full((1, 3, 32, 32), 0.2)
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 0.6 - 0.3  # +-0.3, 1-pixel period
    textured = flat + checker
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)
    moves = {}
    for sigma in (0.0, 2.0):
        model, tokenizer = build_domain_clip(text_path, tiny_clip_cfg(domain_blur_sigma=sigma), max_text_length=16)
        with torch.no_grad():
            a, b = model.visual.backbone_features(flat), model.visual.backbone_features(textured)
        moves[sigma] = float((a - b).norm() / a.norm())
        if sigma:
            path = save_domain_clip(model, tokenizer, tmp_path / "blurred")
            loaded, _, _ = load_domain_clip(path)
            assert loaded.config.blur_sigma == 2.0 and loaded.visual.blur_sigma == 2.0
            px = textured.clone().requires_grad_(True)
            loaded.encode_image(px).sum().backward()
            assert px.grad.abs().sum() > 0
    assert moves[2.0] < 0.2 * moves[0.0], moves


def test_load_domain_clip_rejects_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a domain CLIP folder"):
        load_domain_clip(tmp_path)


def test_retrieval_accuracy_counts_ranks():
    feats = torch.eye(4)
    perfect = retrieval_accuracy(feats, feats, ks=(1, 2))
    assert perfect["top1"] == 1.0 and perfect["chance_top1"] == 0.25 and perfect["chance_top2"] == 0.5
    # each image's best caption is the next one's; its own caption comes second
    texts = feats + 2 * torch.roll(feats, 1, dims=0)
    shifted = retrieval_accuracy(feats, texts, ks=(1, 2))
    assert shifted["top1"] == 0.0 and shifted["top2"] == 1.0
    with pytest.raises(ValueError, match="matching"):
        retrieval_accuracy(feats, feats[:3])
    # rows 0 and 2 share caption "a": one candidate, which both retrieve first; row 1's own "b" ranks second
    images = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1.0]])
    texts = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 1.0]])
    shared = retrieval_accuracy(images, texts, ks=(1, 2), captions=["a", "b", "a", "c"])
    assert shared["candidates"] == 3 and shared["chance_top1"] == pytest.approx(1 / 3)
    assert shared["top1"] == 0.75 and shared["top2"] == 1.0


def test_check_domain_clip_stops_weak_models():
    weak = {"top1": 0.01, "top5": 0.04, "chance_top1": 0.0074, "n": 136}
    with pytest.raises(DomainClipTooWeakError, match="top-1 0.010.*chance is 0.007"):
        check_domain_clip(weak, 2.0)
    check_domain_clip(weak, 1.2)
    check_domain_clip(weak, 0)  # disabled


def _no_pretrained(monkeypatch):
    # make the test independent of a CLIP someone may have in their HF cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(clip_mod, "pretrained_clip_weights", lambda model, tag: None)


def test_scorer_errors_clearly_when_no_clip(tmp_path, monkeypatch):
    _no_pretrained(monkeypatch)
    with pytest.raises(ClipUnavailableError, match="HF_HUB_OFFLINE=1.*no domain CLIP at"):
        load_clip_scorer(model_dir=tmp_path)
    with pytest.raises(ClipUnavailableError, match="laion2b_s34b_b79k"):
        load_clip_scorer(model_dir=tmp_path, source="pretrained")
    with pytest.raises(ValueError, match="clip.source"):
        load_clip_scorer(model_dir=tmp_path, source="openai")


def test_pretrained_clip_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not an open_clip model"):
        clip_mod.pretrained_clip_weights("ViT-Nope", "laion2b_s34b_b79k")
    with pytest.raises(ValueError, match="not a tag"):
        clip_mod.pretrained_clip_weights("ViT-B-32", "no_such_tag")
    if clip_mod.pretrained_clip_weights("ViT-B-32", "laion2b_s34b_b79k") is None:
        with pytest.raises(ClipUnavailableError, match="not in the local cache"):
            clip_mod.load_pretrained_clip("ViT-B-32", "laion2b_s34b_b79k")


def test_scorer_finds_domain_clip_and_scores_matches_higher(tmp_path, monkeypatch, trained_clip):
    _no_pretrained(monkeypatch)
    model, tokenizer, _ = trained_clip
    save_domain_clip(model, tokenizer, tmp_path / "pipeline" / "domain_clip")
    for where in (tmp_path / "pipeline", tmp_path / "pipeline" / "domain_clip"):
        scorer = load_clip_scorer(model_dir=where)
        assert scorer.name == f"domain_clip:{tmp_path / 'pipeline' / 'domain_clip'}"
    # a training run keeps it in the run folder, beside (not inside) the pipeline folder
    (tmp_path / "pipeline" / "domain_clip").rename(tmp_path / "domain_clip")
    assert load_clip_scorer(model_dir=tmp_path / "pipeline").name == f"domain_clip:{tmp_path / 'domain_clip'}"
    images = (coloured_sprites() + 1) / 2
    matched = scorer.score(images, CAPTIONS)
    shuffled = scorer.score(images, CAPTIONS[1:] + CAPTIONS[:1])
    assert matched.shape == (len(CAPTIONS),)
    assert matched.abs().max() <= 100.0 + 1e-4
    assert matched.mean() > shuffled.mean() + 10
    with pytest.raises(ValueError, match="one text per image"):
        scorer.score(images, CAPTIONS[:2])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        scorer.score(images[:, :1], CAPTIONS)
    # stage 3 backpropagates through the image embedding
    px = images.clone().requires_grad_(True)
    (scorer.image_features(px) * scorer.text_features(CAPTIONS)).sum().backward()
    assert px.grad is not None and px.grad.abs().sum() > 0


def test_fit_domain_clip_on_sprites(tiny_data_root, text_path, tmp_path):
    cfg = load_config(overrides={"data.root": str(tiny_data_root), "data.max_text_length": 16})
    clip_cfg = tiny_clip_cfg(domain_epochs=15)
    model, tokenizer, metrics = fit_domain_clip(clip_cfg, cfg.data, text_path, output_dir=tmp_path / "dc")
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
    assert metrics["chance_top1"] == pytest.approx(1 / metrics["n"])
    assert load_domain_clip(tmp_path / "dc")[2] == metrics
    assert metrics["captions"] == "dataset" and metrics["candidates"] == metrics["n"]


def test_fit_domain_clip_on_given_captions(tiny_data_root, text_path, tmp_path):
    from pokediff.data import load_splits

    cfg = load_config(overrides={"data.root": str(tiny_data_root), "data.max_text_length": 16})
    splits = load_splits(cfg.data)
    # two texts for the whole set: retrieval is then a choice between two candidates
    captions = {name: [("a red pokémon", "a blue pokémon")[i % 2] for i in range(len(splits[name]))] for name in splits}
    _, _, metrics = fit_domain_clip(
        tiny_clip_cfg(domain_epochs=2), cfg.data, text_path, splits=splits, captions=captions, captions_name="visual"
    )
    assert metrics["captions"] == "visual" and metrics["candidates"] == 2 and metrics["chance_top1"] == 0.5
    with pytest.raises(ValueError, match="1 captions for"):
        fit_domain_clip(tiny_clip_cfg(domain_epochs=1), cfg.data, text_path, splits=splits, captions={"train": ["x"]})


def tiny_open_clip():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    return model, open_clip.get_tokenizer("ViT-B-32")


def test_scorer_prefers_pretrained_open_clip(tmp_path, monkeypatch, trained_clip):
    model, tokenizer, _ = trained_clip
    save_domain_clip(model, tokenizer, tmp_path / "domain_clip")  # present, but pretrained wins
    monkeypatch.setattr(clip_mod, "load_pretrained_clip", lambda name, tag, device="cpu": tiny_open_clip())
    scorer = load_clip_scorer(model_dir=tmp_path, clip_cfg=ClipConfig(model="ViT-B-32", pretrained="tagX"))
    assert scorer.name == "open_clip:ViT-B-32/tagX"
    assert scorer.image_size == (32, 32)
    images = (coloured_sprites() + 1) / 2
    scores = scorer.score(images, CAPTIONS)
    assert scores.shape == (len(CAPTIONS),) and scores.abs().max() <= 100.0 + 1e-4
    px = images.clone().requires_grad_(True)
    (scorer.image_features(px) * scorer.text_features(CAPTIONS)).sum().backward()
    assert px.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in scorer.parameters())  # a frozen judge
    # forcing the domain CLIP skips the pretrained one
    assert load_clip_scorer(model_dir=tmp_path, source="domain").name.startswith("domain_clip:")
