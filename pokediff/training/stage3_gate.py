"""Keep stage 3 only if judges it did not train against say it helps.

Stage 3 tunes the U-Net to raise a CLIP's reward; judged by that CLIP it always looks better. The gate draws the same
seeds and training captions with stage 2's U-Net and with stage 3's (same VAE, text encoder and sampler) and scores
both with three judges that share nothing with the CLIP: colour agreement (the dominant colour of a sample against
the colour its caption names, fixed HSV rules), body-shape agreement (the eval's silhouette classifier fitted on the
training sprites; balanced accuracy, so collapsing to the commonest shape earns nothing) and KID against the training
sprites (Inception features). Stage 3 ships iff colour or shape goes up, neither goes down, and KID rises by at most
``stage3.gate_max_kid_increase``; "up" and "down" are judged per sample, both arms having drawn the same captions
with the same seeds: an exact one-sided sign test (McNemar) on the samples one arm gets right and the other wrong
must reach ``stage3.gate_alpha``, so that a few samples' noise on a few hundred is neither a gain nor a loss. The
captions it judges on are kept out of stage 3's reward. On rejection the pipeline's U-Net is put back to stage 2's;
stage 3's stays in ``<run>/unet_stage3`` for inspection. The verdict and its reason go to ``stage3_metrics.json``,
the log and the model card.

Stage 3's ``shape_guidance`` method changes no weights: its two arms are the same pipeline sampled without and with
shape guidance, and on rejection the pipeline is saved without the shape classifier.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pokediff.eval.color import agreement_from_predictions, dominant_color, target_color
from pokediff.eval.sampling import pipeline_batches
from pokediff.eval.shape import balanced_accuracy, shape_agreement_from_predictions, target_shape
from pokediff.fileio import write_text_atomic

logger = logging.getLogger(__name__)

GATE_KEY = "gate"
JUDGES = ("colour", "shape")


@dataclass
class GatePrompts:
    rows: list[int]  # training rows judged on (kept out of the reward)
    prompts: list[str]
    colours: list[str | None]
    shapes: list[str | None]


def _targets(cfg, train_split) -> tuple[list[str], list[str | None], list[str | None]]:
    """(captions, the colour each names, the body-shape group each names) of every training row."""
    records = train_split.remove_columns(cfg.data.image_column)
    captions = [str(c) for c in records[cfg.data.caption_column]]
    rows = records.to_list()
    colours = [target_color(row, caption) for row, caption in zip(rows, captions)]
    shapes = [target_shape(row, caption) for row, caption in zip(rows, captions)]
    return captions, colours, shapes


def gate_prompts(cfg, train_split, targets=None) -> GatePrompts:
    """``stage3.gate_samples`` training captions that name a colour or a body shape: a seeded choice (``targets``:
    ``_targets(cfg, train_split)`` when the caller already has them)."""
    captions, colours, shapes = targets or _targets(cfg, train_split)
    named = [i for i in range(len(captions)) if colours[i] is not None or shapes[i] is not None]
    order = torch.randperm(len(named), generator=torch.Generator().manual_seed(cfg.runtime.seed)).tolist()
    chosen = sorted(named[i] for i in order[: cfg.stage3.gate_samples])
    return GatePrompts(chosen, [captions[i] for i in chosen], [colours[i] for i in chosen], [shapes[i] for i in chosen])


def hits(predicted, targets) -> list[bool | None]:
    """Per sample: right (True), wrong (False), or None where its caption names no target."""
    return [None if target is None else guess == target for guess, target in zip(predicted, targets)]


def sign_test(before: list, after: list) -> dict:
    """Exact one-sided sign test (McNemar) on paired per-sample hits: "better" samples only ``after`` gets right,
    "worse" only ``before`` does; p_better = P(at least that many better of the discordant pairs | no effect)."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} samples before but {len(after)} after")
    pairs = [(b, a) for b, a in zip(before, after) if b is not None and a is not None]
    better = sum(a and not b for b, a in pairs)
    worse = sum(b and not a for b, a in pairs)
    n = better + worse

    def tail(k: int) -> float:
        return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n

    return {"better": better, "worse": worse, "p_better": tail(better), "p_worse": tail(worse)}


