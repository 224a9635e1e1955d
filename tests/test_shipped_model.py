"""The model shipped in the package (pokediff/pretrained/pokediff-64): loads offline by its hub-style name from any
directory (also from a plain, non-editable install), is what `pokediff.generate` and the demo use without --model,
draws the sample recorded when it was exported, names a damaged file, and stays small."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pokediff import app
from pokediff import generate as generate_cli
from pokediff.pipeline import DEFAULT_MODEL, PokeSpritePipeline, shipped_model_path
from pokediff.pretrained import SHIPPED_DIR, SIZE_LIMIT_BYTES, folder_size, reference_sample

REPO = Path(__file__).resolve().parents[1]
RECORDED_SAMPLE = REPO / "tests" / "reference" / "pokediff-64_2step.png"


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


def test_the_shipped_code_is_the_installed_code():
    # the folder carries the pipeline's code for diffusers-only loading (trust_remote_code): byte copies of the
    # package's modules, as save_pretrained writes them, so an edit to the package must be copied in too
    import pokediff.models.shape_classifier
    import pokediff.models.vae
    import pokediff.pipeline

    folder, package = SHIPPED_DIR / "pokediff-64", Path(pokediff.pipeline.__file__).parent
    copies = {
        "pipeline_pokesprite.py": package / "pipeline.py",
        "vae/sprite_vae.py": Path(pokediff.models.vae.__file__),
        "shape_classifier/sprite_shape_classifier.py": Path(pokediff.models.shape_classifier.__file__),
    }
    copies.update({name: package / name for name in pokediff.pipeline.HELPER_FILES})
    stale = [name for name, source in copies.items() if (folder / name).read_bytes() != source.read_bytes()]
    assert not stale, f"re-copy {stale} from the package into {folder}"


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
    # the text encoder is not in the folder: the card names the public one it loads
    assert "the public `sentence-transformers/all-MiniLM-L6-v2`, unchanged" in card.text


def test_the_shipped_weights_draw_the_sample_recorded_at_export(shipped):
    # recorded by `python -m pokediff.pretrained ... --record-sample` (README, "The shipped model"); a change of
    # the weights or of the loader moves most pixels by far more than thread counts or CPUs do
    recorded = np.asarray(Image.open(RECORDED_SAMPLE).convert("RGB"), dtype=np.float64)
    drawn = np.asarray(reference_sample(shipped).convert("RGB"), dtype=np.float64)
    difference = np.abs(drawn - recorded)
    assert difference.mean() <= 1.0 and difference.max() <= 8, (
        f"the shipped model's 2-step sample moved (mean {difference.mean():.2f}, max {difference.max():.0f} of "
        f"255) from {RECORDED_SAMPLE.name}; re-record it with `python -m pokediff.pretrained <pipeline> "
        f"--record-sample {RECORDED_SAMPLE.relative_to(REPO)}` if the weights changed on purpose"
    )


def test_a_plain_install_finds_the_shipped_model(tmp_path):
    # what `pip install .` puts in site-packages: the wheel, unpacked into its own folder and put first on the path
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-w", str(wheels)], check=True)
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), *map(str, wheels.glob("*.whl"))], check=True)
    script = (
        "import torch, pokediff\n"
        "from pokediff.pipeline import DEFAULT_MODEL, PokeSpritePipeline, shipped_model_path\n"
        "pipe = PokeSpritePipeline.from_pretrained(DEFAULT_MODEL)\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "image = pipe('a red bird', num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images[0]\n"
        "print(pokediff.__file__, shipped_model_path(DEFAULT_MODEL), image.size)\n"
    )
    env = {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    installed = site / "pokediff" / "pretrained" / "pokediff-64"
    assert out[:2] == [str(site / "pokediff" / "__init__.py"), str(installed)] and out[-2:] == ["(64,", "64)"]
    shipped_files = {p.relative_to(SHIPPED_DIR / "pokediff-64") for p in (SHIPPED_DIR / "pokediff-64").rglob("*")}
    shipped_files = {p for p in shipped_files if "__pycache__" not in p.parts}
    assert shipped_files <= {p.relative_to(installed) for p in installed.rglob("*")}


@pytest.fixture()
def shipped_copy(tmp_path, monkeypatch):
    import pokediff.pipeline

    root = tmp_path / "pretrained"
    shutil.copytree(SHIPPED_DIR / "pokediff-64", root / "pokediff-64")
    monkeypatch.setattr(pokediff.pipeline, "SHIPPED_ROOT", root)
    return root / "pokediff-64"


@pytest.mark.parametrize(
    "damage, error, named",
    [
        (
            lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64),
            ValueError,
            "unet/diffusion_pytorch_model.safetensors is damaged",
        ),
        (
            lambda f: (f / "vae" / "diffusion_pytorch_model.safetensors").unlink(),
            FileNotFoundError,
            "vae has no .safetensors weights",
        ),
        (lambda f: (f / "model_index.json").unlink(), FileNotFoundError, "has no model_index.json"),
        (lambda f: (f / "unet" / "config.json").write_text("{"), ValueError, "unet/config.json is damaged"),
    ],
)
def test_a_damaged_shipped_file_is_named_in_one_error(shipped_copy, damage, error, named, tmp_path, capsys):
    damage(shipped_copy)
    with pytest.raises(error, match=f"shipped model {DEFAULT_MODEL} is damaged: .*{named}.*reinstall"):
        PokeSpritePipeline.from_pretrained(DEFAULT_MODEL)
    assert generate_cli.main(["a red bird", "--steps", "1", "--out", str(tmp_path / "s.png")]) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0]
