"""Score one model (diffusion pipeline or GAN checkpoint) with every metric: the eval CLI's engine.

Protocols: ``train`` (samples from training captions vs all training images, the few-shot GAN papers'
convention) and held-out (``val``/``test``: samples from the split's captions vs that split's images).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pokediff.config import DataConfig, config_from_dict, load_config, nest
from pokediff.data import SPLIT_NAMES, TYPE_NAMES, SpriteDataset, collate_sprites, load_splits
from pokediff.device import resolve_device
from pokediff.fileio import write_text_atomic
from pokediff.images import save_image_grid

from .color import agreement_from_predictions, dominant_color, target_color
from .diversity import grouped_diversity
from .fid import extract_features, frechet_distance, kernel_inception_distance
from .inception import FEATURE_NETS, load_feature_net
from .memorization import memorization_metrics
from .reconstruction import reconstruction_metrics
from .reference_stats import feature_net_name, real_image_batches, reference_features
from .sampling import DiffusionSampler, SavedSamples, load_sampler
from .shape import shape_agreement_from_predictions, shape_in_text, shape_judge_for, target_shape

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CLIP_CHOICES = ("auto", "pretrained", "domain", "none")
METRIC_KEYS = (
    "fid",
    "kid_mean",
    "kid_std",
    "clip_score",
    "clip_score_real",
    "color_agreement",
    "color_agreement_real",
    "color_agreement_freeform",
    "shape_agreement",
    "shape_agreement_real",
    "shape_agreement_freeform",
    "shape_agreement_majority",
    "diversity",
    "diversity_real_dataset",
    "recon_l1",
    "recon_psnr",
    "recon_perceptual",
    "nn_train_similarity_mean",
    "nn_train_similarity_max",
    "nn_train_similarity_real_mean",
    "nn_train_similarity_real_max",
    "nn_train_closer_than_real_max",
)
RESULT_KEYS = (
    "schema_version",
    "model",
    "protocol",
    "split",
    "num_samples",
    "seed",
    "resolution",
    "sampling",
    "metrics",
    "skipped",
    "clip_scorer",
    "feature_extractor",
    "perceptual",
    "reference",
    "color_confusion",
    "shape_judge",
    "wall_time_s",
    "device",
    "created",
    "nearest_train",
)


@dataclass
class EvalSettings:
    split: str = "val"  # val | test: held-out protocol; train: the few-shot GAN protocol
    num: int | None = None  # samples; default: as many as the reference split has images
    seed: int = 0
    batch_size: int = 16
    steps: int | None = None  # diffusion: inference steps (None: the pipeline's default)
    guidance: float | None = None  # diffusion: CFG scale (None: the pipeline's default)
    use_ema: bool = True  # GAN: the EMA generator when the checkpoint has one
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    diversity_prompts: int = 4  # prompts (or GAN draws) ...
    diversity_samples: int = 4  # ... x samples each, for the pairwise diversity (0 turns it off)
    freeform_samples: int = 2  # samples per free-form prompt (pokediff.eval.prompts) for colour and shape agreement
    recon_num: int = 64  # VAE reconstruction images from val (test with --split test); 0 turns it off
    grid_size: int = 16
    clip: str = "auto"  # auto | pretrained | domain | none
    features: str = "inception"  # inception (FID) | pixels (weight-free smoke-test stand-in)
    cache_dir: str | None = None  # reference features; default ~/.cache/pokediff/eval
    memorization: bool = True  # nearest-training-image check (needs the train split's features once; cached)

    def check(self) -> None:
        if self.split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got '{self.split}'")
        if self.num is not None and self.num < 2:
            raise ValueError(f"num must be at least 2 (FID needs two samples), got {self.num}")
        for name in ("batch_size", "kid_subsets", "kid_subset_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("diversity_prompts", "diversity_samples", "freeform_samples", "recon_num", "grid_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.diversity_samples == 1:
            raise ValueError("diversity_samples must be 0 (off) or at least 2 (pairs of samples)")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.features not in FEATURE_NETS:
            raise ValueError(f"features must be one of {FEATURE_NETS}, got '{self.features}'")
        if self.clip not in CLIP_CHOICES:
            raise ValueError(f"clip must be one of {CLIP_CHOICES}, got '{self.clip}'")


# ------------------------------------------------------------------------------------------ helpers
def _run_config(sampler):
    """The training run's resolved config (``<run>/config.yaml`` beside a pipeline folder), or None."""
    if isinstance(sampler, DiffusionSampler):
        candidate = sampler.path.parent / "config.yaml"
        if candidate.is_file():
            return load_config(candidate)
    return None


