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
from pokediff.training.metrics import read_losses
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
    overrides.update(
        {
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
        }
    )
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
    out = pipe(
        "A green grass type Pokémon.",
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
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
    assert "domain_clip:domain_clip" in card and "val CLIP score (before -> after)" in card
    assert str(run) not in card  # no machine-local path in a card
    assert "Stage 3: ran for these weights, 2 optimizer steps." in card
    # the pipeline folder holds the pipeline; eval finds the domain CLIP in the run folder beside it
    assert not (pipeline_dir / "domain_clip").exists()
    scorer = load_clip_scorer(pipeline_dir)
    assert scorer.name == f"domain_clip:{run / 'domain_clip'}"
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
    cfg = make_cfg(
        tiny_data_root,
        text,
        tmp_path,
        **{
            "clip.domain_clip_path": str(pipeline_dir.parent / "domain_clip"),
            "clip.min_top1_over_chance": 1000.0,
        },
    )
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
    from pokediff.training.checkpoints import CheckpointManager

    root, text = stage12
    _, full_pipeline, _ = stage3_run
    # the same judge as the uninterrupted run, so only the interruption differs
    cfg = make_cfg(
        tiny_data_root,
        text,
        tmp_path,
        **{"clip.domain_clip_path": str(full_pipeline.parent / "domain_clip"), "runtime.checkpoint_every_steps": 1},
    )
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


# ----------------------------------------------------------------------------------------- the stage-3 gate
def test_gate_prompts_name_a_colour_and_are_seeded():
    from pokediff.training.stage3_gate import judge_prompts

    records = [{"color": "Red"}, {"color": ""}, {"color": "teal"}, {"color": None}, {"color": "blue"}]
    captions = ["a fire type", "a green leafy thing", "a grass type", "no colour here", "a water type"]
    prompts, targets = judge_prompts(records, captions, num=10, seed=0)
    # the metadata colour wins; without one, a colour named in the caption; rows naming none are left out
    assert sorted(zip(prompts, targets)) == [
        ("a fire type", "red"),
        ("a green leafy thing", "green"),
        ("a water type", "blue"),
    ]
    assert judge_prompts(records, captions, num=2, seed=3) == judge_prompts(records, captions, num=2, seed=3)
    assert len(judge_prompts(records, captions, num=2, seed=3)[0]) == 2


def test_gate_keeps_stage3_only_when_it_is_strictly_better():
    from pokediff.training.stage3_gate import decide

    assert decide(0.30, 0.35) == "stage3"
    assert decide(0.30, 0.30) == "stage2"  # a tie is no gain
    assert decide(0.36, 0.33) == "stage2"


def test_gate_colour_agreement_counts_samples_of_the_named_colour():
    from types import SimpleNamespace

    from pokediff.training.stage3_gate import colour_agreement

    seen_seeds = []

    class SolidColourPipe:  # paints each sample the colour its prompt names; records the seeds it was given
        config = SimpleNamespace(background=[255, 255, 255])
        rgb = {"red": (0.9, 0.05, 0.05), "blue": (0.05, 0.1, 0.9)}

        def __call__(self, prompts, generator, output_type):
            seen_seeds.extend(g.initial_seed() for g in generator)
            images = torch.ones(len(prompts), 3, 16, 16)
            for i, p in enumerate(prompts):
                images[i, :, 4:12, 4:12] = torch.tensor(self.rgb[p]).view(3, 1, 1)
            return SimpleNamespace(images=images)

    score = colour_agreement(SolidColourPipe(), ["red", "blue", "red"], ["red", "blue", "blue"], seed=5, batch_size=2)
    assert score == pytest.approx(2 / 3)
    assert seen_seeds == [5, 6, 7]  # one seed per sample, whatever the batch size


@pytest.mark.parametrize("verdict", ["stage2", "stage3"])
def test_gate_puts_the_pretrained_text_encoder_back_unless_stage3_wins(
    stage12, stage3_run, tmp_path, monkeypatch, verdict
):
    import shutil

    from pokediff.training import stage3_gate

    _, text = stage12
    cfg, pipeline_dir, _ = stage3_run
    run = tmp_path / "run"
    shutil.copytree(pipeline_dir.parent, run)  # the module's stage-3 run stays as it was for the other tests
    scores = []
    real_decide = stage3_gate.decide
    monkeypatch.setattr(stage3_gate, "decide", lambda s2, s3: scores.append((s2, s3)) or verdict)
    result = stage3_gate.gate_stage3(cfg, run, "cpu")

    ((s2, s3),) = scores
    assert 0.0 <= s2 <= 1.0 and 0.0 <= s3 <= 1.0 and real_decide(s2, s3) in ("stage2", "stage3")
    report = json.loads((run / "stage3_metrics.json").read_text())
    assert report["gate"] == result and result["kept"] == verdict
    assert (result["stage2_text_encoder"], result["stage3_text_encoder"]) == (s2, s3)
    assert "before" in report and "after" in report  # stage 3's own record is kept beside the verdict
    tuned = weights(run / "text_encoder")
    expected = weights(Path(text)) if verdict == "stage2" else tuned
    assert_same(weights(run / "pipeline" / "text_encoder"), expected)
    assert_same(weights(run / "text_encoder"), weights(pipeline_dir.parent / "text_encoder"))  # kept for inspection
    pipe = PokeSpritePipeline.from_pretrained(str(run / "pipeline"))  # still a whole, loadable pipeline
    assert pipe.text_encoder is not None
    card = (run / "pipeline" / "README.md").read_text()  # the card claims a tuned encoder only if it is there
    assert "stage 3 gate" in card and f"{s2:.3f} with the pretrained text encoder" in card
    assert ("Stage 3: ran for these weights" in card) == (verdict == "stage3")
