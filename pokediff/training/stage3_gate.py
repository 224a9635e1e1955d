"""Keep stage 3 only if a judge it did not train against says it helps.

Stage 3 tunes the text encoder to raise a CLIP score; judged by that same CLIP, it always looks better (on the
CPU protocol the domain-CLIP score rose 7.3 -> 8.8 while KID and colour agreement got worse). The gate compares
the pipeline with stage 2's text encoder (the frozen pretrained one the U-Net was trained on) and with stage 3's,
on a judge that has nothing to do with CLIP: does the dominant colour of a sample match the colour its caption
names? It draws the same seeds for both, on training captions, so the val and free-form figures that the
evaluation reports stay untouched by the choice. When stage 3 does not win, the pipeline's ``text_encoder``
is put back to the pretrained one (saved by name when it is a public one); stage 3's own weights stay in
``<run>/text_encoder`` for inspection.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pokediff.eval.color import agreement_from_predictions, dominant_color, target_color
from pokediff.eval.sampling import pipeline_batches
from pokediff.fileio import write_text_atomic

logger = logging.getLogger(__name__)

GATE_KEY = "gate"


def judge_prompts(records: list[dict], captions: list[str], num: int, seed: int) -> tuple[list[str], list[str]]:
    """(prompts, target colours): ``num`` captions that name a colour, a seeded choice among ``records``."""
    targets = (target_color(row, caption) for row, caption in zip(records, captions))
    named = [(caption, colour) for caption, colour in zip(captions, targets) if colour is not None]
    order = torch.randperm(len(named), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = [named[i] for i in order[:num]]
    return [c for c, _ in chosen], [t for _, t in chosen]


@torch.no_grad()
def colour_agreement(pipe, prompts: list[str], targets: list[str], seed: int, batch_size: int) -> float:
    """Share of samples whose dominant colour is the one the prompt names; sample k is drawn with seed + k."""
    background = list(pipe.config.background)
    batches = pipeline_batches(pipe, prompts, seed, batch_size)
    predicted = [dominant_color(image, background) for images in batches for image in images]
    return agreement_from_predictions(predicted, targets)["accuracy"]


def decide(stage2_score: float, stage3_score: float) -> str:
    """Which text encoder the pipeline keeps: stage 3's only when it is strictly better (a tie is no gain)."""
    return "stage3" if stage3_score > stage2_score else "stage2"


def gate_stage3(cfg, run: Path, device) -> dict:
    """Judge ``<run>/pipeline`` (stage 3's text encoder) against the pretrained text encoder; put the pretrained
    one back when stage 3 does not win. Records the verdict in ``<run>/stage3_metrics.json``; returns it."""
    from pokediff.data import load_splits
    from pokediff.models.text import load_text_encoder
    from pokediff.pipeline import PokeSpritePipeline
    from pokediff.training.stage2_unet import assemble_pipeline
    from pokediff.training.stage3_text import METRICS_FILE

    num, seed = cfg.stage3.gate_samples, cfg.runtime.seed
    pipeline_dir = run / "pipeline"
    train = load_splits(cfg.data, require=("train",))["train"]
    records = train.remove_columns(cfg.data.image_column)
    prompts, targets = judge_prompts(records.to_list(), [str(c) for c in records[cfg.data.caption_column]], num, seed)
    if not prompts:
        verdict = {"kept": "stage3", "reason": "no training caption names a colour: nothing to judge with"}
    else:
        pipe = PokeSpritePipeline.from_pretrained(str(pipeline_dir)).to(device)
        pipe.set_progress_bar_config(disable=True)
        batch = max(1, min(len(prompts), cfg.stage3.batch_size))
        stage3_score = colour_agreement(pipe, prompts, targets, seed, batch)
        _, pretrained = load_text_encoder(cfg.text_encoder.name)
        pipe.text_encoder = pretrained.to(device).eval()
        stage2_score = colour_agreement(pipe, prompts, targets, seed, batch)
        kept = decide(stage2_score, stage3_score)
        verdict = {
            "judge": f"colour agreement on {len(prompts)} training captions that name a colour "
            "(dominant sample colour = named colour), same seeds for both",
            "stage2_text_encoder": stage2_score,
            "stage3_text_encoder": stage3_score,
            "kept": kept,
        }
        if kept == "stage2":
            restored = assemble_pipeline(
                cfg, pipe.vae, pipe.unet, pretrained, pipe.tokenizer, text_encoder_unchanged=True
            )
            restored.to("cpu").save_pretrained(pipeline_dir)
        _record_on_card(pipeline_dir, verdict)
    metrics_path = run / METRICS_FILE
    report = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    report[GATE_KEY] = verdict
    write_text_atomic(metrics_path, json.dumps(report, indent=2))
    if "stage3_text_encoder" in verdict:
        logger.info(
            "stage 3 gate: colour agreement %.3f with stage 2's text encoder, %.3f with stage 3's -> "
            "the pipeline keeps %s's",
            verdict["stage2_text_encoder"],
            verdict["stage3_text_encoder"],
            verdict["kept"].replace("stage", "stage "),
        )
    else:
        logger.info("stage 3 gate: %s", verdict["reason"])
    return verdict


def _record_on_card(pipeline_dir: Path, verdict: dict) -> None:
    """The model card says what the pipeline holds: with stage 2's text encoder kept, it no longer claims a
    fine-tuned one (stage 3 ran, but its weights are not these)."""
    from pokediff.hub import update_model_card

    kept_stage3 = verdict["kept"] == "stage3"
    line = (
        f"colour agreement {verdict['stage2_text_encoder']:.3f} with the pretrained text encoder, "
        f"{verdict['stage3_text_encoder']:.3f} with stage 3's: "
        + (
            "stage 3's text encoder is kept"
            if kept_stage3
            else "stage 3 ran but did not help, so this pipeline keeps the pretrained text encoder"
        )
    )
    update_model_card(pipeline_dir, drop_stages=() if kept_stage3 else (3,), extra={"stage 3 gate": line})