def resolve_data_config(sampler, data_overrides: dict | list | None = None) -> DataConfig:
    """The data settings the model was trained with (run config / GAN checkpoint), then the overrides.

    ``data_overrides``: ``{"root": ...}`` / ``{"data.root": ...}`` or ``["data.root=...", ...]``.
    """
    run_cfg = _run_config(sampler)
    if run_cfg is not None:
        base = dataclasses.asdict(run_cfg.data)
    elif getattr(sampler, "data_config", None) is not None:  # saved samples whose writer recorded its data
        base = dict(sampler.data_config)
    elif getattr(sampler, "meta", None) is not None:
        base = dict(sampler.meta.get("gan_config", {}).get("data", {}))
    else:
        base = dataclasses.asdict(DataConfig())
    if data_overrides:
        if not isinstance(data_overrides, dict):
            from pokediff.config import parse_override

            data_overrides = dict(parse_override(o) for o in data_overrides)
        flat = {k[len("data.") :] if k.startswith("data.") else k: v for k, v in data_overrides.items()}
        base = _deep_update(base, nest(flat))
    cfg = config_from_dict(DataConfig, base)
    cfg.augment = False  # evaluation never augments
    return cfg


def _deep_update(base: dict, updates: dict) -> dict:
    out = dict(base)
    for k, v in updates.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _rows_for(split_ds, num: int, seed: int) -> list[int]:
    """``num`` row indices: a seeded permutation of the split, cycled when ``num`` exceeds it."""
    order = np.random.default_rng(seed).permutation(len(split_ds))
    return [int(order[i % len(order)]) for i in range(num)]


def _primary_type(row: dict) -> str | None:
    first = str(row.get("types") or "").split("|")[0].strip().lower()
    return first if first in TYPE_NAMES else None


def _load_clip(settings: EvalSettings, sampler, device):
    """(scorer, None), or with ``--clip auto`` (None, why no CLIP could be loaded); a CLIP asked for by
    name (pretrained/domain) that cannot be loaded is an error."""
    try:
        from pokediff.models.clip import ClipUnavailableError, load_clip_scorer
    except ImportError as err:
        if settings.clip != "auto":
            raise
        return None, f"pokediff.models.clip is not available: {err}"
    run_cfg = _run_config(sampler)
    source = None if settings.clip == "auto" else settings.clip
    try:
        scorer = load_clip_scorer(
            model_dir=str(sampler.path), clip_cfg=run_cfg.clip if run_cfg else None, device=device, source=source
        )
    except ClipUnavailableError as err:
        if settings.clip != "auto":
            raise
        logger.warning("CLIP score skipped: %s", err)
        return None, f"no CLIP available: {err}"
    return scorer, None


def save_grid(images: torch.Tensor, path, nrow: int | None = None) -> Path:
    """Write images (N,3,H,W) in [0,1] as one PNG grid, atomically (``pokediff.images.save_image_grid``)."""
    return save_image_grid(images, path, nrow)


def write_result(result: dict, path) -> Path:
    validate_result(result)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(result, indent=2, allow_nan=False))


def validate_result(result: dict) -> None:
    """Check a result dict has the documented schema; raises ValueError naming what is wrong."""
    missing = [k for k in RESULT_KEYS if k not in result]
    if missing:
        raise ValueError(f"eval result lacks keys {missing}")
    metrics = result["metrics"]
    missing = [k for k in METRIC_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"eval result metrics lack {missing}")
    for key in METRIC_KEYS:
        value = metrics[key]
        if value is None:
            if key not in result["skipped"]:
                raise ValueError(f"metric '{key}' is null but 'skipped' gives no reason")
        elif not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ValueError(f"metric '{key}' must be a finite number or null, got {value!r}")
    if result["model"].get("kind") not in ("diffusion", "gan", "samples"):
        raise ValueError(f"model.kind must be 'diffusion', 'gan' or 'samples', got {result['model'].get('kind')!r}")


