"""Score one model (diffusion pipeline or GAN checkpoint) with every metric: the eval CLI's engine.

Protocols: ``train`` (samples from training captions vs all training images, the few-shot GAN papers'
convention) and held-out (``val``/``test``: samples from the split's captions vs that split's images).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pokediff.config import DataConfig, config_from_dict, load_config, nest
from pokediff.device import resolve_device
from pokediff.data import COLOR_NAMES, SPLIT_NAMES, TYPE_NAMES, SpriteDataset, collate_sprites, load_splits
from pokediff.images import save_image_grid

from .color import agreement_from_predictions, color_in_text, dominant_color
from .diversity import grouped_diversity
from .inception import FEATURE_NETS, load_feature_net
from .fid import extract_features, frechet_distance, kernel_inception_distance
from .memorization import memorization_metrics
from .reconstruction import reconstruction_metrics
from .reference_stats import feature_net_name, real_image_batches, reference_features
from .sampling import DiffusionSampler, SavedSamples, load_sampler

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CLIP_CHOICES = ("auto", "pretrained", "domain", "none")
METRIC_KEYS = (
    "fid", "kid_mean", "kid_std",
    "clip_score", "clip_score_real",
    "color_agreement", "color_agreement_real", "color_agreement_freeform",
    "diversity", "diversity_real_dataset",
    "recon_l1", "recon_psnr", "recon_perceptual",
    "nn_train_similarity_mean", "nn_train_similarity_max", "nn_train_similarity_real_mean",
    "nn_train_similarity_real_max", "nn_train_closer_than_real_max",
)
RESULT_KEYS = (
    "schema_version", "model", "protocol", "split", "num_samples", "seed", "resolution", "sampling", "metrics",
    "skipped", "clip_scorer", "feature_extractor", "perceptual", "reference", "color_confusion", "wall_time_s",
    "device", "created", "nearest_train",
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
    freeform_samples: int = 2  # samples per free-form prompt (pokediff.eval.prompts) for their colour agreement
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
        flat = {k[len("data."):] if k.startswith("data.") else k: v for k, v in data_overrides.items()}
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


def _target_color(row: dict, caption: str) -> str | None:
    color = str(row.get("color") or "").strip().lower()
    return color if color in COLOR_NAMES else color_in_text(caption)


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
        scorer = load_clip_scorer(model_dir=str(sampler.path), clip_cfg=run_cfg.clip if run_cfg else None,
                                  device=device, source=source)
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2, allow_nan=False)
    os.replace(tmp, path)
    return path


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
        images = torch.cat(list(sampler.sample(prompts, prompt_types, seed=settings.seed + 1_000_003,
                                               batch_size=settings.batch_size, progress=progress,
                                               desc="diversity samples")))
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


def _freeform_colors(sampler, settings, progress):
    """({"color_agreement_freeform"}, skipped reasons): the colour judge on prompts a user would type, none of
    them a training caption; compare with ``color_agreement_real``, the judge's ceiling on real sprites."""
    from .prompts import FREEFORM_PROMPTS

    if not sampler.text_conditional:
        return {}, {"color_agreement_freeform": f"a {sampler.kind} model is not conditioned on captions"}
    if not settings.freeform_samples:
        return {}, {"color_agreement_freeform": "turned off (--freeform-samples 0)"}
    if isinstance(sampler, SavedSamples):
        return {}, {"color_agreement_freeform": "saved samples cannot answer new prompts: score the archive's "
                                                "free-form records with --sources freeform (their color_agreement)"}
    prompts = [p for p, _ in FREEFORM_PROMPTS for _ in range(settings.freeform_samples)]
    targets = [c for _, c in FREEFORM_PROMPTS for _ in range(settings.freeform_samples)]
    predicted = []
    # a seed range apart from the main and diversity samples'
    for batch in sampler.sample(prompts, None, seed=settings.seed + 2_000_003, batch_size=settings.batch_size,
                                progress=progress, desc="free-form prompts"):
        predicted.extend(dominant_color(image, sampler.background) for image in batch)
    return {"color_agreement_freeform": agreement_from_predictions(predicted, targets)["accuracy"]}, {}


