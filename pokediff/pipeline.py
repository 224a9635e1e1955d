"""PokeSpritePipeline: text -> 215x215 sprite with a latent diffusion model (inference only).

A saved folder loads two ways: ``PokeSpritePipeline.from_pretrained(folder)`` with pokediff installed, or
``diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` from the code the folder
carries (diffusers' custom-pipeline mechanism: ``model_index.json`` names ``["pipeline_pokesprite",
"PokeSpritePipeline"]`` and ``["sprite_vae", "SpriteVAE"]``). This file is that pipeline code, so it imports
pokediff modules only relatively (``postprocess``, ``fileio``): diffusers copies relative imports along with it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import is_compiled_module, randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .fileio import check_file_whole, swap_into_place
from .postprocess import DEFAULT_RGBA_TOLERANCE, add_alpha, to_pil
from .text_reference import load_reference_text_encoder, weights_fingerprint

logger = logging.getLogger(__name__)

DEFAULT_GUIDANCE_SCALE = 4.0
DEFAULT_NUM_INFERENCE_STEPS = 25
DEFAULT_GUIDANCE_INTERVAL = (0.0, 1.0)  # classifier-free guidance on every step
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
TRUNCATION_MARKER = "pokediff_prompts_truncated"  # set on the "N of M prompts ... truncated" log record
PIPELINE_COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
# a component a folder may have: the body-shape classifier of shape guidance (stage 3's method "shape_guidance")
OPTIONAL_COMPONENTS = ("shape_classifier",)
# shape guidance acts while the silhouette forms: on this first fraction of the sampler's steps
SHAPE_GUIDANCE_END = 0.6

# What a saved folder carries for `trust_remote_code` loading: this file (named by model_index.json's
# `_class_name`), the modules it imports relatively, and each custom component's module in its subfolder.
PIPELINE_FILE = "pipeline_pokesprite"
HELPER_FILES = ("postprocess.py", "fileio.py", "text_reference.py")
# A text encoder unchanged from a public one is saved as its name only (``text_encoder_name``): these two
# components are then absent from the folder and loaded by that name.
REFERENCE_COMPONENTS = ("text_encoder", "tokenizer")
WEIGHTED_COMPONENTS = ("vae", "unet", "text_encoder")
# Models that ship inside the pokediff package, loadable offline by their hub-style name: name -> folder under
# pokediff/pretrained/. Any other name goes to the hub as usual.
SHIPPED_MODELS = {"pokediff/pokediff-64": "pokediff-64"}
DEFAULT_MODEL = "pokediff/pokediff-64"
SHIPPED_ROOT = Path(__file__).resolve().parent / "pretrained"
# Shipped component module -> the installed module `PokeSpritePipeline.from_pretrained` loads the class from.
INSTALLED_MODULES = {
    "sprite_vae": "pokediff.models.vae",
    "sprite_shape_classifier": "pokediff.models.shape_classifier",
}


def clean_latent_estimate(sample, model_output, alpha_bar, prediction_type: str):
    """The clean latent x0 a model output implies for ``sample`` at cumulative signal ``alpha_bar`` (a number or a
    tensor broadcasting against ``sample``), for epsilon, v or sample prediction."""
    signal, noise = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if prediction_type == "v_prediction":
        return signal * sample - noise * model_output
    if prediction_type == "epsilon":
        return (sample - noise * model_output) / signal
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def model_output_for(sample, x0, alpha_bar, prediction_type: str):
    """The model output that implies clean latent ``x0`` for ``sample``: the inverse of ``clean_latent_estimate``."""
    signal, noise = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if prediction_type == "v_prediction":
        return (signal * sample - x0) / noise
    if prediction_type == "epsilon":
        return (sample - signal * x0) / noise
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def shipped_model_path(name) -> Path | None:
    """The packaged folder of a shipped model's name (``pokediff/pokediff-64``), or None for any other name.

    (In a folder's copy of this file, run by ``trust_remote_code`` without pokediff, nothing is shipped.)
    """
    folder = SHIPPED_MODELS.get(os.fspath(name)) if isinstance(name, (str, os.PathLike)) else None
    # inside the package the folder is returned even when damaged, so loading names what is missing instead of
    # asking the hub for a model the package should hold
    return SHIPPED_ROOT / folder if folder and SHIPPED_ROOT.is_dir() else None


def _module_file_name(class_name: str) -> str:
    """SpriteVAE -> sprite_vae: the name a custom component's code is saved under in its subfolder."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", class_name).lower()


def _is_library(module_name) -> bool:
    # diffusers / transformers classes load from the library; anything else is custom code that must ship
    return module_name is None or module_name.split(".")[0] in LOADABLE_CLASSES


def _is_our_class_name(class_name) -> bool:
    # "PokeSpritePipeline" (folders saved before custom-code loading) or ["pipeline_pokesprite", "PokeSpritePipeline"]
    if isinstance(class_name, (list, tuple)) and len(class_name) == 2:
        class_name = class_name[1]
    return class_name == "PokeSpritePipeline"


class PokeSpritePipeline(DiffusionPipeline):
    r"""Text-to-sprite latent diffusion.

    Components: ``vae`` (:class:`~pokediff.models.vae.SpriteVAE`), ``unet`` (``UNet2DConditionModel`` with
    ``encoder_hid_dim`` = text width), ``text_encoder`` + ``tokenizer`` (a transformers BERT-family model),
    ``scheduler`` (DPM-Solver++ by default; DDIM/DDPM via ``from_config``). Config: ``max_text_length`` (tokens)
    and ``background`` (the RGB colour sprites were composited on in training).

    ``text_encoder_name`` (a hub id, e.g. ``sentence-transformers/all-MiniLM-L6-v2``): the text encoder is that
    public model, unchanged. Without ``text_encoder`` / ``tokenizer`` it is loaded by name (packaged copy first),
    and ``save_pretrained`` writes the name instead of the weights while they still equal what was loaded.

    ``shape_classifier`` (optional, :class:`~pokediff.models.shape_classifier.SpriteShapeClassifier`): shape
    guidance. For a prompt that names a body shape ("a blue bird with wings", a caption's "with a four-legged
    body"), each of the first ``SHAPE_GUIDANCE_END`` of the steps moves the sampler's clean-latent estimate up the
    gradient of the classifier's log-probability of that shape (classifier guidance on the decoded estimate);
    ``shape_guidance_scale`` (config: the default of ``__call__``'s argument) sets how far.

    ``guidance_scale`` (config): the classifier-free guidance ``__call__`` uses when not given one; training
    records its ``scheduler.guidance_scale`` (4), and a folder may set another that suits its weights.
    ``guidance_interval`` (config, ``(start, stop)`` fractions of the steps): classifier-free guidance applies only
    to steps ``int(start * n) <= i < int(stop * n)`` (diffusers' guiders' ``start``/``stop``; at least one step); the
    other steps run the U-Net once, on the prompt alone (Kynkäänniemi et al. 2024: guidance at high noise costs
    diversity).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = [*REFERENCE_COMPONENTS, *OPTIONAL_COMPONENTS]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: ModelMixin,
        unet: UNet2DConditionModel,
        text_encoder: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        scheduler: SchedulerMixin,  # keyword-only: required, after the two optional components
        max_text_length: int = 32,
        background: list = (255, 255, 255),
        text_encoder_name: str | None = None,
        shape_classifier: ModelMixin | None = None,
        shape_guidance_scale: float = 0.0,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        guidance_interval: list[float] | tuple[float, float] = DEFAULT_GUIDANCE_INTERVAL,
    ):
        super().__init__()
        if text_encoder is None or tokenizer is None:
            if not text_encoder_name:
                raise ValueError("PokeSpritePipeline needs text_encoder and tokenizer, or a text_encoder_name")
            tokenizer, text_encoder = load_reference_text_encoder(text_encoder_name)
        # weights at construction: save_pretrained writes the name only while they are unchanged
        self._reference_fingerprint = weights_fingerprint(text_encoder) if text_encoder_name else None
        background = [int(c) for c in background]
        if len(background) != 3 or not all(0 <= c <= 255 for c in background):
            raise ValueError(f"background must be 3 integers in 0..255 (RGB), got {background}")
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"unet.in_channels ({unet.config.in_channels}) != vae.latent_channels ({vae.config.latent_channels})"
            )
        text_dim = text_encoder.config.hidden_size
        if unet.config.encoder_hid_dim not in (None, text_dim):
            raise ValueError(f"unet.encoder_hid_dim ({unet.config.encoder_hid_dim}) != text encoder width ({text_dim})")
        model_max = getattr(tokenizer, "model_max_length", None)
        if int(max_text_length) < 2 or (model_max is not None and model_max < 100_000 and max_text_length > model_max):
            raise ValueError(f"max_text_length must be 2..{model_max} tokens for this tokenizer, got {max_text_length}")
        self._check_shape_guidance_scale(shape_guidance_scale, shape_classifier)
        self._check_guidance_scale(guidance_scale)
        self._check_guidance_interval(guidance_interval)
        self.register_modules(
            vae=vae,
            unet=unet,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            shape_classifier=shape_classifier,
        )
        self.register_to_config(
            max_text_length=int(max_text_length),
            background=background,
            text_encoder_name=text_encoder_name,
            shape_guidance_scale=float(shape_guidance_scale),
            guidance_scale=float(guidance_scale),
            guidance_interval=[float(f) for f in guidance_interval],
        )

    def text_encoder_saved_by_name(self) -> bool:
        """Whether ``save_pretrained`` writes the text encoder as its name (its weights are the public ones)."""
        if self._reference_fingerprint is None:
            return False
        if weights_fingerprint(self.text_encoder) == self._reference_fingerprint:
            return True
        logger.warning(
            "the text encoder changed since it was loaded as %s: it is saved in full", self.config.text_encoder_name
        )
        return False

    # -------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a saved folder or hub id with the installed pokediff classes (safetensors only).

        The folder's own code is not run (that is what ``DiffusionPipeline.from_pretrained(...,
        trust_remote_code=True)`` does); local folders are checked first for clear errors. A shipped model's
        name (``pokediff/pokediff-64``) loads the packaged folder with no network, unless a ``revision`` of
        the hub repo is asked for.
        """
        shipped = shipped_model_path(pretrained_model_name_or_path)
        if shipped is not None and kwargs.get("revision") is None:
            try:
                check_pipeline_folder(shipped)
            except (OSError, ValueError) as err:
                raise type(err)(
                    f"the shipped model {pretrained_model_name_or_path} is damaged: {err}; reinstall pokediff "
                    f"(pip install --force-reinstall pokediff) or restore the file from git"
                ) from err
            pretrained_model_name_or_path = shipped
        else:
            path = Path(os.fspath(pretrained_model_name_or_path)).expanduser()
            if path.exists() or str(pretrained_model_name_or_path).startswith((".", "/", "~")):
                check_pipeline_folder(path)
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``model_index.json`` with its custom-code entries pointed at the installed classes.

        diffusers would load ``["pipeline_pokesprite", ...]`` and ``["sprite_vae", ...]`` from the folder's files
        (and ask for ``trust_remote_code``); this class is that pipeline already, and the VAE class comes from the
        installed package. Folders saved before (``"PokeSpritePipeline"``, ``["pokediff.models.vae", ...]``) pass as is.
        """
        loaded = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if _is_our_class_name(config.get("_class_name")):
            config["_class_name"] = cls.__name__
        for name, entry in config.items():
            if name.startswith("_") or not isinstance(entry, (list, tuple)) or len(entry) != 2:
                continue
            module = INSTALLED_MODULES.get(entry[0], entry[0])
            if module in INSTALLED_MODULES.values():
                try:
                    importlib.import_module(module)  # diffusers resolves it from sys.modules
                except ImportError:  # this is the folder's copy, without pokediff: keep its own code
                    continue
                config[name] = [module, entry[1]]
        return loaded

    @classmethod
    def download(cls, pretrained_model_name, **kwargs) -> str:
        """Fetch a hub repo's files (safetensors weights only) without resolving, or running, its code."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return snapshot_download(
                pretrained_model_name,
                cache_dir=kwargs.get("cache_dir"),
                revision=kwargs.get("revision"),
                token=kwargs.get("token"),
                proxies=kwargs.get("proxies"),
                force_download=kwargs.get("force_download", False),
                local_files_only=kwargs.get("local_files_only", False),
                ignore_patterns=["*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl", "*.msgpack", "*.onnx", "*.h5"],
            )
        except LocalEntryNotFoundError as err:  # offline, or the hub unreachable: say so, as diffusers does
            raise EnvironmentError(
                f"Cannot load model {pretrained_model_name}: the model is not fully cached locally and the Hub "
                f"cannot be reached ({err})"
            ) from err

    # -------------------------------------------------------------- saving
    def save_pretrained(
        self,
        save_directory,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size=None,
        push_to_hub: bool = False,
        use_flashpack: bool = False,
        **kwargs,
    ):
        """``DiffusionPipeline.save_pretrained``, written atomically, plus the code a ``trust_remote_code`` load runs.

        Everything is written to a temporary folder beside the target first; each entry is then swapped in
        (a folder swap is atomic) and ``model_index.json`` goes last. Entries of an existing folder that the
        pipeline does not write (``README.md``) are kept, but a component folder it no longer writes is removed.
        An unchanged public text encoder is written as its name only (``text_encoder_name``). The folder's size is
        logged. ``push_to_hub=True`` (with ``repo_id``, ``token``, ``private``, ``commit_message``,
        ``create_pr``) uploads the folder as diffusers does.
        """
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        by_name = self.text_encoder_saved_by_name()
        kept = {name: getattr(self, name) for name in REFERENCE_COMPONENTS}
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
        try:
            if by_name:  # diffusers skips an optional component registered as None
                self.register_modules(**dict.fromkeys(REFERENCE_COMPONENTS))
            super().save_pretrained(
                tmp,
                safe_serialization=safe_serialization,
                variant=variant,
                max_shard_size=max_shard_size,
                use_flashpack=use_flashpack,
            )
            self._save_code(tmp)
            target.mkdir(exist_ok=True)
            for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json"):
                swap_into_place(entry, target / entry.name)
            for name in REFERENCE_COMPONENTS if by_name else ():
                shutil.rmtree(target / name, ignore_errors=True)  # a stale full copy would contradict the index
        finally:
            if by_name:
                self.register_modules(**kept)
            shutil.rmtree(tmp, ignore_errors=True)
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        logger.info("saved pipeline %s (%.1f MB)", target, size / 1e6)
        if push_to_hub:
            self._push_folder(target, **kwargs)

    def _save_code(self, folder: Path) -> None:
        """Copy this module, its helpers and each custom component's module into ``folder``; name them in the index."""
        index_file = folder / "model_index.json"
        index = json.loads(index_file.read_text())
        here = Path(inspect.getsourcefile(PokeSpritePipeline))
        shutil.copyfile(here, folder / f"{PIPELINE_FILE}.py")
        for name in HELPER_FILES:
            shutil.copyfile(here.parent / name, folder / name)
        index["_class_name"] = [PIPELINE_FILE, PokeSpritePipeline.__name__]
        for name in PIPELINE_COMPONENTS + OPTIONAL_COMPONENTS:
            library, class_name = index.get(name) or (None, None)
            if library is None or _is_library(library):
                continue
            module = _module_file_name(class_name)
            shutil.copyfile(inspect.getsourcefile(type(getattr(self, name))), folder / name / f"{module}.py")
            index[name] = [module, class_name]
        tmp = folder / ".model_index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        swap_into_place(tmp, index_file)

    def _push_folder(self, folder: Path, **kwargs):
        # what DiffusionPipeline.save_pretrained(push_to_hub=True) does, on the folder just swapped in
        from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
        from huggingface_hub import create_repo

        token = kwargs.pop("token", None)
        repo_id = kwargs.pop("repo_id", folder.name)
        repo_id = create_repo(repo_id, exist_ok=True, private=kwargs.pop("private", None), token=token).repo_id
        card = populate_model_card(load_or_create_model_card(repo_id, token=token, is_pipeline=True))
        tmp = folder / ".README.md.tmp"
        card.save(tmp)
        swap_into_place(tmp, folder / "README.md")
        return self._upload_folder(
            folder,
            repo_id,
            token=token,
            commit_message=kwargs.pop("commit_message", None),
            create_pr=kwargs.pop("create_pr", False),
        )

    # -------------------------------------------------------------- properties
    @property
    def latent_size(self) -> int:
        return self.vae.latent_size()

    @property
    def resolution(self) -> int:
        return self.vae.config.sample_size

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self):
        return self._num_timesteps

    # -------------------------------------------------------------- speed
    def optimize_for_cpu(self, dtype: torch.dtype = torch.bfloat16) -> "PokeSpritePipeline":
        """Sample about twice as fast on a CPU: the U-Net in ``dtype`` (the latents and the guidance arithmetic stay
        float32), compiled by inductor with its weights frozen into the graph and a C++ wrapper between kernels. The
        VAE and the shape classifier run in ``dtype`` too (not compiled: shape guidance back-propagates through both
        on each guided step, and inductor's training graphs were slower there).

        The first call for each batch size compiles (about a minute on 2 cores; inductor caches it on disk; with a
        ``guidance_interval`` short of all steps, a call runs two batch sizes, guided and not), so it
        pays in a process that draws many sprites (the demo, a batch job), not in a one-off command. Needs a C++
        compiler. The weights are frozen into the compiled graph: load the pipeline again to change them, and save
        from a pipeline that was not optimized. Returns the pipeline.
        """
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"optimize_for_cpu: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        if self.device.type != "cpu":
            raise ValueError(f"optimize_for_cpu: the pipeline is on {self.device}; it optimizes CPU sampling only")
        if is_compiled_module(self.unet):
            raise ValueError("optimize_for_cpu: the U-Net is already compiled; load the pipeline again to redo it")
        # nn.Module.to, not ModelMixin.to: the latter warns about float32-only modules these models do not have
        for model in (self.unet, self.vae, self.shape_classifier):
            if model is not None:
                torch.nn.Module.to(model, dtype=dtype)
        self.unet = torch.compile(self.unet, dynamic=False, options={"freezing": True, "cpp_wrapper": True})
        return self

    # -------------------------------------------------------------- inputs
    @staticmethod
    def _check_prompt(prompt, name: str) -> int:
        """Raise unless ``prompt`` is a string or a non-empty list of strings; returns how many prompts."""
        if isinstance(prompt, str):
            return 1
        if isinstance(prompt, (list, tuple)):
            if len(prompt) == 0:
                raise ValueError(f'`{name}` is an empty list; give at least one prompt ("" = unconditional)')
            bad = [p for p in prompt if not isinstance(p, str)]
            if bad:
                raise ValueError(f"`{name}` must hold strings only; got {type(bad[0]).__name__} {bad[0]!r}")
            return len(prompt)
        raise ValueError(f"`{name}` must be a string or a list of strings, got {type(prompt).__name__} {prompt!r}")

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        num_inference_steps,
        guidance_scale,
        num_images_per_prompt,
        output_type,
        latents,
        rgba,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
        shape_guidance_scale=0.0,
        guidance_interval=DEFAULT_GUIDANCE_INTERVAL,
    ) -> None:
        num_prompts = self._check_prompt(prompt, "prompt")
        if negative_prompt is not None:
            num_negatives = self._check_prompt(negative_prompt, "negative_prompt")
            if num_negatives not in (1, num_prompts):
                raise ValueError(
                    f"`negative_prompt` has {num_negatives} entries but `prompt` has {num_prompts}; give one or as many"
                )
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}")
        self._check_guidance_scale(guidance_scale)
        self._check_guidance_interval(guidance_interval)
        n = num_images_per_prompt
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"`num_images_per_prompt` must be an integer >= 1, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if rgba and output_type == "latent":
            raise ValueError("`rgba=True` needs decoded images; it cannot be combined with output_type='latent'")
        if latents is not None:
            expected = (
                num_prompts * num_images_per_prompt,
                self.unet.config.in_channels,
                self.latent_size,
                self.latent_size,
            )
            if tuple(latents.shape) != expected:
                raise ValueError(f"`latents` must have shape {expected}, got {tuple(latents.shape)}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError("`callback_on_step_end` must be callable")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may only name {self._callback_tensor_inputs}, got {unknown}"
            )
        self._check_shape_guidance_scale(shape_guidance_scale, self.shape_classifier)

    @staticmethod
    def _check_guidance_scale(scale) -> None:
        # `not >= 1` also refuses NaN, which would otherwise switch guidance off without a word
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 1 or math.isinf(scale):
            raise ValueError(
                f"`guidance_scale` must be a finite number >= 1 (1 = no classifier-free guidance), got {scale!r}"
            )

    @staticmethod
    def _check_guidance_interval(interval) -> None:
        ok = isinstance(interval, (tuple, list)) and len(interval) == 2
        ok = ok and all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in interval)
        if not (ok and 0 <= interval[0] < interval[1] <= 1):
            raise ValueError(
                "`guidance_interval` must be (start, stop) fractions of the steps with 0 <= start < stop <= 1, "
                f"got {interval!r}"
            )

    @staticmethod
    def _check_shape_guidance_scale(scale, shape_classifier) -> None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < math.inf:
            raise ValueError(f"`shape_guidance_scale` must be a finite number >= 0 (0 = off), got {scale!r}")
        if scale > 0 and shape_classifier is None:
            raise ValueError(
                f"`shape_guidance_scale`={scale:g} needs a shape_classifier, and this pipeline has none "
                "(stage 3's shape_guidance method fits one)"
            )

    # -------------------------------------------------------------- text
    def _warn_if_cut(self, captions: list[str], what: str) -> None:
        max_length = self.config.max_text_length
        full = self.tokenizer(captions, padding=False, truncation=False)["input_ids"]
        cut = sum(len(ids) > max_length for ids in full)
        if cut:
            logger.warning(
                "%d of %d %s are longer than %d tokens and were truncated",
                cut,
                len(captions),
                what,
                max_length,
                extra={TRUNCATION_MARKER: True},  # lets a caller that already counted the whole list drop this line
            )

    def _tokenize(self, captions: list[str]):
        """Pad/truncate to ``max_text_length`` tokens, as training does."""
        max_length = self.config.max_text_length
        return self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )

    @torch.no_grad()
    def _embed(self, captions: list[str], device, num_images_per_prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self._tokenize(captions)
        input_ids = tokens["input_ids"].to(device)
        mask = tokens["attention_mask"].to(device)
        embeds = self.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state.to(self.unet.dtype)
        return embeds.repeat_interleave(num_images_per_prompt, dim=0), mask.repeat_interleave(
            num_images_per_prompt, dim=0
        )

    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt=None,
    ):
        """Text embeddings and masks: ``(prompt_embeds, prompt_mask, negative_embeds, negative_mask)``.

        ``prompt`` / ``negative_prompt``: a string or a list of strings (one negative serves every prompt).
        The unconditional embedding is that of the empty caption "" (as in training's caption dropout)
        unless ``negative_prompt`` is given; the negatives are None without guidance.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self._warn_if_cut(prompts, "prompts")
        if not do_classifier_free_guidance:
            return (*self._embed(prompts, device, num_images_per_prompt), None, None)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            self._warn_if_cut(negatives, "negative prompts")
        # both sides of guidance in one text-encoder call: on 2 CPU cores 19 ms instead of 26 for one prompt
        embeds, mask = self._embed(prompts + negatives, device, num_images_per_prompt)
        split = len(prompts) * num_images_per_prompt
        return embeds[:split], mask[:split], embeds[split:], mask[split:]

    # -------------------------------------------------------------- latents / decoding
    def prepare_latents(self, batch_size: int, dtype, device, generator, latents=None) -> torch.Tensor:
        shape = (batch_size, self.unet.config.in_channels, self.latent_size, self.latent_size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"got {len(generator)} generators for {batch_size} images (prompts x num_images_per_prompt); "
                "pass one generator or exactly one per image"
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def decode_latents(self, latents, prompt_embeds=None, prompt_mask=None) -> torch.Tensor:
        """Scaled latents -> RGB images (N, 3, H, W) in [0, 1]."""
        return self._decode(latents, prompt_embeds, prompt_mask)

    def _decode(self, latents, prompt_embeds=None, prompt_mask=None) -> torch.Tensor:
        # decode_latents with gradients where the caller enables them (shape guidance)
        latents = self.vae.unscale_latents(latents)
        cross = self.vae.decoder_cross_attn is not None
        vae_dtype = self.vae.dtype
        image = self.vae.decode(
            latents.to(vae_dtype),
            encoder_hidden_states=prompt_embeds.to(vae_dtype) if cross else None,
            encoder_attention_mask=prompt_mask if cross else None,
        ).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def prepare_extra_step_kwargs(self, generator) -> dict:
        # only the stochastic samplers (DDPM, SDE DPM-Solver) take a generator
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        return {"generator": generator} if "generator" in accepted else {}

    def guide_shape(self, latents, t, model_output, targets, scale: float, prompt_embeds=None, prompt_mask=None):
        """``model_output`` moved so that its clean-latent estimate x0 becomes x0 + ``scale`` x the gradient of
        the shape classifier's log-probability of each sample's ``targets`` group (-1: left as it is) on the
        decoded x0. Classifier guidance on the estimate, with the U-Net's output held fixed: no backward pass
        through the U-Net, one through the VAE decoder and the small classifier."""
        alpha_bar = self.scheduler.alphas_cumprod.to(latents.device)[t].float()
        prediction_type = self.scheduler.config.prediction_type
        x0 = clean_latent_estimate(latents, model_output, alpha_bar, prediction_type)
        x0 = x0.detach().float().requires_grad_(True)
        with torch.enable_grad():
            images = self._decode(x0, prompt_embeds, prompt_mask)
            log_prob = self.shape_classifier(images).float().log_softmax(dim=-1)
            chosen = log_prob.gather(1, targets.clamp(min=0)[:, None].to(log_prob.device)).squeeze(1)
            (gradient,) = torch.autograd.grad((chosen * (targets >= 0).to(chosen)).sum(), x0)
        x0 = (x0 + scale * gradient).detach().to(model_output.dtype)
        return model_output_for(latents, x0, alpha_bar, prediction_type)

    def denoise(
        self,
        latents,
        timesteps,
        prompt_embeds,
        prompt_mask,
        negative_prompt_embeds,
        negative_mask,
        extra_step_kwargs: dict,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
        shape_targets: torch.Tensor | None = None,
        shape_guidance_scale: float = 0.0,
        guidance_interval: tuple[float, float] = DEFAULT_GUIDANCE_INTERVAL,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampling loop; returns the final latents and the (possibly callback-replaced) prompt embeddings.
        ``shape_targets``: (N,) the shape group each sample's prompt names (-1: none), for shape guidance."""
        shape_steps = 0
        if shape_targets is not None and shape_guidance_scale > 0 and bool((shape_targets >= 0).any()):
            shape_steps = math.ceil(SHAPE_GUIDANCE_END * len(timesteps))
        first_guided, stop_guided = (int(f * len(timesteps)) for f in guidance_interval)
        stop_guided = max(stop_guided, first_guided + 1)  # a narrow interval on few steps still guides one
        unet_dtype = self.unet.dtype  # ModelMixin.dtype walks every module (~1 ms for this U-Net): once, not per step
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                guided = self.do_classifier_free_guidance and first_guided <= i < stop_guided
                if guided:
                    model_input = torch.cat([latents, latents])
                    text = torch.cat([negative_prompt_embeds, prompt_embeds])
                    text_mask = torch.cat([negative_mask, prompt_mask])
                else:
                    model_input, text, text_mask = latents, prompt_embeds, prompt_mask
                model_input = self.scheduler.scale_model_input(model_input, t).to(unet_dtype)
                noise_pred = self.unet(
                    model_input, t, encoder_hidden_states=text, encoder_attention_mask=text_mask, return_dict=False
                )[0].to(latents.dtype)
                if guided:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + self.guidance_scale * (cond - uncond)
                if i < shape_steps:
                    noise_pred = self.guide_shape(
                        latents, t, noise_pred, shape_targets, shape_guidance_scale, prompt_embeds, prompt_mask
                    )
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    local_tensors = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {k: local_tensors[k] for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()
        return latents, prompt_embeds

    def postprocess(self, images: torch.Tensor, output_type: str, rgba: bool, rgba_tolerance: float):
        """RGB (N, 3, H, W) in [0, 1] -> the requested output type, with the background keyed out if ``rgba``."""
        if rgba:
            images = add_alpha(images, self.config.background, rgba_tolerance)
        if output_type == "np":
            return images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "pil":
            return to_pil(images)
        return images

    # -------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        rgba: bool = False,
        rgba_tolerance: float = DEFAULT_RGBA_TOLERANCE,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        shape_guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
    ):
        r"""Generate sprites.

        Args:
            prompt: a caption or a list of captions; "" samples unconditionally.
            negative_prompt: replaces the empty caption on the unconditional side of guidance.
            num_inference_steps: denoising steps (>= 1).
            guidance_scale: classifier-free guidance weight (>= 1; 1 disables guidance; None = the folder's
                ``guidance_scale``, 4 unless the folder sets another).
            num_images_per_prompt: images per caption.
            generator: a ``torch.Generator`` or one per image, for reproducible sampling.
            latents: initial noise (N, C, h, w), instead of sampling it.
            output_type: "pil" | "np" (N, H, W, C) | "pt" (N, C, H, W) in [0, 1] | "latent".
            rgba: add an alpha channel with the background colour keyed out (see ``postprocess.background_alpha``).
            rgba_tolerance: per-channel distance in [0, 1] still treated as background.
            callback_on_step_end: ``fn(pipe, step, timestep, callback_kwargs) -> dict`` after each step.
            shape_guidance_scale: how hard shape guidance pulls towards the body shape a prompt names (0 = off;
                None = the folder's ``shape_guidance_scale``); needs a ``shape_classifier``. Prompts that name no
                shape are sampled as without it.
            guidance_interval: ``(start, stop)``: classifier-free guidance only on steps ``int(start * n) <= i <
                int(stop * n)`` of ``n`` (at least one); the rest cost one U-Net pass instead of two (None = the folder's
                ``guidance_interval``, all steps unless the folder sets another).

        Returns:
            ``ImagePipelineOutput(images)`` (or a tuple if ``return_dict=False``).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs
        if shape_guidance_scale is None:
            shape_guidance_scale = self.config.shape_guidance_scale
        if guidance_scale is None:
            guidance_scale = self.config.guidance_scale
        if guidance_interval is None:
            guidance_interval = tuple(self.config.guidance_interval)
        self.check_inputs(
            prompt,
            negative_prompt,
            num_inference_steps,
            guidance_scale,
            num_images_per_prompt,
            output_type,
            latents,
            rgba,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            shape_guidance_scale,
            guidance_interval,
        )
        self._guidance_scale = guidance_scale

        # 2. Define call parameters
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
        device = self._execution_device

        # 3. Encode the prompts (and the negatives / "" for classifier-free guidance)
        prompt_embeds, prompt_mask, negative_prompt_embeds, negative_mask = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt
        )

        # 4. Prepare timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        # 5. Prepare latent variables (float32 whatever the U-Net's precision: the sampler's state and the guidance
        # arithmetic lose nothing, and a seed draws the same noise for a float32 and a bfloat16 U-Net)
        latents = self.prepare_latents(batch_size, torch.float32, device, generator, latents)

        # 6. Prepare extra step kwargs, and the body shape each prompt names for shape guidance
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator)
        shape_targets = None
        if shape_guidance_scale > 0:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            shape_targets = self.shape_classifier.target_indices(prompts).repeat_interleave(num_images_per_prompt)

        # 7. Denoising loop
        latents, prompt_embeds = self.denoise(
            latents,
            timesteps,
            prompt_embeds,
            prompt_mask,
            negative_prompt_embeds,
            negative_mask,
            extra_step_kwargs,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            shape_targets,
            shape_guidance_scale,
            guidance_interval,
        )

        # 8. Decode and convert to the requested output
        if output_type == "latent":
            images = latents
        else:
            images = self.postprocess(
                self.decode_latents(latents, prompt_embeds, prompt_mask), output_type, rgba, rgba_tolerance
            )

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


# ------------------------------------------------------------------------------------------ folders
def check_pipeline_folder(path) -> dict:
    """Raise a clear error unless ``path`` is a saved PokeSpritePipeline folder; returns its model_index."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pipeline folder not found: {path}")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is a file, not a pipeline folder")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        hint = ""
        if (path / "pipeline" / "model_index.json").is_file():
            hint = f"; this looks like a training run folder, the pipeline is {path / 'pipeline'}"
        raise FileNotFoundError(f"{path} is not a diffusers pipeline folder: it has no model_index.json{hint}")
    with open(index_file) as f:
        index = json.load(f)
    class_name = index.get("_class_name")
    if not _is_our_class_name(class_name):
        raise ValueError(f"{path} holds a {class_name!r} pipeline, not a {PokeSpritePipeline.__name__}")
    for name in PIPELINE_COMPONENTS:
        entry = index.get(name)
        if name in REFERENCE_COMPONENTS and entry and entry[0] is None and index.get("text_encoder_name"):
            continue  # loaded by name
        if not entry or entry[0] is None:
            raise ValueError(f"{index_file} lacks the '{name}' component")
        if not (path / name).is_dir():
            raise FileNotFoundError(f"pipeline folder {path} lacks the '{name}' component folder ({path / name})")
        if name in WEIGHTED_COMPONENTS:
            _check_component_files(path / name)
    for name in OPTIONAL_COMPONENTS:
        entry = index.get(name)
        if entry and entry[0] is not None:
            if not (path / name).is_dir():
                raise FileNotFoundError(f"pipeline folder {path} lacks the '{name}' component folder ({path / name})")
            _check_component_files(path / name)
    return index


def _check_component_files(folder: Path) -> None:
    """A component folder's config parses and its safetensors weights are whole (headers only: cheap), so a
    damaged or missing file is named before diffusers fails somewhere inside loading."""

    def check(file: Path, kind: str) -> None:
        try:
            check_file_whole(file)
        except Exception as err:  # noqa: BLE001 - any failure to read it means the file is damaged
            raise ValueError(f"{kind} file {file} is damaged ({str(err).splitlines()[0][:120]})") from err

    for config in folder.glob("*.json"):
        check(config, "config")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"pipeline component folder {folder} has no .safetensors weights file")
    for file in weights:
        check(file, "weights")
