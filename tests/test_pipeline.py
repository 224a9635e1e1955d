"""PokeSpritePipeline with tiny components: the properties diffusers' PipelineTesterMixin checks, plus ours."""

import copy
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import is_compiled_module
from PIL import Image
from tiny import TINY_LATENT_CHANNELS, TINY_MAX_TEXT_LENGTH, load_benchmark, tiny_pipeline, tiny_unet, tiny_vae

from pokediff.config import SchedulerConfig
from pokediff.hub import build_model_card, write_model_card
from pokediff.models.shape_classifier import SpriteShapeClassifier
from pokediff.pipeline import PokeSpritePipeline
from pokediff.postprocess import background_alpha
from pokediff.schedulers import build_inference_scheduler, build_noise_scheduler, make_inference_scheduler

STEPS = 2


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tiny_pipe"))


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "pipeline"
    pipe.save_pretrained(folder)
    return folder


def gen(seed):
    return torch.Generator().manual_seed(seed)


def run(pipe, prompt="a small green creature", seed=0, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "pt")
    return pipe(prompt, generator=kw.pop("generator", gen(seed)), **kw).images


def with_components(pipe, **changes):
    components = {**pipe.components, **changes}
    config = {"max_text_length": pipe.config.max_text_length, "background": pipe.config.background}
    new = PokeSpritePipeline(**components, **config)
    new.set_progress_bar_config(disable=True)
    return new


# ------------------------------------------------------------------------------ outputs
def test_output_types_and_shapes(pipe):
    images = run(pipe, ["a red fire creature", "a blue fish"], num_images_per_prompt=2)
    assert images.shape == (4, 3, 215, 215) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    array = run(pipe, output_type="np")
    assert isinstance(array, np.ndarray) and array.shape == (1, 215, 215, 3)
    pil = run(pipe, output_type="pil")
    assert isinstance(pil[0], Image.Image) and pil[0].size == (215, 215) and pil[0].mode == "RGB"
    latents = run(pipe, output_type="latent")
    assert latents.shape == (1, TINY_LATENT_CHANNELS, 27, 27)
    as_tuple = pipe("x", num_inference_steps=1, output_type="pt", return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == (1, 3, 215, 215)


def test_seeded_determinism(pipe):
    a = run(pipe, seed=7, output_type="latent")
    b = run(pipe, seed=7, output_type="latent")
    c = run(pipe, seed=8, output_type="latent")
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(run(pipe, seed=7), run(pipe, seed=7))


def test_batch_equals_one_by_one(pipe):
    prompts = ["a red fire creature", "a blue water turtle with a shell", ""]
    batched = run(pipe, prompts, generator=[gen(i) for i in range(3)], output_type="latent")
    single = torch.cat([run(pipe, p, generator=gen(i), output_type="latent") for i, p in enumerate(prompts)])
    # random tiny weights give large latents; compare relative to their scale (batched matmuls round differently)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5 * single.abs().max().item())
    batched_img = run(pipe, prompts, generator=[gen(i) for i in range(3)])
    single_img = torch.cat([run(pipe, p, generator=gen(i)) for i, p in enumerate(prompts)])
    torch.testing.assert_close(batched_img, single_img, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="generators"):
        run(pipe, prompts, generator=[gen(0), gen(1)])


def test_classifier_free_guidance_on_off(pipe):
    batch_sizes = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))
    try:
        off = run(pipe, guidance_scale=1.0, output_type="latent")
        assert batch_sizes == [1] * STEPS  # no unconditional pass
        batch_sizes.clear()
        on = run(pipe, guidance_scale=5.0, output_type="latent")
        assert batch_sizes == [2] * STEPS  # conditional + unconditional
    finally:
        hook.remove()
    assert not torch.allclose(on, off, atol=1e-5)
    negative = run(pipe, guidance_scale=5.0, negative_prompt="a blurry grey blob", output_type="latent")
    assert not torch.allclose(on, negative, atol=1e-5)
    # the unconditional side is the empty caption by default
    assert torch.equal(on, run(pipe, guidance_scale=5.0, negative_prompt="", output_type="latent"))