def _reconstruction(sampler, settings, splits, data_cfg, perceptual, device, progress):
    """({"recon_l1", "recon_psnr", "recon_perceptual"}, skipped reasons) of the pipeline's VAE."""
    keys = ("recon_l1", "recon_psnr", "recon_perceptual")
    if sampler.vae is None or not settings.recon_num:
        no_vae = "saved samples come without their model" if sampler.kind == "samples" else "a GAN has no autoencoder"
        reason = no_vae if sampler.vae is None else "turned off (recon_num = 0)"
        return {}, {key: reason for key in keys}
    split = "test" if settings.split == "test" else "val"
    dataset = splits[split].select(range(min(settings.recon_num, len(splits[split]))))
    if not len(dataset):
        return {}, {key: f"the '{split}' split is empty" for key in keys}
    loader = torch.utils.data.DataLoader(
        SpriteDataset(dataset, data_cfg, train=False), batch_size=settings.batch_size, collate_fn=collate_sprites,
    )
    recon = reconstruction_metrics(
        sampler.vae, ((b["pixel_values"], b["text"]) for b in loader), perceptual,
        encode_text=getattr(sampler, "encode_text", None), device=device, progress=progress,
    )
    return {"recon_l1": recon["l1"], "recon_psnr": recon["psnr"], "recon_perceptual": recon["perceptual"]}, {}


