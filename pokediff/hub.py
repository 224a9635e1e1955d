"""Model cards and hub uploads for saved PokeSpritePipeline folders.

The card is a ``huggingface_hub.ModelCard``. What it says about training comes from the facts its caller passes
(which stages produced the weights, their step counts, metrics); those facts are also kept in the card's
metadata (``pokediff:``), so re-rendering the card for a hub upload keeps them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from pokediff.fileio import write_text_atomic
from pokediff.pipeline import OPTIONAL_COMPONENTS, PIPELINE_COMPONENTS, check_pipeline_folder

EXAMPLE_PROMPTS = [
    "a small green grass type creature with a bulb on its back",
    "a fiery orange dragon with wings, fire type",
    "a round pink fairy type creature",
    "a blue water type turtle",
]

# the dataset every metric of a card is measured on (the Hub's model-index needs a name and a type)
EVAL_DATASET = {"dataset_type": "pokediff-pokemon-sprites", "dataset_name": "Pokémon official artwork (905, bundled)"}
SPLITS = ("train", "val", "test")
# an absolute path of the machine that wrote the card (/tmp/..., /home/...): a card never names one
_LOCAL_PATH = re.compile(r"(?<![\w./])/(?:[^\s/:,;()'\"]+/)+([^\s/:,;()'\"]*)")

STAGE_NAMES = {1: "stage 1 (VAE)", 2: "stage 2 (U-Net)", 3: "stage 3 (U-Net text cross-attention)"}

_ARTWORK_NOTE = (
    "The training artwork is © Nintendo / Creatures Inc. / GAME FREAK inc. / The Pokémon Company; it is used "
    "for research and non-commercial experimentation only. Pokémon and its names are trademarks of Nintendo. "
    "This model inherits these terms."
)

CARD_TEMPLATE = """---
{{ card_data }}
---

# PokeSprite latent diffusion

A small text-to-sprite latent diffusion model (pokediff `PokeSpritePipeline`): sprites from a caption.

## Training data

905 Pokémon (generations 1–8), one official artwork each, 215x215 RGBA composited on the background colour \
{{ background }}; captions of 24–56 words (name, genus, colour, types, body shape, a Pokédex entry). \
Deterministic 80/15/5 train/val/test split.

## Training stages

{{ stages }}

## Components

| component | class | details |
|---|---|---|
{{ components }}

Max text length: {{ max_text_length }} tokens.
{{ tables }}
## Usage

With pokediff installed (`pip install` the pokediff repository):

```python
import torch
from pokediff import PokeSpritePipeline

pipe = PokeSpritePipeline.from_pretrained("{{ load_name }}")
image = pipe("{{ prompt }}", generator=torch.Generator().manual_seed(0)).images[0]
image.save("sprite.png")
```