def test_prompt_changes_output(pipe):
    a = run(pipe, "a red fire creature", output_type="latent")
    b = run(pipe, "a blue water turtle", output_type="latent")
    assert not torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    "name, cls", [("ddim", DDIMScheduler), ("ddpm", DDPMScheduler), ("dpm", DPMSolverMultistepScheduler)]
)
def test_scheduler_swap(pipe, name, cls):
    scheduler = make_inference_scheduler(name, pipe.scheduler.config)
    assert isinstance(scheduler, cls)
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2"
    swapped = with_components(pipe, scheduler=scheduler)
    a = run(swapped, seed=1, output_type="latent")
    assert a.shape == (1, TINY_LATENT_CHANNELS, 27, 27) and torch.isfinite(a).all()
    assert torch.equal(a, run(swapped, seed=1, output_type="latent"))
    if name != "dpm":
        assert not torch.allclose(a, run(pipe, seed=1, output_type="latent"), atol=1e-5)
    # the plain diffusers way works too
    plain = with_components(pipe, scheduler=cls.from_config(pipe.scheduler.config))
    assert run(plain, output_type="latent").shape == a.shape
    with pytest.raises(ValueError, match="unknown scheduler 'euler'"):
        make_inference_scheduler("euler", pipe.scheduler.config)


def test_schedulers_from_config():
    cfg = SchedulerConfig(prediction_type="v_prediction", inference_scheduler="ddim")
    train = build_noise_scheduler(cfg)
    assert isinstance(train, DDPMScheduler) and train.config.prediction_type == "v_prediction"
    assert train.config.beta_schedule == "squaredcos_cap_v2" and train.config.num_train_timesteps == 1000
    infer = build_inference_scheduler(cfg)
    assert isinstance(infer, DDIMScheduler) and infer.config.prediction_type == "v_prediction"
    assert infer.config.clip_sample is False
    with pytest.raises(ValueError, match="prediction_type"):
        build_noise_scheduler(SchedulerConfig(prediction_type="sample_x"))


def test_decoder_cross_attention_pipeline(pipe):
    cross = with_components(pipe, vae=tiny_vae(decoder_cross_attention=True))
    for block in cross.vae.decoder_cross_attn:
        torch.nn.init.normal_(block.attn.to_out[0].weight, std=0.2)
    latents = torch.randn(1, TINY_LATENT_CHANNELS, 27, 27)
    a = run(cross, "a red fire creature", latents=latents)
    b = run(cross, "a blue water turtle", latents=latents, guidance_scale=4.0)
    assert a.shape == (1, 3, 215, 215) and not torch.allclose(a, b)