# the steps of ``evaluate``: the data, the networks, the prompts, one pass over the images
def _load_data(sampler, split: str, data_overrides) -> tuple[DataConfig, dict]:
    """(data settings at the model's resolution, the splits); the protocol's split needs two images for FID."""
    data_cfg = resolve_data_config(sampler, data_overrides)
    if sampler.resolution and sampler.resolution != data_cfg.resolution:
        # real images are compared at the size the model generates
        data_cfg = dataclasses.replace(data_cfg, resolution=int(sampler.resolution))
    splits = load_splits(data_cfg)
    if len(splits[split]) < 2:
        raise ValueError(f"the '{split}' split has {len(splits[split])} images; it needs at least 2")
    return data_cfg, splits


def _sample_count(sampler, requested: int | None, split_size: int) -> int:
    """Saved samples: all of them; a model: ``requested``, by default as many as the split has images."""
    if isinstance(sampler, SavedSamples):
        num = len(sampler.records)
        if num < 2:
            raise ValueError(f"{sampler.path}: {num} sample selected; FID needs at least 2")
        return num
    return requested or split_size


def _perceptual_for(settings: EvalSettings, sampler, device):
    """The run's LPIPS/ST-LPIPS when diversity or reconstruction will use one, else None."""
    if not (settings.diversity_samples or (settings.recon_num and sampler.vae is not None)):
        return None
    from pokediff.config import PerceptualConfig
    from pokediff.models.perceptual import load_perceptual

    run_cfg = _run_config(sampler)
    return load_perceptual(run_cfg.perceptual if run_cfg else PerceptualConfig()).to(device)


def _not_captioned(sampler) -> str | None:
    """Why the caption metrics (CLIP score, colour agreement) are skipped, or None for a text-conditional model."""
    return None if sampler.text_conditional else f"a {sampler.kind} model is not conditioned on captions"


def _clip_for(settings: EvalSettings, sampler, clip_scorer, device):
    """(CLIP scorer, None), or (None, why the CLIP score is skipped)."""
    if settings.clip == "none":
        return None, "turned off (--clip none)"
    if not sampler.text_conditional:
        return None, _not_captioned(sampler)
    if clip_scorer is not None:
        return clip_scorer, None
    return _load_clip(settings, sampler, device)


@dataclass
class _SplitRows:
    """The protocol split's captions, target colours, primary types and body-shape groups, one entry per row."""

    captions: list[str]
    colors: list[str | None]
    types: list[str | None]
    shapes: list[str | None] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)


def _split_rows(split_ds, data_cfg: DataConfig) -> _SplitRows:
    records = split_ds.remove_columns(data_cfg.image_column)
    captions = [str(c) for c in records[data_cfg.caption_column]]
    rows = records.to_list()
    return _SplitRows(
        captions,
        [target_color(row, caption) for row, caption in zip(rows, captions)],
        [_primary_type(row) for row in rows],
        [target_shape(row, caption) for row, caption in zip(rows, captions)],
    )


def _prompts_for(sampler, table: _SplitRows, split: str, num: int, seed: int):
    """(split rows, prompts, target colours, primary types) of the ``num`` samples to score."""
    if isinstance(sampler, SavedSamples):
        # the manifest says what each image was asked for; its rows (this split's captions) give the real ceiling
        rows = [
            r["row"]
            for r in sampler.records
            if r["source"] == split and r.get("row") is not None and 0 <= r["row"] < len(table)
        ]
        targets = [r["target_color"] for r in sampler.records]
        return rows or list(range(len(table))), list(sampler.prompts), targets, [None] * num
    rows = _rows_for(table, num, seed)
    return (rows, [table.captions[i] for i in rows], [table.colors[i] for i in rows], [table.types[i] for i in rows])


@dataclass
class _Scored:
    """What the metrics need of a stream of images, gathered batch by batch."""

    features: torch.Tensor | None = None  # (N, D) for FID/KID
    clip_scores: torch.Tensor | None = None  # (N,) against each image's caption
    colors: list = dataclasses.field(default_factory=list)  # each image's dominant colour
    shapes: list = dataclasses.field(default_factory=list)  # each image's body-shape group (the shape judge's)
    grid: list = dataclasses.field(default_factory=list)  # the first images, for the grid PNG
    count: int = 0
    size: int | None = None  # the images' side length


