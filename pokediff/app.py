"""Web demo: ``python -m pokediff.app --model PATH [--model PATH2 ...] [--host H --port P --share]``.

A Gradio Blocks page: type a prompt, get sprites. ``--model`` takes a PokeSpritePipeline folder or hub id, or a
GAN checkpoint / run folder (GANs ignore the prompt; a type-conditional one takes a type). Everything is served
from this machine: analytics off, system fonts, no CDN.

The request handler :meth:`SpriteDemo.generate` is a plain method, usable without a server.
"""

from __future__ import annotations

import os

# before gradio is imported: no telemetry, no version check against the internet
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pokediff.data import TYPE_NAMES  # noqa: E402
from pokediff.device import resolve_device  # noqa: E402
from pokediff.eval.sampling import _generator_is_conditional, is_pipeline_folder  # noqa: E402
from pokediff.hub import EXAMPLE_PROMPTS  # noqa: E402
from pokediff.pipeline import DEFAULT_GUIDANCE_SCALE, DEFAULT_MODEL  # noqa: E402
from pokediff.postprocess import add_alpha, to_pil  # noqa: E402
from pokediff.schedulers import INFERENCE_SCHEDULERS, make_inference_scheduler  # noqa: E402

MAX_SPRITES = 8
MAX_STEPS = 100
MAX_GUIDANCE = 20.0
MAX_SEED = 2**31 - 1
MAX_PROMPT_CHARS = 500  # rejected before tokenising; the token limit of the model is checked as well
DEFAULT_STEPS = 25
SAVED_SCHEDULER = "saved"  # the scheduler stored with the pipeline (DPM-Solver++ after training)
ANY_TYPE = "any"
SCHEDULER_CHOICES = [SAVED_SCHEDULER, *INFERENCE_SCHEDULERS]
# system fonts only: gradio themes otherwise may point at Google Fonts
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
SYSTEM_MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "monospace"]


# how the benchmark and the tests drive the demo in a headless browser, offline
HEADLESS_CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ models
def describe_model_kind(path) -> str:
    """ "diffusion", "gan", or "hub" (a hub id of a pipeline) for a ``--model`` value; ValueError otherwise."""
    from pokediff.gan.checkpoint import is_gan_checkpoint

    text = str(path)
    local = Path(text).expanduser()
    if local.exists():
        if is_pipeline_folder(local):
            return "diffusion"
        if is_gan_checkpoint(local):
            return "gan"
        raise ValueError(
            f"{text} is neither a diffusion pipeline folder (no model_index.json) nor a GAN checkpoint "
            "(no gan_checkpoint.json, nor checkpoints/step_*/ of a GAN run)"
        )
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ValueError(f"model folder not found: {text}")
    return "hub"