def test_callback_on_step_end(pipe):
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append((step, tuple(kwargs)))
        return {"latents": torch.zeros_like(kwargs["latents"])}

    inputs = ["latents", "prompt_embeds"]
    out = run(pipe, output_type="latent", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=inputs)
    assert seen == [(i, ("latents", "prompt_embeds")) for i in range(STEPS)]
    assert torch.count_nonzero(out) == 0  # the callback's latents were used
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        run(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"])


# ------------------------------------------------------------------------------ speed
def test_a_bfloat16_unet_samples_with_float32_latents(pipe):
    bf16 = with_components(pipe, unet=copy.deepcopy(pipe.unet).to(torch.bfloat16))
    dtypes = []

    def callback(p, step, timestep, kwargs):
        dtypes.append(kwargs["latents"].dtype)
        return {}

    a = run(pipe, guidance_scale=4.0)
    b = run(bf16, guidance_scale=4.0, callback_on_step_end=callback)
    assert dtypes == [torch.float32] * STEPS  # the sampler's state stays float32
    assert b.dtype == torch.float32 and 0 < (a - b).abs().mean() < 0.01  # bfloat16 rounding, nothing more


def test_optimize_for_cpu_draws_what_the_float32_pipeline_draws(pipe):
    torch.manual_seed(0)
    classifier = SpriteShapeClassifier(block_out_channels=(8, 8), norm_num_groups=4).eval()
    fast = with_components(
        pipe, unet=copy.deepcopy(pipe.unet), vae=copy.deepcopy(pipe.vae), shape_classifier=classifier
    ).optimize_for_cpu()
    assert is_compiled_module(fast.unet) and fast.unet.dtype == torch.bfloat16
    assert fast.vae.dtype == fast.shape_classifier.dtype == torch.bfloat16  # shape guidance's backward pass too
    assert pipe.vae.dtype == torch.float32  # the pipeline it was copied from is untouched
    a, b = run(pipe, guidance_scale=4.0), run(fast, guidance_scale=4.0)
    assert b.dtype == torch.float32 and (a - b).abs().mean() < 0.01
    winged = "a red creature with wings"  # names a shape: guided through the bfloat16 decoder and classifier
    steered, plain = run(fast, winged, shape_guidance_scale=1e7), run(fast, winged, shape_guidance_scale=0.0)
    assert steered.dtype == torch.float32 and torch.isfinite(steered).all() and (steered - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match="already compiled"):
        fast.optimize_for_cpu()
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.bfloat16"):
        with_components(pipe).optimize_for_cpu(torch.float16)


# ------------------------------------------------------------------------------ RGBA
def test_background_alpha_keys_border_background_and_big_holes_only():
    image = torch.ones(1, 3, 40, 40)  # white background
    image[:, :, 10:30, 10:30] = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1)  # red body
    image[:, :, 18:22, 18:22] = 1.0  # a small white eye inside the body (1% of the image)
    alpha = background_alpha(image, [255, 255, 255], tolerance=0.1, min_hole_fraction=0.02)
    assert alpha.shape == (1, 1, 40, 40)
    assert alpha[0, 0, 0, 0] == 0 and alpha[0, 0, 5, 35] == 0
    assert alpha[0, 0, 15, 15] == 1
    assert alpha[0, 0, 20, 20] == 1  # small enclosed white stays opaque
    image[:, :, 13:27, 13:27] = 1.0  # now a red ring round a big white hole (12% of the image)
    ring = background_alpha(image, [255, 255, 255], tolerance=0.1, min_hole_fraction=0.02)
    assert ring[0, 0, 20, 20] == 0 and ring[0, 0, 11, 11] == 1
    image[:, :, 0, 0] = 0.95  # near-white anti-aliasing: partly transparent
    assert 0 < background_alpha(image, [255, 255, 255], tolerance=0.1)[0, 0, 0, 0] < 1
    with pytest.raises(ValueError, match="rgba_tolerance"):
        background_alpha(image, [255, 255, 255], tolerance=0)


def test_background_alpha_recovers_real_sprite_alpha():
    """Bundled artwork composited on white: the keyed alpha matches the true alpha."""
    from pokediff.config import DEFAULT_DATA_DIR

    for number in ("0001", "0025", "0151"):  # 0151: a tail curling round a gap
        rgba = np.asarray(Image.open(DEFAULT_DATA_DIR / "images" / f"{number}.webp").convert("RGBA")) / 255.0
        true_alpha = torch.from_numpy(rgba[..., 3]).float()
        rgb = torch.from_numpy(rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])).permute(2, 0, 1)[None].float()
        keyed = background_alpha(rgb, [255, 255, 255])[0, 0]
        pred, true = keyed > 0.5, true_alpha > 0.5
        iou = (pred & true).sum() / (pred | true).sum()
        assert iou > 0.9, (number, iou)
        assert (true & ~pred).sum() < 0.01 * true.sum()  # no holes punched into the sprite


def test_rgba_option(pipe):
    rgb = run(pipe, seed=3)
    rgba = run(pipe, seed=3, rgba=True)
    assert rgba.shape == (1, 4, 215, 215)
    assert torch.equal(rgba[:, :3], rgb)
    assert torch.equal(rgba[:, 3:], background_alpha(rgb, pipe.config.background))
    assert run(pipe, rgba=True, output_type="np").shape == (1, 215, 215, 4)
    assert run(pipe, rgba=True, output_type="pil")[0].mode == "RGBA"
    with pytest.raises(ValueError, match="rgba"):
        run(pipe, rgba=True, output_type="latent")


# ------------------------------------------------------------------------------ bad input
def test_empty_prompt_is_unconditional(pipe):
    assert run(pipe, "").shape == (1, 3, 215, 215)
    assert run(pipe, ["", "a red creature"]).shape == (2, 3, 215, 215)


@pytest.mark.parametrize("prompt", [123, None, ["a cat", 5], ("ok", b"bytes")])
def test_non_string_prompt_rejected(pipe, prompt):
    with pytest.raises(ValueError, match="prompt"):
        run(pipe, prompt)


def test_empty_list_rejected(pipe):
    with pytest.raises(ValueError, match="empty list"):
        run(pipe, [])


