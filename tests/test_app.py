"""The web demo (pokediff.app): the handler as a plain function, the served app through gradio_client, and the
page in a real browser (Debian's chromium driven by playwright)."""

import json
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import gradio as gr
import pytest
import torch
from diffusers.utils.torch_utils import is_compiled_module
from PIL import Image
from tiny import tiny_pipeline

from pokediff import app
from pokediff.app import (
    ANY_TYPE,
    HEADLESS_CHROMIUM_ARGS,
    MAX_PROMPT_CHARS,
    SpriteDemo,
    build_demo,
    free_port,
    launch,
)

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "outputs" / "test-artifacts"


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app") / "pipeline"
    tiny_pipeline(tmp_path_factory.mktemp("app_text")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def demo_models(pipeline_dir):
    return SpriteDemo([str(pipeline_dir)], device="cpu")


def call(
    demo_models,
    prompt="a red fire creature",
    num=2,
    seed=3,
    randomize=False,
    steps=2,
    guidance=2.0,
    scheduler="saved",
    transparent=False,
    sprite_type=ANY_TYPE,
    negative="",
    model=None,
    **kw,
):
    model = model or demo_models.default_model.name
    return demo_models.generate(
        model, prompt, negative, num, seed, randomize, steps, guidance, scheduler, transparent, sprite_type, **kw
    )


def pixels(image):
    return torch.tensor(list(image.getdata()))


# ------------------------------------------------------------------------------ (1) the handler, no server
def test_handler_returns_seeded_sprites_and_reports_each_step(demo_models):
    steps_seen = []
    items, seed, status = call(
        demo_models, num=3, seed=10, steps=3, progress=lambda p, desc=None, unit=None: steps_seen.append(p)
    )
    assert seed == 10 and len(items) == 3
    assert [caption for _, caption in items] == ["seed 10", "seed 11", "seed 12"]
    assert all(isinstance(im, Image.Image) and im.size == (215, 215) and im.mode == "RGB" for im, _ in items)
    assert steps_seen == [(1, 3), (2, 3), (3, 3)]
    assert "3 sprite(s), 215×215 RGB, seeds 10–12 (sprite k: seed 10 + k), 3 steps: " in status
    assert status.endswith(" s per sprite)")
    # sprite k used seed + k: asking for seed 11 alone gives the second sprite again (batching aside: +-2 levels)
    again, _, _ = call(demo_models, num=1, seed=11, steps=3)
    assert (pixels(again[0][0]) - pixels(items[1][0])).abs().max() <= 2
    assert (pixels(items[0][0]) - pixels(items[1][0])).abs().max() > 20


def test_handler_options_rgba_scheduler_negative_random_seed(demo_models):
    items, seed, _ = call(
        demo_models, num=1, transparent=True, scheduler="ddim", negative="blurry", randomize=True, seed=5
    )
    assert items[0][0].mode == "RGBA" and items[0][0].size == (215, 215)
    assert 0 <= seed <= app.MAX_SEED and items[0][1] == f"seed {seed}"
    assert demo_models.timing[demo_models.default_model.name] > 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt": "   "}, "the prompt is empty"),
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, f"the prompt is {MAX_PROMPT_CHARS + 1} characters long"),
        ({"prompt": "red " * 20}, "the prompt is 22 tokens long; this model reads at most 16"),  # + [CLS] [SEP]
        ({"negative": "blue " * 30}, "the negative prompt is 32 tokens long"),
        ({"num": 9}, "number of sprites must be from 1 to 8, got 9"),
        ({"num": 2.5}, "number of sprites must be a whole number"),
        ({"steps": 0}, "steps must be from 1 to 100, got 0"),
        ({"steps": 101}, "steps must be from 1 to 100, got 101"),
        ({"guidance": 0.5}, "guidance must be a number from 1 to 20"),
        ({"guidance": 21}, "guidance must be a number from 1 to 20"),
        ({"seed": -1}, "seed must be from 0 to"),
        ({"scheduler": "euler"}, "unknown scheduler 'euler'"),
        ({"sprite_type": "plasma"}, "unknown type 'plasma'"),
        ({"model": "elsewhere"}, "unknown model 'elsewhere'"),
    ],
)
def test_bad_input_is_a_page_error_naming_the_field(demo_models, change, message):
    with pytest.raises(gr.Error) as err:
        call(demo_models, **change)
    assert message in err.value.message