def _score_images(
    batches, captions, feature_net=None, clip_scorer=None, background=None, grid_size: int = 0, shape_judge=None
) -> _Scored:
    """One pass over batches (B, 3, H, W) in [0, 1]: FID features, CLIP scores against ``captions``, dominant
    colours and body shapes (given the ``background``) and the first ``grid_size`` images; no image set is held
    whole."""
    scored, features, clip_scores = _Scored(), [], []
    for batch in batches:
        n = batch.shape[0]
        scored.size = scored.size or int(batch.shape[-1])
        if feature_net is not None:
            features.append(extract_features(batch, feature_net, batch_size=n, progress=False))
        if clip_scorer is not None:
            clip_scores.append(clip_scorer.score(batch, captions[scored.count : scored.count + n]).double().cpu())
        if background is not None:
            scored.colors.extend(dominant_color(image, background) for image in batch)
        if shape_judge is not None and background is not None:
            scored.shapes.extend(shape_judge.predict(batch, background))
        held = sum(g.shape[0] for g in scored.grid)
        if held < grid_size:
            scored.grid.append(batch[: grid_size - held])
        scored.count += n
    scored.features = torch.cat(features) if features else None
    scored.clip_scores = torch.cat(clip_scores) if clip_scores else None
    return scored


def _real_rows(rows) -> list[int]:
    """The distinct split rows of the samples, in the order their real images are scored."""
    return sorted(set(rows))


def _score_real_rows(
    ref_split, rows, table: _SplitRows, data_cfg, batch_size: int, clip_scorer, colors: bool, shape_judge=None
) -> tuple[_Scored, list]:
    """(CLIP scores, colours and body shapes of the real images of ``rows``, their target colours): the ceiling of
    the samples' text alignment."""
    real_rows = _real_rows(rows)
    if clip_scorer is None and not colors:
        return _Scored(), []
    batches = real_image_batches(ref_split.select(real_rows), data_cfg, batch_size)
    scored = _score_images(
        batches,
        [table.captions[i] for i in real_rows],
        clip_scorer=clip_scorer,
        background=data_cfg.background if colors else None,
        shape_judge=shape_judge,
    )
    return scored, [table.colors[i] for i in real_rows]


# the metrics: each returns (metrics, skipped reasons), a few with a report beside them
def _fid_kid(real: torch.Tensor, fake: torch.Tensor, kid_subsets: int, kid_subset_size: int, seed: int):
    """(({"fid", "kid_mean", "kid_std"}, {}), the KID subset size used)."""
    fid = frechet_distance(real, fake)
    kid_mean, kid_std, kid_size = kernel_inception_distance(
        real, fake, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
    )
    return ({"fid": fid, "kid_mean": kid_mean, "kid_std": kid_std}, {}), kid_size


def _memorization(
    fake: torch.Tensor, reference, settings: EvalSettings, train_split, data_cfg, feature_net, device, progress
):
    """(({"nn_train_*"}, skipped reasons), the samples closest to a training image): each sample's nearest
    training image against the real held-out images' nearest (the natural level)."""
    if not settings.memorization:
        return ({}, {key: "turned off (--no-memorization)" for key in METRIC_KEYS if key.startswith("nn_train")}), None
    train_ref = (
        reference
        if settings.split == "train"
        else reference_features(
            train_split,
            data_cfg,
            "train",
            feature_net,
            cache_dir=settings.cache_dir,
            batch_size=settings.batch_size,
            device=device,
            progress=progress,
        )
    )
    train_names = [
        Path(str(e.get("path") or "")).name or f"row {i}" for i, e in enumerate(train_split[data_cfg.image_column])
    ]
    metrics, closest = memorization_metrics(
        fake, train_ref.features, reference.features, real_is_train=settings.split == "train", train_names=train_names
    )
    return (metrics, {}), closest


def _clip_score(sample_scores: torch.Tensor | None, real_scores: torch.Tensor | None, skip_reason: str | None):
    """({"clip_score", "clip_score_real"}, skipped reasons): the samples' mean against the real images'."""
    if skip_reason:
        return {}, {"clip_score": skip_reason, "clip_score_real": skip_reason}
    return {"clip_score": float(sample_scores.mean()), "clip_score_real": float(real_scores.mean())}, {}