def test_overlong_prompt_truncated_with_warning(pipe, caplog):
    long_prompt = " ".join(["fire"] * (3 * TINY_MAX_TEXT_LENGTH))
    with caplog.at_level(logging.WARNING):
        images = run(pipe, long_prompt)
    assert images.shape == (1, 3, 215, 215)
    assert any("truncated" in r.getMessage() and "1 of 1" in r.getMessage() for r in caplog.records)
    # everything past the limit is dropped: a different tail gives the same image
    other_tail = " ".join(["fire"] * (2 * TINY_MAX_TEXT_LENGTH) + ["water"] * TINY_MAX_TEXT_LENGTH)
    assert torch.equal(run(pipe, long_prompt, output_type="latent"), run(pipe, other_tail, output_type="latent"))


def test_folder_guidance_scale_is_the_default(pipe, tmp_path):
    unguided = PokeSpritePipeline(**pipe.components, max_text_length=pipe.config.max_text_length, guidance_scale=1.0)
    unguided.set_progress_bar_config(disable=True)
    assert pipe.config.guidance_scale == 4.0  # the default when a folder sets none
    assert torch.equal(run(unguided, output_type="latent"), run(pipe, guidance_scale=1.0, output_type="latent"))
    assert not torch.equal(run(unguided, output_type="latent"), run(pipe, output_type="latent"))
    assert torch.equal(run(unguided, guidance_scale=4.0, output_type="latent"), run(pipe, output_type="latent"))
    unguided.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["guidance_scale"] == 1.0
    assert PokeSpritePipeline.from_pretrained(tmp_path / "saved").config.guidance_scale == 1.0
    with pytest.raises(ValueError, match="`guidance_scale` must be a finite number >= 1"):
        PokeSpritePipeline(**pipe.components, max_text_length=pipe.config.max_text_length, guidance_scale=0.5)


def test_guidance_interval_guides_only_its_steps(pipe, tmp_path):
    batch_sizes = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        everywhere = run(pipe, num_inference_steps=5, output_type="latent")
        assert batch_sizes == [2] * 5  # the default interval (0, 1): every step guided
        batch_sizes.clear()
        partly = run(pipe, num_inference_steps=5, guidance_interval=(0.2, 0.6), output_type="latent")
        assert batch_sizes == [1, 2, 2, 1, 1]  # steps int(0.2 * 5) = 1 up to int(0.6 * 5) = 3
        batch_sizes.clear()
        run(pipe, num_inference_steps=5, guidance_scale=1.0, guidance_interval=(0.2, 0.6), output_type="latent")
        assert batch_sizes == [1] * 5
        batch_sizes.clear()
        run(pipe, num_inference_steps=1, guidance_interval=(0.12, 0.72), output_type="latent")
        assert batch_sizes == [2]  # int(0.72 * 1) = 0 would guide no step: an interval guides at least one
    finally:
        hook.remove()
    assert not torch.equal(everywhere, partly)
    assert torch.equal(everywhere, run(pipe, num_inference_steps=5, guidance_interval=[0, 1], output_type="latent"))
    interval_folder = PokeSpritePipeline(
        **pipe.components, max_text_length=pipe.config.max_text_length, guidance_interval=[0.2, 0.6]
    )
    interval_folder.set_progress_bar_config(disable=True)
    assert torch.equal(partly, run(interval_folder, num_inference_steps=5, output_type="latent"))
    interval_folder.save_pretrained(tmp_path / "saved")
    assert PokeSpritePipeline.from_pretrained(tmp_path / "saved").config.guidance_interval == [0.2, 0.6]
    for bad in [(0.6, 0.2), (0.0, 1.5), (-0.1, 0.5), (0.5,), (0.2, float("nan")), (True, 1.0)]:
        with pytest.raises(ValueError, match=r"`guidance_interval` must be \(start, stop\) fractions"):
            run(pipe, guidance_interval=bad)


