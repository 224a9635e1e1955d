"""Stage 3 on tiny models (CPU): only the text encoder changes, the pipeline still loads and samples."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import save_tiny_text_encoder, tiny_config_overrides, tiny_unet, tiny_vae

from pokediff.config import load_config
from pokediff.models import clip as clip_mod
from pokediff.models.clip import DomainClipTooWeakError, load_clip_scorer
from pokediff.pipeline import PokeSpritePipeline
from pokediff.schedulers import build_noise_scheduler
from pokediff.training.common import read_losses
from pokediff.training.stage3_text import predict_x0, train_stage3

RESOLUTION = 64  # as in test_training.py: the real 215 px geometry is exercised by the pipeline tests


def weights(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no safetensors in {folder}"
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def stage12(tmp_path_factory):
    """Tiny stage-1/2 weights saved with save_pretrained (untrained: stage 3 only needs the folders)."""
    root = tmp_path_factory.mktemp("stage12")
    text = save_tiny_text_encoder(root / "text")
    vae = tiny_vae()
    vae.register_to_config(sample_size=RESOLUTION, scaling_factor=0.9)
    vae.save_pretrained(root / "vae")
    tiny_unet().save_pretrained(root / "unet")
    return root, text


def make_cfg(data_root, text, out, **extra):
    overrides = tiny_config_overrides(data_root, text, out)
    overrides.update({
        "data.resolution": RESOLUTION,
        "clip.source": "domain",
        "clip.min_top1_over_chance": 0.0,  # a 1-epoch tiny CLIP is not expected to beat chance
        "clip.domain_image_size": 32,
        "clip.domain_hidden_dim": 32,
        "stage2.sample_prompts": ["A red fire type Pokémon.", "A blue water type Pokémon."],
        "stage2.sample_images_per_prompt": 1,
        "stage3.learning_rate": 1e-3,
        "stage3.anchor_weight": 0.1,
        "stage3.eval_num_prompts": 2,
        "runtime.max_steps": 2,
    })
    overrides.update(extra)
    return load_config(overrides=overrides)


@pytest.fixture(scope="module")
def stage3_run(stage12, tiny_data_root, tmp_path_factory, monkeypatch_module):
    root, text = stage12
    monkeypatch_module.setattr(clip_mod, "pretrained_clip_weights", lambda model, tag: None)
    cfg = make_cfg(tiny_data_root, text, tmp_path_factory.mktemp("out"))
    before = {name: weights(root / name) for name in ("vae", "unet")}
    pipeline_dir = train_stage3(cfg, root / "vae", root / "unet")
    return cfg, pipeline_dir, before


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_stage3_changes_only_the_text_encoder(stage12, stage3_run):
    root, text = stage12
    cfg, pipeline_dir, before = stage3_run
    run = pipeline_dir.parent
    assert pipeline_dir == run / "pipeline"
    for name in ("vae", "unet"):
        assert_same(weights(root / name), before[name])  # inputs untouched
        assert_same(weights(pipeline_dir / name), before[name])  # bit-identical in the re-saved pipeline
    original = weights(Path(text))
    tuned = weights(run / "text_encoder")
    assert_same(tuned, weights(pipeline_dir / "text_encoder"))
    changed = [k for k in original if not torch.equal(original[k], tuned[k])]
    assert changed, "stage 3 did not update the text encoder"
    assert (run / "tokenizer" / "tokenizer_config.json").is_file()


def test_pipeline_loads_and_samples_after_stage3(stage3_run):
    _, pipeline_dir, _ = stage3_run
    pipe = PokeSpritePipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("A green grass type Pokémon.", num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, RESOLUTION, RESOLUTION)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_stage3_records_clip_choice_and_before_after(stage3_run):
    _, pipeline_dir, _ = stage3_run
    run = pipeline_dir.parent
    report = json.loads((run / "stage3_metrics.json").read_text())
    assert report["clip"]["clip"] == f"domain_clip:{run / 'domain_clip'}"
    assert report["steps"] == 2
    for when in ("before", "after"):
        assert isinstance(report[when]["val_clip_score"], float)
        assert report[when]["val_denoise_loss"] > 0
        assert (run / "samples" / f"stage3_{when}.png").is_file()
    assert {"top1", "top5", "chance_top1"} <= report["domain_clip_retrieval"].keys()
    card = (pipeline_dir / "README.md").read_text()
    assert "domain_clip:" in card and "val CLIP score (before -> after)" in card
    assert "Stage 3: ran for these weights, 2 optimizer steps." in card
    # eval finds the domain CLIP beside the pipeline
    scorer = load_clip_scorer(pipeline_dir)
    assert scorer.name == f"domain_clip:{pipeline_dir / 'domain_clip'}"
    metrics = {r["metric"] for r in read_losses(run / "losses.csv") if r["stage"] == "stage3"}
    assert {"loss", "clip_loss", "denoise_loss", "anchor_loss", "grad_norm"} <= metrics


def test_stage3_refuses_without_stage12_weights(stage12, tiny_data_root, tmp_path):
    root, text = stage12
    cfg = make_cfg(tiny_data_root, text, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"stage-1 VAE.*missing_vae"):
        train_stage3(cfg, tmp_path / "missing_vae", root / "unet")
    (tmp_path / "empty_unet").mkdir()
    with pytest.raises(FileNotFoundError, match=r"stage-2 U-Net.*empty_unet.*--diffusion-checkpoint"):
        train_stage3(cfg, root / "vae", tmp_path / "empty_unet")
    with pytest.raises(FileNotFoundError, match="--vae-checkpoint"):
        train_stage3(cfg, None, root / "unet")
    assert not (tmp_path / cfg.runtime.experiment_name).exists()  # refused before creating anything


def test_stage3_stops_on_a_weak_domain_clip(stage12, stage3_run, tiny_data_root, tmp_path):
    root, text = stage12
    _, pipeline_dir, _ = stage3_run
    cfg = make_cfg(tiny_data_root, text, tmp_path, **{
        "clip.domain_clip_path": str(pipeline_dir / "domain_clip"),
        "clip.min_top1_over_chance": 1000.0,
    })
    with pytest.raises(DomainClipTooWeakError, match="min_top1_over_chance"):
        train_stage3(cfg, root / "vae", root / "unet")
    assert not (tmp_path / cfg.runtime.experiment_name / "text_encoder").exists()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_inverts_the_forward_process(prediction_type):
    cfg = load_config(overrides={"scheduler.prediction_type": prediction_type})
    scheduler = build_noise_scheduler(cfg.scheduler)
    x0 = torch.randn(3, 4, 5, 5)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 400, 900])
    noisy = scheduler.add_noise(x0, noise, t)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    torch.testing.assert_close(predict_x0(scheduler, noisy, target, t), x0, atol=1e-3, rtol=1e-3)


class Interrupt(Exception):
    pass


def test_stage3_resume_matches_an_uninterrupted_run(stage12, stage3_run, tiny_data_root, tmp_path, monkeypatch):
    from pokediff.training.common import CheckpointManager

    root, text = stage12
    _, full_pipeline, _ = stage3_run
    # the same judge as the uninterrupted run, so only the interruption differs
    cfg = make_cfg(tiny_data_root, text, tmp_path, **{"clip.domain_clip_path": str(full_pipeline / "domain_clip"),
                                                      "runtime.checkpoint_every_steps": 1})
    real_save = CheckpointManager.save

    def save_then_die(self, state):
        path = real_save(self, state)
        if state.global_step == 1:
            raise Interrupt("killed after checkpoint 1")
        return path

    with monkeypatch.context() as m:
        m.setattr(CheckpointManager, "save", save_then_die)
        with pytest.raises(Interrupt):
            train_stage3(cfg, root / "vae", root / "unet")
    resumed = train_stage3(cfg, root / "vae", root / "unet", resume="latest")
    assert_same(weights(resumed / "text_encoder"), weights(full_pipeline / "text_encoder"))
    report = json.loads((resumed.parent / "stage3_metrics.json").read_text())
    assert report["steps"] == 2 and report["before"] is not None  # "before" survived the interruption
    steps = [r["step"] for r in read_losses(resumed.parent / "losses.csv") if r["metric"] == "loss"]
    assert steps == [1, 2]