def test_a_vanished_model_folder_is_an_error_and_the_others_keep_working(pipeline_dir, tmp_path):
    second = tmp_path / "second"
    shutil.copytree(pipeline_dir, second)
    demo_models = SpriteDemo([str(pipeline_dir), str(second)])
    shutil.rmtree(second)  # after startup, before its first use
    with pytest.raises(gr.Error, match="the model folder .*second no longer exists"):
        call(demo_models, model=str(second))
    items, _, _ = call(demo_models, num=1)
    assert len(items) == 1


def test_the_guidance_slider_starts_at_the_models_own_guidance(pipeline_dir, tmp_path):
    folder = tmp_path / "guided8"
    shutil.copytree(pipeline_dir, folder)
    index = folder / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "guidance_scale": 8.0}))
    demo_models = SpriteDemo([str(folder), str(pipeline_dir)])
    first, second = demo_models.models.values()
    assert (first.default_guidance, second.default_guidance) == (8.0, 4.0)  # read before any weights load
    assert not first.loaded
    slider = next(b for b in build_demo(demo_models).blocks.values() if getattr(b, "label", None) == "Guidance")
    assert slider.value == 8.0
    first.load()
    assert first.default_guidance == first.pipeline.config.guidance_scale == 8.0


def test_optimize_cpu_compiles_the_loaded_pipelines_unet(pipeline_dir):
    demo_models = SpriteDemo([str(pipeline_dir)], device="cpu", optimize_cpu=True)
    model = demo_models.default_model
    model.load()  # compiling itself waits for the first sprite; test_pipeline checks what it draws
    assert is_compiled_module(model.pipeline.unet)
    assert model.pipeline.unet.dtype == torch.bfloat16


def test_an_unreachable_hub_id_is_a_page_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    demo_models = SpriteDemo(["someone/pokesprite"])
    assert demo_models.default_model.kind == "hub"
    with pytest.raises(gr.Error, match="cannot load model someone/pokesprite: .*not fully cached"):
        call(demo_models)


def test_gan_checkpoints_ignore_the_prompt_and_take_a_type(tmp_path):
    from pokediff.gan.config import load_gan_config
    from pokediff.gan.trainer import GanTrainer

    tiny = {
        "model.g_features": 4,
        "model.d_features": 4,
        "model.g_max_features": 16,
        "model.d_max_features": 16,
        "model.latent_dim": 8,
        "model.resolution": 16,
        "train.loss": "bce",
    }
    GanTrainer(load_gan_config(overrides={**tiny, "model.name": "cdcgan"})).save(
        tmp_path / "cdcgan" / "checkpoints" / "step_0000001"
    )
    GanTrainer(load_gan_config(overrides={**tiny, "model.name": "dcgan"})).save(tmp_path / "dcgan")
    demo_models = SpriteDemo([str(tmp_path / "cdcgan"), str(tmp_path / "dcgan")])
    cdcgan, dcgan = demo_models.models.values()
    assert cdcgan.type_conditional and not dcgan.type_conditional
    fire, seed, status = call(demo_models, prompt="", num=3, seed=4, sprite_type="fire", transparent=True)
    assert seed == 4 and [im.size for im, _ in fire] == [(16, 16)] * 3 and fire[0][0].mode == "RGBA"
    assert "cdcgan" in status
    water, _, _ = call(demo_models, prompt="ignored", num=1, seed=4, sprite_type="water", transparent=True)
    assert not torch.equal(pixels(water[0][0]), pixels(fire[0][0]))
    items, _, _ = call(demo_models, model=dcgan.name, num=2)
    assert [im.size for im, _ in items] == [(16, 16)] * 2
    with pytest.raises(gr.Error, match="is not type-conditional"):
        call(demo_models, model=dcgan.name, sprite_type="fire")