def test_export_sets_the_folders_guidance_also_in_place(saved, tmp_path):
    from pokediff.pretrained import export_pipeline

    dest = tmp_path / "exported"
    report = export_pipeline(saved, dest, guidance_scale=8, record_sample=tmp_path / "sample.png")
    assert json.loads((dest / "model_index.json").read_text())["guidance_scale"] == 8.0
    # the check compares fp32 with half weights at the same (new) guidance, so the change is rounding-sized
    assert report["max_pixel_change_of_half_precision"] < 5 and (tmp_path / "sample.png").is_file()
    in_place = tmp_path / "float32"
    shutil.copytree(saved, in_place)
    report = export_pipeline(in_place, in_place)  # onto itself: the fp32 weights are drawn before they are replaced
    assert 0 < report["max_pixel_change_of_half_precision"] < 5
    (dest / "README.md").write_text("the card")
    export_pipeline(dest, dest, guidance_scale=2.5, guidance_interval=(0.1, 0.7))  # onto itself: only the defaults
    assert PokeSpritePipeline.from_pretrained(dest).config.guidance_scale == 2.5
    assert PokeSpritePipeline.from_pretrained(dest).config.guidance_interval == [0.1, 0.7]
    assert (dest / "README.md").read_text() == "the card"
    with pytest.raises(ValueError, match="guidance_scale"):
        export_pipeline(dest, dest, guidance_scale=0)
    with pytest.raises(ValueError, match="guidance_interval"):
        export_pipeline(dest, dest, guidance_interval=(0.7, 0.1))


def test_batched_sampling_with_given_seeds(pipe):
    from pokediff.eval.sampling import pipeline_batches

    prompts = ["a red creature", "a red creature", "a red creature"]
    default = torch.cat(list(pipeline_batches(pipe, prompts, seed=3, batch_size=2, num_inference_steps=1)))
    given = torch.cat(list(pipeline_batches(pipe, prompts, 0, 2, seeds=[5, 3, 5], num_inference_steps=1)))
    # seed 3 draws the same sprite whatever its place (to float rounding: the batches differ)
    assert torch.allclose(given[1], default[0], atol=1e-5) and torch.allclose(given[0], given[2], atol=1e-5)
    assert (given[0] - given[1]).abs().max() > 0.01
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        list(pipeline_batches(pipe, prompts, 0, 2, seeds=[1, 2]))


def test_seed_silhouettes_benchmark(saved, tmp_path, capsys):
    main = load_benchmark("seed_silhouettes").main
    out_json, grid = tmp_path / "ss.json", tmp_path / "ss.png"
    args = ["--model", str(saved), "--prompts", "2", "--seeds", "2", "--steps", "1"]
    assert main([*args, "--json", str(out_json), "--grid", str(grid)]) == 0
    summary = json.loads(out_json.read_text())
    assert summary["prompts"] == 2 and summary["seeds"] == 2
    for key in ("same_seed_iou", "same_prompt_iou", "neither_iou", "real_pairs_iou", "sample_fill", "real_fill"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert Image.open(grid).size == (3 * 215 + 4 * 2, 2 * 215 + 3 * 2)  # a real sprite and 2 seeds a row, 2 rows
    capsys.readouterr()
    assert main(["--model", str(saved), "--prompts", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --prompts must be between 2 and the val split's 136, got 1"
    )


def test_batched_sampling_counts_cut_prompts_once(pipe, caplog):
    from pokediff.eval.sampling import pipeline_batches

    long_prompt = " ".join(["fire"] * (3 * TINY_MAX_TEXT_LENGTH))
    prompts = [long_prompt, "water", long_prompt, "grass", long_prompt]
    with caplog.at_level(logging.WARNING):
        batches = list(pipeline_batches(pipe, prompts, seed=0, batch_size=2, num_inference_steps=1))
    assert [len(b) for b in batches] == [2, 2, 1]
    cut_lines = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    assert cut_lines == [f"3 of 5 prompts are longer than {TINY_MAX_TEXT_LENGTH} tokens and were truncated"]
    # the filter is gone afterwards: a direct call warns again
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run(pipe, long_prompt)
    assert any("1 of 1 prompts are longer than" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 2.5}, "num_inference_steps"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"output_type": "jpg"}, "output_type"),
        ({"latents": torch.zeros(1, TINY_LATENT_CHANNELS, 16, 16)}, "latents"),
        ({"negative_prompt": ["a", "b"]}, "negative_prompt"),
        ({"negative_prompt": 3}, "negative_prompt"),
    ],
)
def test_bad_call_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(pipe, **kwargs)


def test_one_step_works(pipe):
    assert run(pipe, num_inference_steps=1).shape == (1, 3, 215, 215)