@dataclass
class SpriteModel:
    """One ``--model``: loaded on first use, then kept; ``lock`` serialises its use across request threads
    (the pipeline's scheduler keeps per-call state, so two threads must never share it at once)."""

    source: str
    kind: str  # diffusion | gan | hub
    device: torch.device
    optimize_cpu: bool = False  # PokeSpritePipeline.optimize_for_cpu() once loaded (diffusion models)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pipeline: object = None
    schedulers: dict = field(default_factory=dict)
    generator: object = None
    meta: dict | None = None

    @property
    def name(self) -> str:
        return self.source

    @property
    def is_diffusion(self) -> bool:
        return self.kind in ("diffusion", "hub")

    @property
    def type_conditional(self) -> bool:
        if self.is_diffusion:
            return False
        if self.meta is None:
            from pokediff.gan.checkpoint import read_meta

            return _generator_is_conditional(read_meta(self.source))
        return _generator_is_conditional(self.meta)

    @property
    def loaded(self) -> bool:
        return self.pipeline is not None or self.generator is not None

    def load(self) -> None:
        """Load the weights (call with ``lock`` held); FileNotFoundError if the folder has vanished since startup."""
        if self.loaded:
            return
        if self.kind != "hub" and not Path(self.source).expanduser().exists():
            raise FileNotFoundError(f"the model folder {self.source} no longer exists")
        if self.is_diffusion:
            from pokediff.pipeline import PokeSpritePipeline

            pipe = PokeSpritePipeline.from_pretrained(self.source).to(self.device)
            pipe.set_progress_bar_config(disable=True)  # progress goes to the page (callback), not the console
            if self.optimize_cpu:
                pipe.optimize_for_cpu()
            self.schedulers = {SAVED_SCHEDULER: pipe.scheduler}
            for name in INFERENCE_SCHEDULERS:
                self.schedulers[name] = make_inference_scheduler(name, pipe.scheduler.config)
            self.pipeline = pipe
        else:
            from pokediff.gan.checkpoint import load_generator

            self.generator, self.meta = load_generator(self.source, use_ema=True, device=self.device)

    @property
    def default_guidance(self) -> float:
        """The model's own classifier-free guidance (its folder's ``guidance_scale``), read without loading it."""
        if self.pipeline is not None:
            return float(self.pipeline.config.guidance_scale)
        if self.is_diffusion:  # a folder, or the shipped model's name; another hub name is not read here
            from pokediff.pipeline import PokeSpritePipeline, shipped_model_path

            folder = shipped_model_path(self.source) or Path(self.source).expanduser()
            if (folder / "model_index.json").is_file():  # folders saved before it was a config key lack it
                return float(PokeSpritePipeline.load_config(folder).get("guidance_scale", DEFAULT_GUIDANCE_SCALE))
        return DEFAULT_GUIDANCE_SCALE

    @property
    def max_text_length(self) -> int | None:
        return self.pipeline.config.max_text_length if self.pipeline is not None else None

    def prompt_tokens(self, text: str) -> int:
        return len(self.pipeline.tokenizer(text, truncation=False)["input_ids"])


@dataclass
class SpriteRequest:
    """What the page sends, checked (see :meth:`SpriteDemo.check_request`)."""

    model: SpriteModel
    prompt: str
    negative_prompt: str | None
    num_sprites: int
    seed: int
    steps: int
    guidance: float
    scheduler: str
    transparent: bool
    sprite_type: str | None


