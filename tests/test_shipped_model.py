"""The model shipped in the package (pokediff/pretrained/pokediff-64): loads offline by its hub-style name from any
directory, is what `pokediff.generate` and the demo use without --model, and stays small."""

import json

import pytest
import torch
from PIL import Image

from pokediff import app
from pokediff import generate as generate_cli
from pokediff.pipeline import DEFAULT_MODEL, PokeSpritePipeline, shipped_model_path
from pokediff.pretrained import SHIPPED_DIR, SIZE_LIMIT_BYTES, folder_size


@pytest.fixture(scope="module")
def shipped():
    pipe = PokeSpritePipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_shipped_name_resolves_to_the_packaged_folder_only():
    assert shipped_model_path(DEFAULT_MODEL) == SHIPPED_DIR / "pokediff-64"
    assert shipped_model_path("pokediff/pokediff-65") is None and shipped_model_path(None) is None


def test_the_shipped_model_loads_offline_from_any_directory(shipped, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of the repository around
    image = shipped("a small green creature", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert image.images[0].size == (64, 64)
    with pytest.raises(OSError):  # any other name still goes to the hub, which is offline here
        PokeSpritePipeline.from_pretrained("pokediff/not-shipped")


def test_the_shipped_folder_holds_the_pipeline_only_and_is_small():
    folder = SHIPPED_DIR / "pokediff-64"
    index = json.loads((folder / "model_index.json").read_text())
    # the unchanged text encoder is referenced by name, not copied; no training artefacts
    assert index["text_encoder"] == [None, None] and index["text_encoder_name"]
    names = {p.name for p in folder.iterdir()}
    assert not names & {"text_encoder", "tokenizer", "domain_clip", "checkpoints", "samples"}
    assert folder_size(folder) <= SIZE_LIMIT_BYTES


def test_generate_and_the_demo_use_the_shipped_model_without_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert generate_cli.main(["a blue water type turtle", "--num", "1", "--steps", "2", "--out", "s.png"]) == 0
    assert Image.open(tmp_path / "s.png").size == (64, 64)
    assert app.parse_args([]).model is None
    demo = app.SpriteDemo([DEFAULT_MODEL], device="cpu")
    with demo.default_model.lock:
        demo.default_model.load()
    assert demo.default_model.is_diffusion and demo.default_model.pipeline.resolution == 64


def test_the_shipped_card_carries_measured_metrics_and_loads_by_its_name():
    from huggingface_hub import ModelCard

    card = ModelCard.load(SHIPPED_DIR / "pokediff-64" / "README.md")
    results = card.data.to_dict()["model-index"][0]["results"]
    measured = {(r["dataset"]["split"], m["type"]) for r in results for m in r["metrics"]}
    assert {("train", "kid_mean"), ("train", "fid"), ("val", "color_agreement")} <= measured
    assert 'from_pretrained("pokediff/pokediff-64")' in card.text