def test_mismatched_components_rejected(pipe):
    with pytest.raises(ValueError, match="latent_channels"):
        with_components(pipe, vae=tiny_vae().__class__(latent_channels=3, block_out_channels=(8, 8), norm_num_groups=4))
    with pytest.raises(ValueError, match="encoder_hid_dim"):
        with_components(pipe, unet=tiny_unet(text_dim=48))
    with pytest.raises(ValueError, match="background"):
        PokeSpritePipeline(**pipe.components, background=[255, 255])


# ------------------------------------------------------------------------------ save / load
def test_save_load_bit_exact(pipe, saved):
    files = [p for p in saved.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert {p.parent.name for p in weights} == {"vae", "unet", "text_encoder"}
    assert all(p.suffix == ".safetensors" for p in weights)
    index = json.loads((saved / "model_index.json").read_text())
    # diffusers' custom-code layout: the pipeline file at the root, the VAE's module in its subfolder
    assert index["_class_name"] == ["pipeline_pokesprite", "PokeSpritePipeline"]
    assert index["vae"] == ["sprite_vae", "SpriteVAE"]
    assert index["text_encoder"][0] == "transformers" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    code = sorted(str(p.relative_to(saved)) for p in files if p.suffix == ".py")
    assert code == ["fileio.py", "pipeline_pokesprite.py", "postprocess.py", "text_reference.py", "vae/sprite_vae.py"]
    code_text = "".join(p.read_text() for p in files if p.suffix == ".py")
    # the import statements diffusers' check_imports looks for: none may need pokediff
    assert not re.findall(r"^\s*(?:import\s+pokediff|from\s+pokediff\S*\s+import)", code_text, flags=re.MULTILINE)

    loaded = PokeSpritePipeline.from_pretrained(saved)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.max_text_length == pipe.config.max_text_length
    assert list(loaded.config.background) == list(pipe.config.background)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    for name in ("vae", "unet", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert torch.equal(run(pipe, seed=5), run(loaded, seed=5))


def test_plain_diffusion_pipeline_needs_trust_remote_code(saved):
    import diffusers

    assert not hasattr(diffusers, "PokeSpritePipeline")  # importing pokediff adds nothing to diffusers
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(saved)


_LOAD_IN_FRESH_INTERPRETER = r"""
import importlib.abc, json, sys
import torch

folder, way, out, threads = sys.argv[1:]
torch.set_num_threads(int(threads))  # the parent's: another thread count sums in another order (not bit-equal)
if way == "trust_remote_code_without_pokediff":
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "pokediff":
                raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)")
    sys.meta_path.insert(0, Refuse())
if way.startswith("trust_remote_code"):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
else:
    from pokediff import PokeSpritePipeline
    import diffusers

    assert not hasattr(diffusers, "PokeSpritePipeline")
    pipe = PokeSpritePipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
latents = torch.randn(1, pipe.vae.config.latent_channels, pipe.latent_size, pipe.latent_size,
                      generator=torch.Generator().manual_seed(3))
images = pipe("a small green creature", num_inference_steps=2, latents=latents, output_type="pt", rgba=True).images
torch.save(images, out)
loaded = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("pokediff", "diffusers_modules")})
print(json.dumps({"pipeline": type(pipe).__module__, "vae": type(pipe.vae).__module__, "loaded": loaded}))
"""


def _load_in_fresh_interpreter(folder, way, tmp_path) -> tuple[dict, torch.Tensor]:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    out = tmp_path / f"{way}.pt"
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_FRESH_INTERPRETER, str(folder), way, str(out), str(torch.get_num_threads())],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "might require the following packages" not in done.stderr  # diffusers' warning for missing imports
    return json.loads(done.stdout.strip().splitlines()[-1]), torch.load(out, weights_only=True)


def _reference_images(pipe):
    latents = torch.randn(1, pipe.vae.config.latent_channels, pipe.latent_size, pipe.latent_size, generator=gen(3))
    return run(pipe, "a small green creature", latents=latents, rgba=True)


@pytest.mark.parametrize("way", ["pokediff", "trust_remote_code", "trust_remote_code_without_pokediff"])
def test_saved_folder_loads_both_ways_in_a_fresh_interpreter(pipe, saved, tmp_path, way):
    info, images = _load_in_fresh_interpreter(saved, way, tmp_path)
    if way == "pokediff":  # the installed classes; the folder's code is not run
        assert info == {"pipeline": "pokediff.pipeline", "vae": "pokediff.models.vae", "loaded": ["pokediff"]}
    else:  # the folder's own code; pokediff is never imported
        assert info == {
            "pipeline": "diffusers_modules.local.pipeline_pokesprite",
            "vae": "diffusers_modules.local.sprite_vae",
            "loaded": ["diffusers_modules"],
        }
    assert images.shape == (1, 4, 215, 215)
    assert torch.equal(images, _reference_images(pipe))


def _as_saved_before_custom_code(saved, folder):
    """``saved`` in the layout of folders written before custom-code loading (class looked up on diffusers)."""
    shutil.copytree(saved, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="PokeSpritePipeline", vae=["pokediff.models.vae", "SpriteVAE"])
    (folder / "model_index.json").write_text(json.dumps(index))
    for path in folder.rglob("*.py"):
        path.unlink()
    return folder


def test_folders_saved_before_custom_code_still_load(pipe, saved, tmp_path):
    old = _as_saved_before_custom_code(saved, tmp_path / "old")
    info, images = _load_in_fresh_interpreter(old, "pokediff", tmp_path)
    assert info["vae"] == "pokediff.models.vae" and torch.equal(images, _reference_images(pipe))
    # eval's loader (app and generate call PokeSpritePipeline.from_pretrained the same way)
    from pokediff.eval.sampling import DiffusionSampler, load_sampler

    sampler = load_sampler(old, num_inference_steps=STEPS)
    assert isinstance(sampler, DiffusionSampler)
    new = next(load_sampler(saved, num_inference_steps=STEPS).sample(["a red creature"], progress=False))
    assert torch.equal(next(sampler.sample(["a red creature"], progress=False)), new)


def test_pipeline_tokenizes_as_training_does(pipe):
    from pokediff.data import tokenize_captions

    captions = ["a red fire creature", "", " ".join(["fire"] * 3 * TINY_MAX_TEXT_LENGTH)]
    ours = pipe._tokenize(captions)
    training = tokenize_captions(pipe.tokenizer, captions, pipe.config.max_text_length)
    assert all(torch.equal(ours[k], training[k]) for k in ("input_ids", "attention_mask"))


def test_resave_keeps_foreign_entries(pipe, tmp_path):
    folder = tmp_path / "pipeline"
    pipe.save_pretrained(folder)
    (folder / "domain_clip").mkdir()
    (folder / "domain_clip" / "config.json").write_text("{}")
    pipe.save_pretrained(folder)
    assert (folder / "domain_clip" / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_load_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        PokeSpritePipeline.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        PokeSpritePipeline.from_pretrained(tmp_path / "empty")
    run_dir = tmp_path / "run"
    shutil.copytree(saved, run_dir / "pipeline")
    with pytest.raises(FileNotFoundError, match="training run folder"):
        PokeSpritePipeline.from_pretrained(run_dir)
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(FileNotFoundError, match="'unet'"):
        PokeSpritePipeline.from_pretrained(broken)
    index = json.loads((saved / "model_index.json").read_text())
    no_entry = tmp_path / "no_entry"
    shutil.copytree(saved, no_entry)
    (no_entry / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "tokenizer"}))
    with pytest.raises(ValueError, match="'tokenizer'"):
        PokeSpritePipeline.from_pretrained(no_entry)
    other = tmp_path / "other"
    shutil.copytree(saved, other)
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionPipeline"):
        PokeSpritePipeline.from_pretrained(other)