@torch.no_grad()
def judge_samples(images, judged: GatePrompts, shape_judge, real_features, feature_net, background) -> dict:
    """Colour accuracy, shape balanced accuracy and KID vs the training sprites of ``images`` drawn for ``judged``,
    and the per-sample hits behind the first two (``hits``: for the paired test)."""
    from pokediff.eval.fid import extract_features, kernel_inception_distance

    colours = [dominant_color(image, background) for image in images]
    shapes = shape_judge.predict(list(images), background)
    colour = agreement_from_predictions(colours, judged.colours)["accuracy"]
    shape = balanced_accuracy(shape_agreement_from_predictions(shapes, judged.shapes)["confusion"])
    fake = extract_features(images, feature_net, progress=False)
    kid, _, _ = kernel_inception_distance(real_features, fake)
    return {
        "colour": colour,
        "shape": shape,
        "kid": kid,
        "hits": {"colour": hits(colours, judged.colours), "shape": hits(shapes, judged.shapes)},
    }


def decide(stage2: dict, stage3: dict, max_kid_increase: float, alpha: float) -> tuple[str, str, dict]:
    """("stage2" | "stage3", the reason in words, each judge's sign test): stage 3 only if colour or shape goes up,
    neither goes down and KID rises by at most ``max_kid_increase`` (a fraction). A judge goes up (down) when its
    score does and the sign test on its per-sample ``hits`` gives p_better (p_worse) <= ``alpha``."""
    compared = [j for j in JUDGES if stage2.get(j) is not None and stage3.get(j) is not None]
    paired = {j: sign_test(stage2["hits"][j], stage3["hits"][j]) for j in compared}
    gains = [j for j in compared if stage3[j] > stage2[j] and paired[j]["p_better"] <= alpha]
    drops = [j for j in compared if stage3[j] < stage2[j] and paired[j]["p_worse"] <= alpha]
    kid_limit = stage2["kid"] * (1 + max_kid_increase)
    kid_ok = stage3["kid"] <= kid_limit
    facts = ", ".join(
        f"{j} {stage2[j]:.3f} -> {stage3[j]:.3f} (+{paired[j]['better']}/-{paired[j]['worse']} samples, "
        f"p={min(paired[j]['p_better'], paired[j]['p_worse']):.2g})"
        for j in compared
    )
    facts += f", KID {stage2['kid']:.4f} -> {stage3['kid']:.4f}"
    if not gains:
        why = f"no significant gain in colour or shape at p <= {alpha:g}"
    elif drops:
        why = f"{' and '.join(drops)} went down"
    elif not kid_ok:
        why = f"KID {stage3['kid']:.4f} > {1 + max_kid_increase:g} x {stage2['kid']:.4f}"
    else:
        return "stage3", f"accepted: {facts}", paired
    return "stage2", f"rejected ({why}): {facts}", paired