# -------------------------------------------------------------------------------------------- main
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
    if sampler is None:
        sampler = load_sampler(model_path, device, settings.steps, settings.guidance, use_ema=settings.use_ema)
    data_cfg = resolve_data_config(sampler, data_overrides)
    if sampler.resolution and sampler.resolution != data_cfg.resolution:
        # real images are compared at the size the model generates
        data_cfg = dataclasses.replace(data_cfg, resolution=int(sampler.resolution))
    splits = load_splits(data_cfg)
    ref_split = splits[settings.split]
    if len(ref_split) < 2:
        raise ValueError(f"the '{settings.split}' split has {len(ref_split)} images; it needs at least 2")
    if isinstance(sampler, SavedSamples):
        num = len(sampler.records)
        if num < 2:
            raise ValueError(f"{sampler.path}: {num} sample selected; FID needs at least 2")
    else:
        num = settings.num or len(ref_split)
    skipped: dict[str, str] = {}

    if feature_net is None:
        feature_net = load_feature_net(settings.features, device)
    if perceptual is None and (settings.diversity_samples or (settings.recon_num and sampler.vae is not None)):
        from pokediff.config import PerceptualConfig
        from pokediff.models.perceptual import load_perceptual

        run_cfg = _run_config(sampler)
        perceptual = load_perceptual(run_cfg.perceptual if run_cfg else PerceptualConfig()).to(device)
    clip_reason = None
    if settings.clip == "none":
        clip_scorer, clip_reason = None, "turned off (--clip none)"
    elif not sampler.text_conditional:
        clip_scorer, clip_reason = None, f"a {sampler.kind} model is not conditioned on captions"
    elif clip_scorer is None:
        clip_scorer, clip_reason = _load_clip(settings, sampler, device)
    if clip_reason:
        skipped["clip_score"] = skipped["clip_score_real"] = clip_reason

    # --- the prompts: rows of the protocol's split
    records = ref_split.remove_columns(data_cfg.image_column)
    captions_all = [str(c) for c in records[data_cfg.caption_column]]
    row_dicts = records.to_list()
    types_by_row = [_primary_type(row) for row in row_dicts]
    if isinstance(sampler, SavedSamples):
        # the manifest says what each image was asked for; its rows (this split's captions) give the real ceiling
        prompts, targets = list(sampler.prompts), [r["target_color"] for r in sampler.records]
        types = [None] * num
        rows = [r["row"] for r in sampler.records
                if r["source"] == settings.split and r.get("row") is not None and 0 <= r["row"] < len(ref_split)]
        rows = rows or list(range(len(ref_split)))
    else:
        rows = _rows_for(ref_split, num, settings.seed)
        prompts = [captions_all[i] for i in rows]
        targets = [_target_color(row_dicts[i], captions_all[i]) for i in rows]
        types = [types_by_row[i] for i in rows]

    # --- generate, streaming features / CLIP / colour per batch
    fake_feats, clip_scores, predicted, grid = [], [], [], []
    offset, sample_size = 0, None
    for batch in sampler.sample(prompts, types, seed=settings.seed, batch_size=settings.batch_size,
                                progress=progress, desc=f"sampling {num}"):
        n = batch.shape[0]
        sample_size = sample_size or int(batch.shape[-1])
        fake_feats.append(extract_features(batch, feature_net, batch_size=n, progress=False))
        if clip_scorer is not None:
            clip_scores.append(clip_scorer.score(batch, prompts[offset:offset + n]).double().cpu())
        if sampler.text_conditional:
            predicted.extend(dominant_color(image, sampler.background) for image in batch)
        if sum(g.shape[0] for g in grid) < settings.grid_size:
            grid.append(batch[: settings.grid_size - sum(g.shape[0] for g in grid)])
        offset += n
    if offset != num:
        raise RuntimeError(f"the model produced {offset} images, expected {num}")
    fake = torch.cat(fake_feats)
    if sample_size != data_cfg.resolution:
        # real images are compared at the size the model generates
        data_cfg = dataclasses.replace(data_cfg, resolution=sample_size)

    # --- FID / KID against the (cached) real split
    reference = reference_features(ref_split, data_cfg, settings.split, feature_net, cache_dir=settings.cache_dir,
                                   batch_size=settings.batch_size, device=device, progress=progress)
    metrics: dict = {key: None for key in METRIC_KEYS}
    metrics["fid"] = frechet_distance(reference.features, fake)
    kid_mean, kid_std, kid_size = kernel_inception_distance(
        reference.features, fake, subsets=settings.kid_subsets, subset_size=settings.kid_subset_size,
        seed=settings.seed,
    )
    metrics["kid_mean"], metrics["kid_std"] = kid_mean, kid_std

    # --- memorisation: each sample's nearest training image, against real held-out images' nearest
    nearest_train = None
    if settings.memorization:
        train_split = splits["train"]
        train_ref = reference if settings.split == "train" else reference_features(
            train_split, data_cfg, "train", feature_net, cache_dir=settings.cache_dir,
            batch_size=settings.batch_size, device=device, progress=progress)
        train_names = [Path(str(e.get("path") or "")).name or f"row {i}"
                       for i, e in enumerate(train_split[data_cfg.image_column])]
        mem, nearest_train = memorization_metrics(fake, train_ref.features, reference.features,
                                                  real_is_train=settings.split == "train", train_names=train_names)
        metrics.update(mem)
    else:
        for key in METRIC_KEYS:
            if key.startswith("nn_train"):
                skipped[key] = "turned off (--no-memorization)"

    # --- text alignment, with real images of the same rows as the ceiling
    real_rows = sorted(set(rows))
    real_ds = ref_split.select(real_rows)
    real_captions = [captions_all[i] for i in real_rows]
    real_clip, real_predicted, start = [], [], 0
    if clip_scorer is not None or sampler.text_conditional:
        for batch in real_image_batches(real_ds, data_cfg, settings.batch_size):
            if clip_scorer is not None:
                real_clip.append(clip_scorer.score(batch, real_captions[start:start + len(batch)]).double().cpu())
            real_predicted.extend(dominant_color(image, data_cfg.background) for image in batch)
            start += len(batch)
    if clip_scorer is not None:
        metrics["clip_score"] = float(torch.cat(clip_scores).mean())
        metrics["clip_score_real"] = float(torch.cat(real_clip).mean())
    color_confusion = None
    if sampler.text_conditional:
        sample_colors = agreement_from_predictions(predicted, targets)
        real_targets = [_target_color(row_dicts[i], captions_all[i]) for i in real_rows]
        real_colors = agreement_from_predictions(real_predicted, real_targets)
        metrics["color_agreement"] = sample_colors["accuracy"]
        metrics["color_agreement_real"] = real_colors["accuracy"]
        color_confusion = {"samples": sample_colors["confusion"], "real": real_colors["confusion"]}
        if sample_colors["accuracy"] is None:
            skipped["color_agreement"] = skipped["color_agreement_real"] = "no prompt names a colour"
    else:
        skipped["color_agreement"] = skipped["color_agreement_real"] = (
            f"a {sampler.kind} model is not conditioned on captions"
        )

    # --- diversity: several samples of each of a few prompts; real sprites for scale
    div_metrics, div_skipped = _diversity(sampler, settings, ref_split, rows, captions_all, types_by_row,
                                          data_cfg, perceptual, progress)
    metrics.update(div_metrics)
    skipped.update(div_skipped)

    freeform_metrics, freeform_skipped = _freeform_colors(sampler, settings, progress)
    metrics.update(freeform_metrics)
    skipped.update(freeform_skipped)

    # --- VAE reconstruction on val (test when evaluating on test)
    recon_metrics, recon_skipped = _reconstruction(sampler, settings, splits, data_cfg, perceptual, device, progress)
    metrics.update(recon_metrics)
    skipped.update(recon_skipped)

    for key, value in metrics.items():
        if value is None and key not in skipped:
            skipped[key] = "not computed"
    grid_images = torch.cat(grid) if grid else torch.empty(0, 3, 1, 1)
    result = {
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
        "resolution": int(data_cfg.resolution),
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
        "eval_settings_hash": hashlib.sha256(
            json.dumps(dataclasses.asdict(settings), sort_keys=True).encode()
        ).hexdigest()[:16],
        "wall_time_s": round(time.perf_counter() - started, 3),
        "device": str(device) + (f" ({torch.cuda.get_device_name()})" if str(device).startswith("cuda") else
                                 f" ({platform.processor() or platform.machine()})"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    validate_result(result)
    return result, grid_images