# ------------------------------------------------------------------------------ model card / hub
LOAD_SNIPPETS = [
    'PokeSpritePipeline.from_pretrained("path/to/pipeline")',
    'DiffusionPipeline.from_pretrained("path/to/pipeline", trust_remote_code=True)',
]


def test_model_card_content(saved, tmp_path):
    folder = tmp_path / "card"
    shutil.copytree(saved, folder)
    path = write_model_card(
        folder, stages={2: 7}, metrics={"fid": 42.123456, "clip_score": 25.5}, extra={"stage2_epochs": 300}
    )
    card = path.read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card.split("---")[1]
    expected = [
        "## Training data", "905 Pokémon", "## Training stages", f"215x215x3 -> 27x27x{TINY_LATENT_CHANNELS} latent",
        "U-Net", "## Metrics", "| fid | 42.12 |", "| clip_score | 25.5 |", "| stage2_epochs | 300 |",
        "## Example prompts", "Nintendo", "non-commercial", *LOAD_SNIPPETS, "SpriteVAE",
        "DPMSolverMultistepScheduler", f"Max text length: {TINY_MAX_TEXT_LENGTH} tokens",
    ]  # fmt: skip
    for text in expected:
        assert text in card, text
    assert "## Metrics" not in write_model_card(folder).read_text()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        write_model_card(tmp_path)
    with pytest.raises(ValueError, match="unknown training stages"):
        build_model_card(folder, stages={4: 1})