def gate_stage3(cfg, run: Path, device) -> dict:
    """Judge ``<run>/unet_stage3`` against stage 2's U-Net (``stage3_metrics.json``'s inputs); write ``<run>/
    pipeline`` with the U-Net kept, and record the verdict in ``stage3_metrics.json`` and the card; return it."""
    from diffusers import UNet2DConditionModel

    from pokediff.data import load_splits
    from pokediff.eval.inception import load_feature_net
    from pokediff.eval.reference_stats import reference_features
    from pokediff.eval.shape import shape_judge_for
    from pokediff.models.shape_classifier import SpriteShapeClassifier
    from pokediff.models.text import load_text_encoder
    from pokediff.models.vae import SpriteVAE
    from pokediff.training.stage2_unet import assemble_pipeline
    from pokediff.training.stage3_reward import METRICS_FILE, UNET_DIRNAME
    from pokediff.training.stage3_shape import CLASSIFIER_DIRNAME

    metrics_path = run / METRICS_FILE
    if not metrics_path.is_file() or not ((run / UNET_DIRNAME).is_dir() or (run / CLASSIFIER_DIRNAME).is_dir()):
        raise FileNotFoundError(
            f"{run} has no finished stage 3 ({METRICS_FILE} and {UNET_DIRNAME}/ or {CLASSIFIER_DIRNAME}/): run stage 3 "
            "first"
        )
    report = json.loads(metrics_path.read_text())
    shape_guided = report.get("method") == "shape_guidance"
    pipeline_dir = run / "pipeline"
    if not cfg.stage3.gate_samples:
        verdict = {"kept": "stage3", "reason": "unjudged (stage3.gate_samples is 0)"}
    else:
        train = load_splits(cfg.data, require=("train",))["train"]
        targets = _targets(cfg, train)
        judged = gate_prompts(cfg, train, targets)
        shape_judge = shape_judge_for(train, cfg.data, targets[2])
        feature_net = load_feature_net("inception", device)
        real = reference_features(train, cfg.data, "train", feature_net, progress=False).features
        vae = SpriteVAE.from_pretrained(report["inputs"]["vae"])
        tokenizer, text_encoder = load_text_encoder(cfg.text_encoder.name)
        parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_unchanged=True)
        stage2_unet = UNet2DConditionModel.from_pretrained(report["inputs"]["unet"])
        pipes = {"stage2": assemble_pipeline(cfg, unet=stage2_unet, **parts)}
        if shape_guided:  # stage 2's U-Net drawing with shape guidance at the scale stage 3 chose
            classifier = SpriteShapeClassifier.from_pretrained(str(run / CLASSIFIER_DIRNAME))
            scale = report["shape_guidance_scale"]
            pipes["stage3"] = assemble_pipeline(
                cfg, unet=stage2_unet, **parts, shape_classifier=classifier, shape_guidance_scale=scale
            )
        else:
            unet = UNet2DConditionModel.from_pretrained(str(run / UNET_DIRNAME))
            pipes["stage3"] = assemble_pipeline(cfg, unet=unet, **parts)
        scores = {}
        for arm, pipe in pipes.items():
            batches = pipeline_batches(pipe.to(device), judged.prompts, cfg.runtime.seed, cfg.stage3.batch_size)
            images = torch.cat(list(batches))
            scores[arm] = judge_samples(images, judged, shape_judge, real, feature_net, list(cfg.data.background))
        s3 = cfg.stage3
        kept, reason, paired = decide(scores["stage2"], scores["stage3"], s3.gate_max_kid_increase, s3.gate_alpha)
        verdict = {
            "judges": f"on {len(judged.prompts)} training captions "
            + (
                "(the shape classifier was fitted on every training sprite)"
                if shape_guided
                else "kept out of the reward"
            )
            + ", same seeds for both: "
            "colour agreement, body-shape balanced accuracy, KID vs the training sprites; gains and losses by an "
            f"exact sign test on per-sample hits at p <= {s3.gate_alpha:g}",
            "stage2": {k: v for k, v in scores["stage2"].items() if k != "hits"},
            "stage3": {k: v for k, v in scores["stage3"].items() if k != "hits"},
            "paired": paired,
            "kept": kept,
            "reason": reason,
        }
        if kept == "stage2":
            pipes["stage2"].to("cpu").save_pretrained(pipeline_dir)
    _record_on_card(pipeline_dir, verdict)
    report[GATE_KEY] = verdict
    write_text_atomic(metrics_path, json.dumps(report, indent=2))
    logger.info("stage 3 gate: %s", verdict["reason"])
    return verdict


def _record_on_card(pipeline_dir: Path, verdict: dict) -> None:
    """The card says what the pipeline holds: with stage 2's U-Net put back it no longer claims stage 3."""
    from pokediff.hub import update_model_card

    kept_stage3 = verdict["kept"] == "stage3"
    line = verdict["reason"] + (": stage 3's U-Net is kept" if kept_stage3 else "; this pipeline keeps stage 2's U-Net")
    update_model_card(pipeline_dir, drop_stages=() if kept_stage3 else (3,), extra={"stage 3 gate": line})