def _color_agreement(sample_colors, targets, real_colors, real_targets, skip_reason: str | None):
    """(({"color_agreement", "color_agreement_real"}, skipped reasons), confusion matrices): the colour judge
    on the samples against their prompts' colours, and on the real sprites of the same rows (its ceiling)."""
    keys = ("color_agreement", "color_agreement_real")
    if skip_reason:
        return ({}, dict.fromkeys(keys, skip_reason)), None
    samples = agreement_from_predictions(sample_colors, targets)
    real = agreement_from_predictions(real_colors, real_targets)
    metrics = {"color_agreement": samples["accuracy"], "color_agreement_real": real["accuracy"]}
    skipped = dict.fromkeys(keys, "no prompt names a colour") if samples["accuracy"] is None else {}
    return (metrics, skipped), {"samples": samples["confusion"], "real": real["confusion"]}


def _diversity(sampler, settings, ref_split, rows, captions, types, data_cfg, perceptual, progress):
    """({"diversity", "diversity_real_dataset"}, skipped reasons)."""
    s, p = settings.diversity_samples, settings.diversity_prompts
    if not (s and p):
        reason = "turned off (diversity samples/prompts = 0)"
        return {}, {"diversity": reason, "diversity_real_dataset": reason}
    if isinstance(sampler, SavedSamples):
        # stored images cannot be asked for more: groups of the samples that share a prompt
        by_prompt: dict = {}
        for image, prompt in zip(sampler.images, sampler.prompts):
            by_prompt.setdefault(prompt, []).append(image)
        groups = [g for g in by_prompt.values() if len(g) >= 2][:p]
        if not groups:
            reason = "no prompt has two or more saved samples"
            return {}, {"diversity": reason, "diversity_real_dataset": reason}
        s = min(s, min(len(g) for g in groups))
        metrics = {"diversity": grouped_diversity([torch.stack(g[:s]) for g in groups], perceptual)["mean"]}
        p = len(groups)
    else:
        chosen = list(dict.fromkeys(rows))[:p]
        prompts = [captions[i] for i in chosen for _ in range(s)]
        prompt_types = [types[i] for i in chosen for _ in range(s)]
        # a seed range apart from the main samples'
        images = torch.cat(
            list(
                sampler.sample(
                    prompts,
                    prompt_types,
                    seed=settings.seed + 1_000_003,
                    batch_size=settings.batch_size,
                    progress=progress,
                    desc="diversity samples",
                )
            )
        )
        metrics = {"diversity": grouped_diversity(list(images.split(s)), perceptual)["mean"]}
    # groups of different real sprites: how far apart two random sprites are, for scale
    count = min(len(ref_split), p * s)
    count -= count % s
    if count < s:
        return metrics, {"diversity_real_dataset": f"the '{settings.split}' split is too small"}
    pool = ref_split.select(_rows_for(ref_split, count, settings.seed + 1))
    real = torch.cat(list(real_image_batches(pool, data_cfg, settings.batch_size)))
    metrics["diversity_real_dataset"] = grouped_diversity(list(real.split(s)), perceptual)["mean"]
    return metrics, {}


def _freeform_judged(sampler, settings, key, prompt_targets, seed_offset, judge, skip_reason, progress, desc):
    """Samples of prompts a user would type (``prompt_targets``: (prompt, target) pairs, none of them a training
    caption), ``settings.freeform_samples`` of each, judged by ``judge(batch)``: ((predictions, targets), {}),
    or (None, {key: why it is skipped})."""
    if skip_reason:
        return None, {key: skip_reason}
    if not settings.freeform_samples:
        return None, {key: "turned off (--freeform-samples 0)"}
    if isinstance(sampler, SavedSamples):
        return None, {
            key: "saved samples cannot answer new prompts: score the archive's free-form records with --sources "
            f"freeform (their {key.removesuffix('_freeform')})"
        }
    prompts = [p for p, _ in prompt_targets for _ in range(settings.freeform_samples)]
    targets = [t for _, t in prompt_targets for _ in range(settings.freeform_samples)]
    predicted = []
    for batch in sampler.sample(
        prompts, None, seed=settings.seed + seed_offset, batch_size=settings.batch_size, progress=progress, desc=desc
    ):
        predicted.extend(judge(batch))
    return (predicted, targets), {}


