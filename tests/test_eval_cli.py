"""`python -m pokediff.eval`: a tiny diffusion pipeline and a tiny GAN checkpoint scored by the same command."""

import json

import pytest
import torch
from PIL import Image
from torch import nn

from pokediff.eval import METRIC_KEYS, RESULT_KEYS, PixelFeatures, validate_result
from pokediff.eval.__main__ import main
from pokediff.eval.runner import EvalSettings, _load_clip
from pokediff.eval.sampling import TYPE_SEED_STRIDE, load_sampler


class MeanAbsDistance(nn.Module):
    def forward(self, x, y):
        return (x - y).abs().flatten(1).mean(dim=1)


class CaptionLengthScorer:
    """A CLIP-scorer double whose score is the caption's length: checks images and captions stay paired."""

    name = "test:caption-length"

    def score(self, images_0_1, texts):
        assert images_0_1.ndim == 4 and len(texts) == images_0_1.shape[0]
        return torch.tensor([float(len(t)) for t in texts])


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from tiny import tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_pipe")
    tiny_pipeline(root).save_pretrained(root / "pipeline")
    return root / "pipeline"


@pytest.fixture(scope="module")
def gan_checkpoint(tmp_path_factory, tiny_data_root):
    from pokediff.gan.config import load_gan_config
    from pokediff.gan.trainer import GanTrainer

    cfg = load_gan_config(
        overrides={
            "model.name": "dcgan",
            "model.resolution": 32,
            "model.g_features": 8,
            "model.d_features": 8,
            "model.latent_dim": 8,
            "data.root": str(tiny_data_root),
            "runtime.report_to": "none",
        }
    )
    path = tmp_path_factory.mktemp("tiny_gan") / "step_0"
    GanTrainer(cfg).save(path)
    return path


def _common_args(tmp_path, name):
    return [
        "--num",
        "3",
        "--batch-size",
        "2",
        "--diversity-prompts",
        "1",
        "--diversity-samples",
        "2",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output",
        str(tmp_path / f"{name}.json"),
        "--quiet",
    ]


def test_pipeline_scored_by_the_cli(pipeline_dir, tiny_data_root, tmp_path):
    argv = [
        "--model",
        str(pipeline_dir),
        "--data-root",
        str(tiny_data_root),
        "--steps",
        "1",
        "--guidance",
        "2",
        "--recon-num",
        "2",
        *_common_args(tmp_path, "pipe"),
    ]
    result = main(argv, feature_net=PixelFeatures(), perceptual=MeanAbsDistance(), clip_scorer=CaptionLengthScorer())
    written = json.loads((tmp_path / "pipe.json").read_text())
    assert written == result
    validate_result(written)
    assert set(RESULT_KEYS) <= set(written) and set(written["metrics"]) == set(METRIC_KEYS)
    assert written["model"]["kind"] == "diffusion" and written["num_samples"] == 3
    assert written["model"]["details"]["guidance_scale"] == 2.0  # what the samples were drawn with
    assert written["protocol"] == "held-out" and written["split"] == "val" and written["seed"] == 0
    assert written["feature_extractor"] == "pixels-avgpool4" and written["clip_scorer"] == "test:caption-length"
    m = written["metrics"]
    assert m["fid"] > 0 and m["kid_mean"] is not None
    assert all(m[k] is not None for k in METRIC_KEYS), written["skipped"]
    assert m["recon_psnr"] > 0 and m["recon_l1"] > 0 and m["diversity"] >= 0
    assert 0 <= m["color_agreement"] <= 1 and 0 <= m["color_agreement_real"] <= 1
    assert 0 <= m["color_agreement_freeform"] <= 1
    # the CLIP double scores caption length: the sample mean must be over the prompts actually used
    from pokediff.config import DataConfig
    from pokediff.data import load_splits
    from pokediff.eval.runner import _rows_for

    val = load_splits(DataConfig(root=str(tiny_data_root)))["val"]
    rows = _rows_for(val, 3, 0)
    assert m["clip_score"] == pytest.approx(sum(len(val[i]["text"]) for i in rows) / 3)
    assert m["clip_score_real"] == pytest.approx(sum(len(val[i]["text"]) for i in set(rows)) / len(set(rows)))
    grid = Image.open(tmp_path / "pipe.png")
    assert grid.size == (2 * 215 + 3 * 2, 2 * 215 + 3 * 2)  # 3 samples on a 2x2 grid, 2-pixel padding
    assert written["reference"]["num_images"] == len(val) and not written["reference"]["cached"]