# ------------------------------------------------------------------------------------------ the handler
def _whole_number(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise gr.Error(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    if not low <= int(value) <= high:
        raise gr.Error(f"{name} must be from {low} to {high}, got {int(value)}")
    return int(value)


class SpriteDemo:
    """The models of one server and the request handler; ``timing`` holds the latest seconds per sprite."""

    def __init__(self, sources: list[str], device="cpu", optimize_cpu: bool = False):
        if not sources:
            raise ValueError("SpriteDemo needs at least one model")
        self.device = resolve_device(str(device))
        if optimize_cpu and self.device.type != "cpu":
            raise ValueError(f"--optimize-cpu speeds up CPU sampling only; the device is {self.device}")
        self.models: dict[str, SpriteModel] = {}
        for source in sources:
            source = str(source)
            if source in self.models:
                raise ValueError(f"--model {source} is given twice")
            self.models[source] = SpriteModel(source, describe_model_kind(source), self.device, optimize_cpu)
        self.timing: dict[str, float] = {}  # model name -> seconds per sprite (startup measurement, then latest)
        self.startup_seconds: float | None = None  # one sprite of the first model, timed by warm_up()
        self.startup_steps = DEFAULT_STEPS

    @property
    def default_model(self) -> SpriteModel:
        return next(iter(self.models.values()))

    def warm_up(self, steps: int = DEFAULT_STEPS) -> float:
        """Load the first model and time one sprite at ``steps`` steps (so the page can say what a sprite costs)."""
        model = self.default_model
        # a one-step call first: the first forward pass pays one-off costs (allocator, kernel selection) that
        # would make the page's figure several times too high
        for warm_steps in (1, steps):
            self.generate(
                model.name,
                EXAMPLE_PROMPTS[0],
                "",
                1,
                0,
                False,
                warm_steps,
                model.default_guidance,
                SAVED_SCHEDULER,
                False,
                ANY_TYPE,
            )
        self.startup_seconds, self.startup_steps = self.timing[model.name], steps
        return self.startup_seconds

    # -------------------------------------------------------------- checks
    def check_request(
        self,
        model_name,
        prompt,
        negative_prompt,
        num_sprites,
        seed,
        steps,
        guidance,
        scheduler,
        transparent,
        sprite_type,
    ) -> SpriteRequest:
        """A checked :class:`SpriteRequest`; bad input raises ``gr.Error`` naming the bad field."""
        if model_name not in self.models:
            raise gr.Error(f"unknown model {model_name!r}; choose one of: {', '.join(self.models)}")
        model = self.models[model_name]
        prompt = "" if prompt is None else prompt
        negative_prompt = negative_prompt or ""
        if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
            raise gr.Error("the prompt and the negative prompt must be text")
        prompt = prompt.strip()
        if model.is_diffusion and not prompt:
            raise gr.Error('the prompt is empty: describe a sprite, e.g. "' + EXAMPLE_PROMPTS[0] + '"')
        for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
            if len(text) > MAX_PROMPT_CHARS:
                raise gr.Error(f"the {name} is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}")
        num_sprites = _whole_number(num_sprites, "number of sprites", 1, MAX_SPRITES)
        steps = _whole_number(steps, "steps", 1, MAX_STEPS)
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 1 <= guidance <= MAX_GUIDANCE:
            raise gr.Error(f"guidance must be a number from 1 to {MAX_GUIDANCE:g} (1 = no guidance), got {guidance!r}")
        seed = _whole_number(seed, "seed", 0, MAX_SEED)
        if scheduler not in SCHEDULER_CHOICES:
            raise gr.Error(f"unknown scheduler {scheduler!r}; choose one of: {', '.join(SCHEDULER_CHOICES)}")
        if sprite_type in (None, "", ANY_TYPE):
            sprite_type = None
        elif sprite_type not in TYPE_NAMES:
            raise gr.Error(f"unknown type {sprite_type!r}; choose one of: {ANY_TYPE}, {', '.join(TYPE_NAMES)}")
        return SpriteRequest(
            model,
            prompt,
            negative_prompt or None,
            num_sprites,
            seed,
            steps,
            float(guidance),
            scheduler,
            bool(transparent),
            sprite_type,
        )

    def _check_prompt_length(self, request: SpriteRequest) -> None:
        # after loading: the token limit belongs to the model; longer prompts would be cut silently
        model = request.model
        for name, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt or "")):
            tokens = model.prompt_tokens(text)
            if tokens > model.max_text_length:
                raise gr.Error(
                    f"the {name} is {tokens} tokens long; this model reads at most {model.max_text_length} — shorten it"
                )

    # -------------------------------------------------------------- generation
    def _run_diffusion(self, request: SpriteRequest, progress) -> list[Image.Image]:
        pipe = request.model.pipeline
        pipe.scheduler = request.model.schedulers[request.scheduler]

        def report_step(pipeline, step, timestep, callback_kwargs):
            # explicit, not gr.Progress(track_tqdm=True): tqdm patching is process-wide, and requests on other
            # models run in other threads at the same time
            progress((step + 1, request.steps), desc="sampling", unit="steps")
            return callback_kwargs

        return pipe(
            [request.prompt] * request.num_sprites,
            negative_prompt=request.negative_prompt,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            # sprite k uses seed + k, as in `python -m pokediff.generate`, so one sprite can be made again alone
            generator=[torch.Generator("cpu").manual_seed(request.seed + k) for k in range(request.num_sprites)],
            rgba=request.transparent,
            output_type="pil",
            callback_on_step_end=report_step,
        ).images

    def _run_gan(self, request: SpriteRequest, progress) -> list[Image.Image]:
        from pokediff.gan.generate import sample_generator

        model = request.model
        images = []
        for k in range(request.num_sprites):  # one call per sprite: sprite k uses seed + k, as for diffusion
            images.append(
                sample_generator(
                    model.generator,
                    model.meta,
                    1,
                    seed=request.seed + k,
                    type_name=request.sprite_type,
                    device=model.device,
                )
            )
            progress((k + 1, request.num_sprites), desc="sampling", unit="sprites")
        images = torch.cat(images)
        if request.transparent:
            background = model.meta.get("gan_config", {}).get("data", {}).get("background", [255, 255, 255])
            images = add_alpha(images, background)
        return to_pil(images)

    def generate(
        self,
        model_name,
        prompt,
        negative_prompt,
        num_sprites,
        seed,
        randomize_seed,
        steps,
        guidance,
        scheduler,
        transparent,
        sprite_type,
        progress=gr.Progress(),
    ):
        """The request handler: ``(gallery items [(image, caption)], seed used, status text)``.

        Bad input raises ``gr.Error`` (shown in the page; the server keeps serving).
        """
        if randomize_seed:
            seed = random.randint(0, MAX_SEED)
        request = self.check_request(
            model_name, prompt, negative_prompt, num_sprites, seed, steps, guidance, scheduler, transparent, sprite_type
        )
        model = request.model
        with model.lock:
            try:
                model.load()
            except (OSError, ValueError) as err:
                raise gr.Error(f"cannot load model {model.name}: {err}") from None
            if model.is_diffusion:
                self._check_prompt_length(request)
            elif request.sprite_type is not None and not model.generator.is_conditional:
                raise gr.Error(f"{model.name} is not type-conditional; set the type to '{ANY_TYPE}'")
            start = time.perf_counter()
            try:
                images = (self._run_diffusion if model.is_diffusion else self._run_gan)(request, progress)
            except ValueError as err:  # the pipeline's own checks, should one slip past ours
                raise gr.Error(str(err)) from None
            seconds = time.perf_counter() - start
        per_sprite = seconds / request.num_sprites
        self.timing[model.name] = per_sprite
        items = [(image, f"seed {request.seed + k}") for k, image in enumerate(images)]
        what = f"{request.steps} steps" if model.is_diffusion else model.meta.get("model_name", "GAN")
        seeds = f"seed {request.seed}"
        if len(images) > 1:
            seeds = f"seeds {request.seed}–{request.seed + len(images) - 1} (sprite k: seed {request.seed} + k)"
        status = (
            f"{len(images)} sprite(s), {images[0].width}×{images[0].height} {images[0].mode}, {seeds}, "
            f"{what}: {seconds:.2f} s on {self.device.type} ({per_sprite:.2f} s per sprite)"
        )
        return items, request.seed, status

    def timing_note(self) -> str:
        if self.startup_seconds is None:
            return ""
        steps = self.startup_steps
        what = f"at {steps} step{'s' * (steps != 1)} " if self.default_model.is_diffusion else ""
        threads = torch.get_num_threads()
        where = f"{self.device.type}, {threads} CPU thread{'s' * (threads != 1)}"
        return (
            f"On this machine ({where}) one sprite {what}takes about **{self.startup_seconds:.2f} s**; "
            "fewer steps are faster."
        )