def _freeform_colors(sampler, settings, progress):
    """({"color_agreement_freeform"}, skipped reasons): the colour judge on free-form prompts
    (``pokediff.eval.prompts.FREEFORM_PROMPTS``); compare with ``color_agreement_real``, its ceiling on real sprites."""
    from .prompts import FREEFORM_PROMPTS

    key = "color_agreement_freeform"
    judged, skipped = _freeform_judged(
        sampler,
        settings,
        key,
        FREEFORM_PROMPTS,
        2_000_003,  # a seed range apart from the main and diversity samples'
        lambda batch: [dominant_color(image, sampler.background) for image in batch],
        None if sampler.text_conditional else _not_captioned(sampler),
        progress,
        "free-form prompts",
    )
    return ({key: agreement_from_predictions(*judged)["accuracy"]}, {}) if judged else ({}, skipped)


def _shape_judge(settings: EvalSettings, sampler, train_split, data_cfg):
    """(the body-shape judge fitted on the train split (cached), None), or (None, why the shape metrics are
    skipped)."""
    reason = _not_captioned(sampler)
    if reason:
        if getattr(sampler, "type_conditional", False):
            reason += "; it takes the primary type only, which names no body shape"
        return None, reason
    labels = _split_rows(train_split, data_cfg).shapes
    if len({label for label in labels if label is not None}) < 2:
        return None, "the train split's sprites do not show two body-shape groups (no 'shape' column or phrase)"
    judge = shape_judge_for(train_split, data_cfg, labels, cache_dir=settings.cache_dir, batch_size=settings.batch_size)
    return judge, None


def _shape_targets(sampler, table: _SplitRows, split: str, rows) -> list[str | None]:
    """Each sample's target shape group: its split row's shape, else one its prompt names (saved free-form)."""
    if not isinstance(sampler, SavedSamples):
        return [table.shapes[i] for i in rows]
    return [
        table.shapes[r["row"]]
        if r["source"] == split and r.get("row") is not None and 0 <= r["row"] < len(table)
        else shape_in_text(r["prompt"])
        for r in sampler.records
    ]


def _shape_agreement(sample_shapes, targets, real_shapes, real_targets, judge, skip_reason: str | None):
    """(({"shape_agreement", "shape_agreement_real", "shape_agreement_majority"}, skipped reasons), the judge's
    report with confusion matrices): the judge on the samples against their prompts' shapes, on the real sprites
    of the same rows (its ceiling; with ``--split train`` the judge's fit on its own training sprites, optimistic),
    and a constant answer, the train split's commonest group (the floor)."""
    keys = ("shape_agreement", "shape_agreement_real", "shape_agreement_majority")
    if skip_reason:
        return ({}, dict.fromkeys(keys, skip_reason)), None
    samples = shape_agreement_from_predictions(sample_shapes, targets)
    real = shape_agreement_from_predictions(real_shapes, real_targets)
    majority = shape_agreement_from_predictions([judge.majority] * len(targets), targets)
    metrics = {
        "shape_agreement": samples["accuracy"],
        "shape_agreement_real": real["accuracy"],
        "shape_agreement_majority": majority["accuracy"],
    }
    skipped = {k: "no prompt names a body shape" for k in keys if metrics[k] is None}
    report = {**judge.describe(), "confusion": {"samples": samples["confusion"], "real": real["confusion"]}}
    return (metrics, skipped), report


def _freeform_shapes(sampler, settings, judge, skip_reason: str | None, progress):
    """({"shape_agreement_freeform"}, skipped reasons, confusion): the shape judge on free-form prompts that name
    a body shape (``pokediff.eval.prompts.FREEFORM_SHAPE_PROMPTS``); compare with ``shape_agreement_real``."""
    from .prompts import FREEFORM_SHAPE_PROMPTS

    key = "shape_agreement_freeform"
    judged, skipped = _freeform_judged(
        sampler,
        settings,
        key,
        FREEFORM_SHAPE_PROMPTS,
        3_000_003,  # apart from the main, diversity and colour free-form samples' seeds
        lambda batch: judge.predict(batch, sampler.background),
        skip_reason,
        progress,
        "free-form shape prompts",
    )
    if not judged:
        return {}, skipped, None
    result = shape_agreement_from_predictions(*judged)
    return {key: result["accuracy"]}, {}, result["confusion"]