def test_gan_scored_by_the_same_cli_with_default_networks(gan_checkpoint, tmp_path):
    argv = ["--model", str(gan_checkpoint), "--features", "pixels", "--split", "train", *_common_args(tmp_path, "gan")]
    result = main(argv)
    validate_result(result)
    assert result["model"]["kind"] == "gan" and result["protocol"] == "train"
    assert result["resolution"] == 32 and result["perceptual"].startswith(("stlpips", "lpips"))
    m = result["metrics"]
    assert m["fid"] > 0 and m["diversity"] is not None and m["diversity_real_dataset"] > 0
    for key in (
        "clip_score",
        "color_agreement",
        "color_agreement_freeform",
        "recon_l1",
        "recon_psnr",
        "recon_perceptual",
    ):
        assert m[key] is None and result["skipped"][key]
    assert "not conditioned on captions" in result["skipped"]["clip_score"]
    assert Image.open(tmp_path / "gan.png").size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)
    # the second run reads the real split's features from the cache
    again = main(argv)
    assert again["reference"]["cached"] and again["reference"]["key"] == result["reference"]["key"]
    assert again["metrics"]["fid"] == pytest.approx(m["fid"])


def test_diffusion_samples_do_not_depend_on_the_batch_size(pipeline_dir):
    sampler = load_sampler(pipeline_dir, num_inference_steps=1, guidance_scale=1.0)
    prompts = ["a red fire type Pokémon", "a blue water type Pokémon", "a green grass type Pokémon"]
    one = torch.cat(list(sampler.sample(prompts, seed=5, batch_size=1, progress=False)))
    two = torch.cat(list(sampler.sample(prompts, seed=5, batch_size=2, progress=False)))
    assert one.shape == (3, 3, 215, 215) and 0 <= one.min() and one.max() <= 1
    torch.testing.assert_close(one, two, atol=1e-5, rtol=0)
    assert not torch.allclose(one[0], one[1])


def test_clip_auto_reports_why_no_clip_was_used(pipeline_dir):
    sampler = load_sampler(pipeline_dir)
    scorer, reason = _load_clip(EvalSettings(clip="auto"), sampler, "cpu")
    # offline, without cached open_clip weights and no domain CLIP beside the pipeline: a reason naming both
    assert (scorer is not None and reason is None) or ("domain" in reason and str(pipeline_dir) in reason)