def test_model_card_claims_only_the_stages_that_ran(saved):
    stage2_only = str(build_model_card(saved, stages={2: 7}))
    assert "Stage 2: ran for these weights, 7 optimizer steps." in stage2_only
    assert "Stage 1: not recorded for this save" in stage2_only
    assert (
        "Stage 3 (reward fine-tuning of the U-Net's text cross-attention): did not run for these weights."
        in stage2_only
    )
    assert "Stage 3: ran" not in stage2_only and "fine-tuned" not in stage2_only
    assert "the pretrained BertModel, frozen" in stage2_only

    after_stage3 = str(build_model_card(saved, stages={3: 4}))
    assert "Stage 3: ran for these weights, 4 optimizer steps." in after_stage3 and "fine-tuned" in after_stage3
    assert "Stage 2: not recorded for this save" in after_stage3

    nothing = str(build_model_card(saved))
    assert "No training record was given" in nothing and "Stage 3: ran" not in nothing and "fine-tuned" not in nothing
    for card in (stage2_only, after_stage3, nothing):
        assert all(snippet in card for snippet in LOAD_SNIPPETS)


# hub uploads and hub loads: tests/test_hub_roundtrip.py, over HTTP against tests/hub_server.py


# ------------------------------------------------------------------------------ CLI
def test_generate_cli_writes_sprites_and_grid(saved, tmp_path, capsys):
    from pokediff.generate import main

    out = tmp_path / "out" / "sprites.png"
    argv = [
        "--model",
        str(saved),
        "a red creature",
        "",
        "--num",
        "2",
        "--steps",
        "1",
        "--scheduler",
        "ddim",
        "--rgba",
        "--batch-size",
        "3",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    sprites = sorted(out.parent.glob("sprites_*.png"))
    assert [p.name for p in sprites] == [f"sprites_{k:03d}.png" for k in range(4)]
    first = Image.open(sprites[0])
    assert first.size == (215, 215) and first.mode == "RGBA"
    grid = Image.open(out)
    assert grid.size == (2 * 215, 2 * 215) and grid.mode == "RGBA"  # one row per prompt
    assert "wrote 4 sprites" in capsys.readouterr().out
    # sprite k uses seed + k: the second sprite alone (seed 1) matches
    again = tmp_path / "again.png"
    assert (
        main(
            [
                "--model",
                str(saved),
                "a red creature",
                "--num",
                "1",
                "--seed",
                "1",
                "--steps",
                "1",
                "--scheduler",
                "ddim",
                "--rgba",
                "--out",
                str(again),
            ]
        )
        == 0
    )
    alone = np.asarray(Image.open(tmp_path / "again_000.png")).astype(int)
    assert np.abs(alone - np.asarray(Image.open(sprites[1])).astype(int)).max() <= 2  # batched float rounding
    assert np.abs(alone - np.asarray(Image.open(sprites[0])).astype(int)).max() > 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", "x.jpg"], ".png"),
        (["--num", "0"], "--num"),
        (["--guidance", "0.5"], "guidance_scale"),
        (["--steps", "0"], "num_inference_steps"),
    ],
)
def test_generate_cli_errors(saved, tmp_path, capsys, extra, message, monkeypatch):
    from pokediff.generate import main

    monkeypatch.chdir(tmp_path)
    assert main(["--model", str(saved), "a cat", "--num", "1", *extra]) == 2
    assert message in capsys.readouterr().err


def test_generate_cli_missing_model(tmp_path, capsys):
    from pokediff.generate import main

    assert main(["--model", str(tmp_path / "nope"), "a cat", "--out", str(tmp_path / "s.png")]) == 2
    assert "pipeline folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "a cat", "--scheduler", "euler"])