def _reconstruction(sampler, settings, splits, data_cfg, perceptual, device, progress):
    """({"recon_l1", "recon_psnr", "recon_perceptual"}, skipped reasons) of the pipeline's VAE."""
    keys = ("recon_l1", "recon_psnr", "recon_perceptual")
    if sampler.vae is None or not settings.recon_num:
        no_vae = "saved samples come without their model" if sampler.kind == "samples" else "a GAN has no autoencoder"
        reason = no_vae if sampler.vae is None else "turned off (recon_num = 0)"
        return {}, dict.fromkeys(keys, reason)
    split = "test" if settings.split == "test" else "val"
    dataset = splits[split].select(range(min(settings.recon_num, len(splits[split]))))
    if not len(dataset):
        return {}, dict.fromkeys(keys, f"the '{split}' split is empty")
    loader = torch.utils.data.DataLoader(
        SpriteDataset(dataset, data_cfg, train=False),
        batch_size=settings.batch_size,
        collate_fn=collate_sprites,
    )
    recon = reconstruction_metrics(
        sampler.vae,
        ((b["pixel_values"], b["text"]) for b in loader),
        perceptual,
        encode_text=getattr(sampler, "encode_text", None),
        device=device,
        progress=progress,
    )
    return {"recon_l1": recon["l1"], "recon_psnr": recon["psnr"], "recon_perceptual": recon["perceptual"]}, {}


def _merge(parts) -> tuple[dict, dict]:
    """Every metric (None where not computed) and why each missing one is missing, from (metrics, skipped) parts."""
    metrics, skipped = dict.fromkeys(METRIC_KEYS), {}
    for part_metrics, part_skipped in parts:
        metrics.update(part_metrics)
        skipped.update(part_skipped)
    for key, value in metrics.items():
        if value is None and key not in skipped:
            skipped[key] = "not computed"
    return metrics, skipped


def _device_name(device: str) -> str:
    return device + (
        f" ({torch.cuda.get_device_name()})"
        if device.startswith("cuda")
        else f" ({platform.processor() or platform.machine()})"
    )