With diffusers alone: the folder carries the pipeline and VAE code (`{{ pipeline_file }}`, `vae/*.py`), which \
diffusers runs when you allow it:

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{{ load_name }}", trust_remote_code=True)
image = pipe("{{ prompt }}", generator=torch.Generator().manual_seed(0)).images[0]
```

Command line: `python -m pokediff.generate --model {{ load_name }} "{{ cli_prompt }}" --num 8 --seed 0 --rgba \
--out sprites.png`

## Example prompts

{{ example_prompts }}

## Licence

Code: see the pokediff repository. Weights: {{ licence }}
"""


def _artwork_licence_note() -> str:
    """The licence paragraph of the bundled dataset README (the packaged text if the README is absent)."""
    from pokediff.config import DEFAULT_DATA_DIR

    readme = Path(DEFAULT_DATA_DIR) / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8")
        start = text.find("Licence:")
        if start >= 0:
            return " ".join(text[start:].split("\n\n")[0].split())
    return _ARTWORK_NOTE


def _read_config(folder: Path, name: str) -> dict:
    file_name = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}.get(name, "config.json")
    path = folder / name / file_name
    return json.loads(path.read_text()) if path.is_file() else {}


def _latent_geometry(vae_config: dict) -> str:
    if not vae_config:
        return "image -> latent"
    size, blocks = vae_config.get("sample_size", 215), len(vae_config.get("block_out_channels", [0] * 4))
    side = -(-size // 2 ** (blocks - 1))
    return f"{size}x{size}x3 -> {side}x{side}x{vae_config.get('latent_channels')} latent"


def _component_rows(folder: Path) -> list[str]:
    rows = []
    for name in PIPELINE_COMPONENTS + OPTIONAL_COMPONENTS:
        cfg = _read_config(folder, name)
        if not cfg:
            continue
        cls = cfg.get("_class_name") or (cfg.get("architectures") or [cfg.get("tokenizer_class", "")])[0]
        detail = ""
        if name == "vae":
            detail = (
                f"latent {cfg.get('latent_channels')} channels, scaling_factor {cfg.get('scaling_factor')}, "
                f"decoder cross-attention {cfg.get('decoder_cross_attention')}"
            )
        elif name == "unet":
            detail = (
                f"block_out_channels {cfg.get('block_out_channels')}, "
                f"cross_attention_dim {cfg.get('cross_attention_dim')}"
            )
        elif name == "text_encoder":
            detail = f"hidden size {cfg.get('hidden_size')}, {cfg.get('num_hidden_layers')} layers"
        elif name == "scheduler":
            detail = f"prediction_type {cfg.get('prediction_type')}, beta_schedule {cfg.get('beta_schedule')}"
        elif name == "shape_classifier":
            detail = f"body-shape groups {', '.join(cfg.get('groups') or [])}; guides sampling (shape guidance)"
        rows.append(f"| `{name}` | {cls} | {detail} |")
    return rows


def _stage_lines(folder: Path, stages: dict[int, int | None] | None) -> str:
    """One line per stage, each claim backed by ``stages`` (stage -> optimizer steps) or saying it is not."""
    if stages is None:
        return "No training record was given when this card was written."
    unknown = sorted(set(stages) - set(STAGE_NAMES))
    if unknown:
        raise ValueError(f"unknown training stages {unknown}; stages are {sorted(STAGE_NAMES)}")

    def status(stage: int) -> str:
        if stage not in stages:
            return f"Stage {stage}: not recorded for this save (its weights may come from this run or an earlier one)."
        steps = stages[stage]
        return f"Stage {stage}: ran for these weights" + (f", {steps} optimizer steps." if steps is not None else ".")

    index = Path(folder) / "model_index.json"
    index = json.loads(index.read_text()) if index.is_file() else {}
    by_name = index.get("text_encoder_name")
    shape_guided = (index.get("shape_classifier") or [None])[0] is not None
    text_class = (_read_config(folder, "text_encoder").get("architectures") or ["text encoder"])[0]
    lines = [
        f"1. **VAE** (`vae/`): KL autoencoder, {_latent_geometry(_read_config(folder, 'vae'))}; L1 + perceptual + "
        f"annealed KL with free bits. {status(1)}",
        "2. **U-Net** (`unet/`): `UNet2DConditionModel` denoiser on the latents, text cross-attention, EMA weights, "
        f"caption dropout for classifier-free guidance. {status(2)}",
    ]
    encoder = (
        f"**Text encoder**: the public `{by_name}`, unchanged (the folder holds its name only, "
        "`text_encoder_name`, and loads it by that name)"
        if by_name
        else f"**Text encoder** (`text_encoder/`): the pretrained {text_class}"
    )
    lines.append(f"3. {encoder}, frozen in every stage.")
    if 3 in stages and shape_guided:
        lines.append(
            "4. **Stage 3** (`shape_classifier/`): shape guidance. A small CNN fitted on the training sprites' body "
            "shapes; while sampling, for a prompt that names a body shape, the pipeline moves each early step's "
            f"clean-latent estimate up its gradient (scale {index.get('shape_guidance_scale', 0):g}). The U-Net is "
            f"stage 2's; kept because independent judges said it helped. {status(3)}"
        )
    elif 3 in stages:
        lines.append(
            "4. **Stage 3** (`unet/` again): the keys and values of the U-Net's text cross-attention fine-tuned by "
            "reward through the sampler (a CLIP's preference for each sample's own caption), anchored to stage 2 "
            f"by a KL and a denoising term, and kept because independent judges said it helped. {status(3)}"
        )
    else:
        lines.append(
            "4. Stage 3 (reward fine-tuning of the U-Net's text cross-attention): did not run for these weights."
        )
    return "\n".join(lines)


def _portable(value):
    """``value`` with any absolute local path cut to its last part (``/tmp/run/domain_clip`` -> ``domain_clip``)."""
    if isinstance(value, str):
        return _LOCAL_PATH.sub(lambda m: m.group(1) or "<local folder>", value)
    if isinstance(value, dict):
        return {_portable(k): _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    return value


def eval_results(metrics: dict) -> list[EvalResult]:
    """The Hub's ``model-index`` entries of ``metrics`` (name -> number); a name ending in ``_train`` / ``_val`` /
    ``_test`` gives its split (``kid_mean_train`` is ``kid_mean`` on the train split). Non-numbers are skipped."""
    results = []
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        split = next((s for s in SPLITS if name.endswith(f"_{s}")), None)
        results.append(
            EvalResult(
                task_type="text-to-image",
                **EVAL_DATASET,
                dataset_split=split,
                metric_type=name.removesuffix(f"_{split}") if split else name,
                metric_name=name,
                metric_value=value,
            )
        )
    return results


def card_metrics(result: dict) -> dict:
    """A ``pokediff.eval`` result's measured metrics as card metrics, each named with its split
    (``kid_mean`` on train -> ``kid_mean_train``); skipped (None) metrics are left out."""
    split = result["split"]
    return {f"{k}_{split}": v for k, v in result["metrics"].items() if v is not None}


def _table(title: str, header: str, values: dict) -> str:
    rows = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in values.items()]
    return "\n".join([f"## {title}", "", f"| {header} | value |", "|---|---|", *rows, ""])


def build_model_card(
    folder,
    stages: dict[int, int | None] | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """The model card of a saved pipeline folder.

    ``stages``: the training stages that produced these weights -> their optimizer steps (None if unknown),
    e.g. ``{2: 6000}`` for a pipeline saved after stage 2. ``metrics``: name -> value (e.g. from
    ``pokediff.eval``); ``extra``: more training details (run name, losses...). ``repo_id``: the hub id the
    usage snippets load from (a placeholder path otherwise).
    """
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a saved pipeline folder (no model_index.json)")
    index = json.loads((folder / "model_index.json").read_text())
    facts = {
        "stages": dict(stages) if stages is not None else None,
        "metrics": dict(metrics or {}),
        "extra": _portable(dict(extra or {})),
    }
    if repo_id:
        facts["repo_id"] = repo_id  # kept, so a later re-render (new metrics) still names it
    results = eval_results(facts["metrics"])
    card_data = ModelCardData(
        model_name=(repo_id or folder.name) if results else None,
        eval_results=results or None,
        library_name="diffusers",
        license="other",
        license_name="pokemon-artwork-non-commercial",
        pipeline_tag="text-to-image",
        tags=["text-to-image", "diffusers", "pokediff", "pixel-art", "sprites"],
        pokediff=facts,
    )
    tables = "".join(
        "\n" + _table(title, header, values)
        for title, header, values in (
            ("Metrics", "metric", facts["metrics"]),
            ("Training details", "key", facts["extra"]),
        )
        if values
    )
    class_name = index.get("_class_name")
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        background=index.get("background"),
        stages=_stage_lines(folder, stages),
        components="\n".join(_component_rows(folder)),
        max_text_length=index.get("max_text_length"),
        tables=tables,
        load_name=repo_id or "path/to/pipeline",
        pipeline_file=f"{class_name[0]}.py" if isinstance(class_name, list) else "pipeline_pokesprite.py",
        prompt=EXAMPLE_PROMPTS[0],
        cli_prompt=EXAMPLE_PROMPTS[1],
        example_prompts="\n".join(f"- {p}" for p in EXAMPLE_PROMPTS),
        licence=_artwork_licence_note(),
    )


def write_model_card(
    folder,
    stages: dict[int, int | None] | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write ``build_model_card(...)`` as the folder's ``README.md`` (atomically) and return its path."""
    card = build_model_card(folder, stages=stages, metrics=metrics, extra=extra, repo_id=repo_id)
    return write_text_atomic(Path(folder) / "README.md", str(card))


def recorded_facts(folder) -> dict:
    """The training facts an earlier ``write_model_card`` kept in the folder's card ({} without one)."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        return {}
    facts = ModelCard.load(path).data.to_dict().get("pokediff")
    return facts if isinstance(facts, dict) else {}


def update_model_card(
    folder,
    stages: dict[int, int | None] | None = None,
    drop_stages: tuple[int, ...] = (),
    metrics: dict | None = None,
    extra: dict | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write the folder's card again from the facts its earlier card recorded: ``stages`` (stage -> steps) added
    where the card has no record of them yet (a recorded stage wins), ``drop_stages`` removed, ``metrics`` and
    ``extra`` entries added. A card that recorded no stages keeps claiming none."""
    facts = recorded_facts(folder)
    recorded = facts.get("stages")
    if recorded is not None:
        recorded = {**(stages or {}), **{int(k): v for k, v in recorded.items()}}
        for stage in drop_stages:
            recorded.pop(stage, None)
    return write_model_card(
        folder,
        stages=recorded,
        metrics={**(facts.get("metrics") or {}), **(metrics or {})},
        extra={**(facts.get("extra") or {}), **(extra or {})},
        repo_id=repo_id or facts.get("repo_id"),
    )


def push_pipeline_folder(
    folder,
    repo_id: str,
    metrics: dict | None = None,
    extra: dict | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload PokeSpritePipeline",
    create_pr: bool = False,
):
    """Upload a saved pipeline folder to ``repo_id``; returns the commit info.

    The card is re-rendered for ``repo_id`` from the facts its earlier card recorded, with ``metrics`` and
    ``extra`` added.
    """
    from huggingface_hub import create_repo, upload_folder

    folder = Path(folder)
    check_pipeline_folder(folder)
    repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    update_model_card(folder, metrics=metrics, extra=extra, repo_id=repo_id)
    return upload_folder(
        repo_id=repo_id, folder_path=folder, token=token, commit_message=commit_message, create_pr=create_pr
    )