# ------------------------------------------------------------------------------------------ the page
def build_theme():
    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO_FONTS)


def build_demo(demo_models: SpriteDemo) -> gr.Blocks:
    """The Blocks page; its one event (``api_name="generate"``) calls :meth:`SpriteDemo.generate`."""
    first = demo_models.default_model
    with gr.Blocks(title="pokediff sprites", analytics_enabled=False) as demo:
        gr.Markdown(
            "# pokediff: text to sprite\nDescribe a creature; get sprites. " + demo_models.timing_note(),
            elem_id="intro",
        )
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Dropdown(
                    list(demo_models.models), value=first.name, label="Model", visible=len(demo_models.models) > 1
                )
                prompt = gr.Textbox(
                    label="Prompt",
                    placeholder=EXAMPLE_PROMPTS[0],
                    lines=2,
                    elem_id="prompt",
                    max_length=MAX_PROMPT_CHARS,
                )
                negative = gr.Textbox(label="Negative prompt (optional)", lines=1)
                sprite_type = gr.Dropdown(
                    [ANY_TYPE, *TYPE_NAMES],
                    value=ANY_TYPE,
                    label="Type (type-conditional GAN)",
                    visible=first.type_conditional,
                )
                with gr.Row():
                    num_sprites = gr.Slider(1, MAX_SPRITES, value=4, step=1, label="Sprites", elem_id="num_sprites")
                    steps = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(1.0, MAX_GUIDANCE, value=first.default_guidance, step=0.5, label="Guidance")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                    randomize = gr.Checkbox(value=True, label="Randomize seed")
                with gr.Row():
                    scheduler = gr.Dropdown(SCHEDULER_CHOICES, value=SAVED_SCHEDULER, label="Scheduler")
                    transparent = gr.Checkbox(value=False, label="Transparent background (RGBA PNG)")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                gr.Examples([[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label="Example prompts")
            with gr.Column(scale=3):
                gallery = gr.Gallery(
                    label="Sprites",
                    columns=4,
                    format="png",
                    elem_id="gallery",
                    object_fit="contain",
                    buttons=["download", "download_all", "fullscreen"],
                )
                status = gr.Markdown(elem_id="status")

        def show_type_picker(name):
            chosen = demo_models.models.get(name)
            try:
                visible = chosen is not None and chosen.type_conditional
            except (OSError, ValueError):  # a vanished folder: generate() will say so
                visible = False
            return gr.update(visible=visible)

        model.change(show_type_picker, inputs=model, outputs=sprite_type, api_name=False)
        inputs = [
            model,
            prompt,
            negative,
            num_sprites,
            seed,
            randomize,
            steps,
            guidance,
            scheduler,
            transparent,
            sprite_type,
        ]
        # one job per model at a time; the per-model lock guards callers outside the queue too
        limit = len(demo_models.models)
        gr.on(
            [button.click, prompt.submit],
            demo_models.generate,
            inputs=inputs,
            outputs=[gallery, seed, status],
            api_name="generate",
            concurrency_limit=limit,
        )
    demo.queue(max_size=64)
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False, **kwargs):
    """Start the server (offline: system fonts, no analytics); returns what ``Blocks.launch`` returns."""
    return demo.launch(
        server_name=host, server_port=port, share=share, theme=build_theme(), footer_links=["api"], **kwargs
    )


# ------------------------------------------------------------------------------------------ command line
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pokediff.app", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="pipeline folder or hub id, or GAN checkpoint/run folder; repeat for a model picker "
        f"(default: {DEFAULT_MODEL}, the model shipped in the package)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: the whole network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    p.add_argument(
        "--optimize-cpu",
        action="store_true",
        help="diffusion models: bfloat16 U-Net compiled with frozen weights, about twice as fast on a CPU; "
        "the first request for each number of sprites compiles (about a minute on 2 cores)",
    )
    p.add_argument(
        "--timing-steps",
        type=int,
        default=DEFAULT_STEPS,
        help="steps of the one sprite timed at startup for the page's CPU-time note (0: skip)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sources = args.model or [DEFAULT_MODEL]
    if not 0 <= args.timing_steps <= MAX_STEPS:
        print(f"error: --timing-steps must be from 0 to {MAX_STEPS}, got {args.timing_steps}", file=sys.stderr)
        return 2
    try:
        demo_models = SpriteDemo(sources, device=args.device, optimize_cpu=args.optimize_cpu)
        if args.timing_steps:
            seconds = demo_models.warm_up(args.timing_steps)
            print(f"one sprite at {args.timing_steps} steps: {seconds:.2f} s on {demo_models.device.type}")
        else:
            with demo_models.default_model.lock:
                demo_models.default_model.load()
    except (OSError, ValueError, gr.Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    launch(build_demo(demo_models), host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