def _result(
    model_path,
    sampler,
    settings: EvalSettings,
    *,
    num,
    resolution,
    metrics,
    skipped,
    nearest_train,
    color_confusion,
    kid_size,
    clip_scorer,
    shape_judge=None,
    feature_net,
    perceptual,
    reference,
    device,
    started,
) -> dict:
    """The result dict (``RESULT_KEYS``; ``write_result`` stores it as JSON)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "path": str(Path(model_path if model_path is not None else sampler.path).expanduser().resolve()),
            "kind": sampler.kind,
            "config_hash": sampler.config_hash(),
            "details": sampler.describe(),
        },
        "protocol": "train" if settings.split == "train" else "held-out",
        "split": settings.split,
        "num_samples": num,
        "seed": settings.seed,
        "resolution": int(resolution),
        "sampling": {"batch_size": settings.batch_size, "steps": settings.steps, "guidance": settings.guidance},
        "metrics": metrics,
        "nearest_train": nearest_train,
        "skipped": skipped,
        "kid_subset_size": kid_size,
        "clip_scorer": getattr(clip_scorer, "name", None) if clip_scorer is not None else None,
        "feature_extractor": feature_net_name(feature_net),
        "perceptual": getattr(perceptual, "name", type(perceptual).__name__) if perceptual is not None else None,
        "reference": {
            "split": settings.split,
            "num_images": int(reference.features.shape[0]),
            "key": reference.key,
            "cache_file": str(reference.path),
            "cached": reference.cached,
        },
        "color_confusion": color_confusion,
        "shape_judge": shape_judge,
        "eval_settings_hash": hashlib.sha256(
            json.dumps(dataclasses.asdict(settings), sort_keys=True).encode()
        ).hexdigest()[:16],
        "wall_time_s": round(time.perf_counter() - started, 3),
        "device": _device_name(device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def evaluate(
    model_path,
    settings: EvalSettings | None = None,
    data_overrides: dict | list | None = None,
    device: str | None = None,
    feature_net: nn.Module | None = None,
    perceptual: nn.Module | None = None,
    clip_scorer=None,
    progress: bool = True,
    sampler=None,
) -> tuple[dict, torch.Tensor]:
    """(result dict, grid images) for one model. ``feature_net`` (default: ``settings.features``), ``perceptual``
    (default: the configured LPIPS/ST-LPIPS) and ``clip_scorer`` (default: ``load_clip_scorer``) may be
    injected, e.g. tiny ones in tests."""
    settings = settings or EvalSettings()
    settings.check()
    started = time.perf_counter()
    device = str(device or resolve_device("auto"))

    # 1. the model, the data it was trained on and the networks that score
    if sampler is None:
        sampler = load_sampler(model_path, device, settings.steps, settings.guidance, use_ema=settings.use_ema)
    data_cfg, splits = _load_data(sampler, settings.split, data_overrides)
    ref_split = splits[settings.split]
    num = _sample_count(sampler, settings.num, len(ref_split))
    feature_net = feature_net if feature_net is not None else load_feature_net(settings.features, device)
    perceptual = perceptual if perceptual is not None else _perceptual_for(settings, sampler, device)
    clip_scorer, clip_skip = _clip_for(settings, sampler, clip_scorer, device)

    # 2. the prompts: rows of the protocol's split (saved samples: their manifest's)
    table = _split_rows(ref_split, data_cfg)
    rows, prompts, targets, types = _prompts_for(sampler, table, settings.split, num, settings.seed)
    shape_targets = _shape_targets(sampler, table, settings.split, rows)
    shape_judge, shape_skip = _shape_judge(settings, sampler, splits["train"], data_cfg)

    # 3. sample once, scoring each batch as it comes
    batches = sampler.sample(
        prompts, types, seed=settings.seed, batch_size=settings.batch_size, progress=progress, desc=f"sampling {num}"
    )
    samples = _score_images(
        batches,
        prompts,
        feature_net,
        clip_scorer,
        sampler.background if sampler.text_conditional else None,
        settings.grid_size,
        shape_judge,
    )
    if samples.count != num:
        raise RuntimeError(f"the model produced {samples.count} images, expected {num}")
    if samples.size != data_cfg.resolution:
        # real images are compared at the size the model generates
        data_cfg = dataclasses.replace(data_cfg, resolution=samples.size)

    # 4. the metrics, each (metrics, skipped reasons), against the real images of the split
    reference = reference_features(
        ref_split,
        data_cfg,
        settings.split,
        feature_net,
        cache_dir=settings.cache_dir,
        batch_size=settings.batch_size,
        device=device,
        progress=progress,
    )
    fid_kid, kid_size = _fid_kid(
        reference.features, samples.features, settings.kid_subsets, settings.kid_subset_size, settings.seed
    )
    memorization, nearest_train = _memorization(
        samples.features, reference, settings, splits["train"], data_cfg, feature_net, device, progress
    )
    real, real_targets = _score_real_rows(
        ref_split, rows, table, data_cfg, settings.batch_size, clip_scorer, sampler.text_conditional, shape_judge
    )
    colors, color_confusion = _color_agreement(
        samples.colors, targets, real.colors, real_targets, _not_captioned(sampler)
    )
    shapes, shape_report = _shape_agreement(
        samples.shapes, shape_targets, real.shapes, [table.shapes[i] for i in _real_rows(rows)], shape_judge, shape_skip
    )
    freeform_shapes, freeform_shape_skip, freeform_shape_confusion = _freeform_shapes(
        sampler, settings, shape_judge, shape_skip, progress
    )
    if shape_report is not None and freeform_shape_confusion is not None:
        shape_report["confusion"]["freeform"] = freeform_shape_confusion
    metrics, skipped = _merge(
        [
            _clip_score(samples.clip_scores, real.clip_scores, clip_skip),
            fid_kid,
            memorization,
            colors,
            shapes,
            (freeform_shapes, freeform_shape_skip),
            _diversity(sampler, settings, ref_split, rows, table.captions, table.types, data_cfg, perceptual, progress),
            _freeform_colors(sampler, settings, progress),
            _reconstruction(sampler, settings, splits, data_cfg, perceptual, device, progress),
        ]
    )

    # 5. the result and the grid
    result = _result(
        model_path,
        sampler,
        settings,
        num=num,
        resolution=data_cfg.resolution,
        metrics=metrics,
        skipped=skipped,
        nearest_train=nearest_train,
        color_confusion=color_confusion,
        shape_judge=shape_report,
        kid_size=kid_size,
        clip_scorer=clip_scorer,
        feature_net=feature_net,
        perceptual=perceptual,
        reference=reference,
        device=device,
        started=started,
    )
    validate_result(result)
    return result, torch.cat(samples.grid) if samples.grid else torch.empty(0, 3, 1, 1)