def test_command_line_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert app.main(["--model", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'empty'} is neither a diffusion pipeline folder")
    assert app.main(["--model", "./missing"]) == 2
    assert capsys.readouterr().err == "error: model folder not found: ./missing\n"


# ------------------------------------------------------------------------------ (2) the served app


@pytest.fixture(scope="module")
def server(demo_models):
    demo_models.warm_up(steps=2)
    demo = build_demo(demo_models)
    _, url, _ = launch(demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def request(prompt="a blue water turtle", num=2, seed=0, steps=2, guidance=1.0, transparent=False):
    return dict(
        model_name=None,
        prompt=prompt,
        negative_prompt="",
        num_sprites=num,
        seed=seed,
        randomize_seed=False,
        steps=steps,
        guidance=guidance,
        scheduler="saved",
        transparent=transparent,
        sprite_type=ANY_TYPE,
    )


def predict_args(demo_models, **kw):
    args = request(**kw)
    args["model_name"] = demo_models.default_model.name
    return list(args.values())


def test_served_app_returns_n_sprites_of_the_right_size(client, demo_models):
    gallery, seed, status = client.predict(
        *predict_args(demo_models, num=3, seed=7, transparent=True), api_name="/generate"
    )
    assert seed == 7 and len(gallery) == 3 and "3 sprite(s)" in status
    for k, item in enumerate(gallery):
        assert item["caption"] == f"seed {7 + k}"
        path = Path(item["image"]["path"] if isinstance(item["image"], dict) else item["image"])
        assert path.suffix == ".png"  # downloadable as PNG, alpha kept
        with Image.open(path) as im:
            assert im.size == (215, 215) and im.mode == "RGBA"


def test_served_app_shows_bad_input_and_keeps_serving(client, demo_models):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="the prompt is empty"):
        client.predict(*predict_args(demo_models, prompt=""), api_name="/generate")
    gallery, _, _ = client.predict(*predict_args(demo_models, num=1), api_name="/generate")
    assert len(gallery) == 1


def test_twenty_concurrent_requests_each_get_their_own_result(client, demo_models):
    jobs = [
        client.submit(*predict_args(demo_models, num=1, seed=100 + i, steps=1), api_name="/generate") for i in range(20)
    ]
    for i, job in enumerate(jobs):  # gradio_client's Job: result() waits (concurrent.futures.wait does not)
        gallery, seed, _ = job.result(timeout=240)
        assert seed == 100 + i and [item["caption"] for item in gallery] == [f"seed {100 + i}"]


# ------------------------------------------------------------------------------ (3) a real browser
@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium; .ci/run installs it)",
)
def test_page_in_a_real_browser_generates_sprites_offline(server):
    from playwright.sync_api import sync_playwright

    requests = []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=HEADLESS_CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(server, wait_until="networkidle")
            assert "takes about" in page.locator("#intro").inner_text()  # the CPU-time note
            page.locator("#prompt textarea").fill("a small green grass type creature")
            page.locator("#num_sprites input[type=number]").fill("2")
            page.locator("#steps input[type=number]").fill("2")
            page.locator("#steps input[type=number]").press("Enter")
            start = time.perf_counter()
            page.locator("#generate").click()
            page.locator("#gallery img").first.wait_for(state="visible", timeout=120_000)
            first_sprite_s = time.perf_counter() - start
            page.wait_for_function("document.querySelectorAll('#gallery img').length >= 2", timeout=60_000)
            page.locator("#status").get_by_text("2 sprite(s)").wait_for(timeout=30_000)
            image = page.locator("#gallery img").first
            assert image.evaluate("img => img.complete && img.naturalWidth") == 215
            page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
        finally:
            browser.close()
    outside = [
        url
        for url in requests
        if urlparse(url).hostname not in ("127.0.0.1", None) and not url.startswith(("data:", "blob:"))
    ]
    (ARTIFACTS / "app_requests.json").write_text(
        json.dumps({"time_to_first_sprite_s": round(first_sprite_s, 2), "requests": requests}, indent=1)
    )
    assert requests and not outside, outside