def test_bad_models_and_settings_fail_with_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found"):
        main(["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "r.json")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a diffusion pipeline folder"):
        main(["--model", str(tmp_path / "empty"), "--output", str(tmp_path / "r.json")])
    with pytest.raises(ValueError, match="num must be at least 2"):
        EvalSettings(num=1).check()
    with pytest.raises(ValueError, match="diversity_samples"):
        EvalSettings(diversity_samples=1).check()
    with pytest.raises(ValueError, match="lacks keys"):
        validate_result({"metrics": {}})


def test_data_settings_come_from_the_run_then_the_overrides(pipeline_dir, gan_checkpoint, tiny_data_root, tmp_path):
    import shutil

    from pokediff.config import ConfigError, load_config, save_config
    from pokediff.eval.runner import resolve_data_config

    gan = load_sampler(gan_checkpoint)
    cfg = resolve_data_config(gan)
    assert cfg.root == str(tiny_data_root) and cfg.resolution == 32 and cfg.augment is False
    assert resolve_data_config(gan, ["data.split_seed=3"]).split_seed == 3
    # a pipeline inside a training run folder takes <run>/config.yaml
    run = tmp_path / "run"
    shutil.copytree(pipeline_dir, run / "pipeline")
    save_config(load_config(overrides={"data.root": "/elsewhere", "data.background": [0, 0, 0]}), run / "config.yaml")
    cfg = resolve_data_config(load_sampler(run / "pipeline"))
    assert cfg.root == "/elsewhere" and cfg.background == [0, 0, 0]
    with pytest.raises(ConfigError, match="rooot"):
        resolve_data_config(gan, {"data.rooot": "x"})


def test_type_conditional_gan_gets_each_rows_primary_type(tiny_data_root, tmp_path):
    from pokediff.gan.config import load_gan_config
    from pokediff.gan.generate import sample_from_checkpoint
    from pokediff.gan.trainer import GanTrainer

    cfg = load_gan_config(
        overrides={
            "model.name": "cdcgan",
            "model.resolution": 32,
            "model.g_features": 8,
            "model.d_features": 8,
            "model.latent_dim": 8,
            "data.root": str(tiny_data_root),
            "runtime.report_to": "none",
        }
    )
    GanTrainer(cfg).save(tmp_path / "ckpt")
    sampler = load_sampler(tmp_path / "ckpt")
    assert sampler.kind == "gan" and sampler.type_conditional
    images = torch.cat(list(sampler.sample(["p"] * 3, ["fire", "water", "fire"], seed=4, batch_size=2, progress=False)))
    fire = sample_from_checkpoint(tmp_path / "ckpt", 2, seed=4, type_name="fire")
    water = sample_from_checkpoint(tmp_path / "ckpt", 1, seed=4 + TYPE_SEED_STRIDE, type_name="water")
    torch.testing.assert_close(images, torch.stack([fire[0], water[0], fire[1]]))


class _PaintSampler:
    """Draws each prompt as an opaque square of the colour its prompt names (or always ``fixed``)."""

    kind, text_conditional, background = "diffusion", True, (255, 255, 255)
    RGB = {
        "red": (220, 30, 30),
        "blue": (30, 60, 220),
        "green": (40, 180, 50),
        "yellow": (240, 220, 40),
        "pink": (250, 150, 200),
        "purple": (130, 40, 170),
        "brown": (130, 80, 30),
        "gray": (128, 128, 128),
        "white": (250, 250, 250),
        "black": (15, 15, 15),
    }

    def __init__(self, fixed=None):
        self.fixed = fixed

    def sample(self, prompts, type_names=None, seed=0, batch_size=16, progress=False, desc=""):
        from pokediff.eval.color import color_in_text

        for start in range(0, len(prompts), batch_size):
            images = torch.zeros(len(prompts[start : start + batch_size]), 4, 16, 16)  # RGBA: white reads too
            for image, prompt in zip(images, prompts[start : start + batch_size]):
                colour = self.RGB[self.fixed or color_in_text(prompt)]
                image[:3, 4:12, 4:12] = torch.tensor(colour).view(3, 1, 1) / 255
                image[3, 4:12, 4:12] = 1
            yield images


def test_freeform_colour_agreement_scores_the_free_form_prompts():
    from pokediff.eval.prompts import FREEFORM_PROMPTS
    from pokediff.eval.runner import EvalSettings, _freeform_colors

    settings = EvalSettings(freeform_samples=2)
    assert _freeform_colors(_PaintSampler(), settings, False) == ({"color_agreement_freeform": 1.0}, {})
    red = sum(colour == "red" for _, colour in FREEFORM_PROMPTS) / len(FREEFORM_PROMPTS)
    metrics, _ = _freeform_colors(_PaintSampler(fixed="red"), settings, False)
    assert metrics["color_agreement_freeform"] == pytest.approx(red)
    off = _freeform_colors(_PaintSampler(), EvalSettings(freeform_samples=0), False)
    assert off == ({}, {"color_agreement_freeform": "turned off (--freeform-samples 0)"})


def test_metric_parts_give_values_or_reasons_and_merge_into_every_key():
    from pokediff.eval.runner import _clip_score, _color_agreement, _merge

    (colors, none_skipped), confusion = _color_agreement(["red", "blue"], ["red", "red"], ["red"], ["red"], None)
    assert colors == {"color_agreement": 0.5, "color_agreement_real": 1.0} and none_skipped == {}
    assert confusion == {"samples": {"red": {"red": 1, "blue": 1}}, "real": {"red": {"red": 1}}}
    (_, skipped), _ = _color_agreement(["red"], [None], ["red"], [None], None)
    assert skipped == {
        "color_agreement": "no prompt names a colour",
        "color_agreement_real": "no prompt names a colour",
    }
    assert _color_agreement([], [], [], [], "no captions") == (({}, dict.fromkeys(skipped, "no captions")), None)
    clip = _clip_score(torch.tensor([1.0, 3.0]), torch.tensor([4.0]), None)
    assert clip == ({"clip_score": 2.0, "clip_score_real": 4.0}, {})
    metrics, reasons = _merge([clip, (colors, {}), ({}, {"fid": "why"})])
    assert list(metrics) == list(METRIC_KEYS) and metrics["clip_score"] == 2.0 and metrics["fid"] is None
    assert reasons["fid"] == "why" and reasons["recon_l1"] == "not computed" and "clip_score" not in reasons
