"""``train_3stage.py --dry-run``: load the data, build each chosen stage's models, print the step plan, train nothing.

The step counts come from the same ``optimizer_steps`` the stages call, so the plan is what a run would do
(per process; accelerate shards each epoch's batches over the processes).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from pokediff.config import ConfigError
from pokediff.training.setup import optimizer_steps


def count_parameters(model) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def stage_examples(cfg, n_train: int) -> dict[str, int]:
    """Training examples per epoch of each stage: sprites (stage 1), cached latents with mirrors and shifted copies
    (stage 2), the training captions the stage-3 gate does not judge on (stage 3's reward prompts; at most, when
    every caption names a colour or a shape)."""
    cached = n_train * (2 if cfg.stage2.cache_flips else 1) * (1 + cfg.stage2.cache_shifted_copies)
    return {"1": n_train, "2": cached, "3": max(0, n_train - cfg.stage3.gate_samples)}


def check_data_fits(cfg, stages, num_processes: int = 1) -> dict:
    """Refuse, before any work, an empty train/val split or a stage whose batch is larger than its data (every
    loader drops the last partial batch, so such a stage would have no step); returns the split sizes."""
    from pokediff.data import load_splits
    from pokediff.data.dataset import filters_text

    splits = load_splits(cfg.data, require=("train", "val"))
    n_train = len(splits["train"])
    for stage, examples in stage_examples(cfg, n_train).items():
        batch = getattr(cfg, f"stage{stage}").batch_size
        if stage in stages and batch * num_processes > examples:
            what = "sprites" if stage == "1" else f"cached latents ({n_train} sprites, mirrors and shifted copies)"
            raise ConfigError(
                f"stage{stage}.batch_size={batch} x {num_processes} process(es) is larger than the train split: "
                f"{examples} {what} with {filters_text(cfg.data)}; use a batch of at most "
                f"{examples // num_processes} or widen the filters"
            )
    return {name: len(split) for name, split in splits.items()}


def _steps(cfg, stage_cfg, examples: int, num_processes: int) -> dict:
    # drop_last=True in every stage's loader: a partial batch is never a step
    batches = examples // stage_cfg.batch_size // num_processes
    per_epoch, total = optimizer_steps(
        batches, stage_cfg.epochs, cfg.runtime.gradient_accumulation_steps, cfg.runtime.max_steps
    )
    every = cfg.runtime.checkpoint_every_steps
    return {
        "epochs": stage_cfg.epochs if cfg.runtime.max_steps is None else math.ceil(total / per_epoch),
        "examples": examples,
        "batch_size": stage_cfg.batch_size,
        "steps_per_epoch": per_epoch,
        "total_steps": total,
        "checkpoint_every_steps": every,
        "checkpoints_written": total // every + (total % every != 0),  # plus one at the end of the stage
        "checkpoints_kept": cfg.runtime.checkpoints_total_limit,
    }


def _require_folder(path: Path, what: str, flag: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{what} not found at {path} (run that stage first or pass {flag})")


def plan_run(
    cfg, stages: list[str], vae_path: Optional[Path] = None, unet_path: Optional[Path] = None, num_processes: int = 1
) -> dict:
    """What ``train_3stage.py --stage ...`` would do with ``cfg``: data sizes, models and steps per stage.

    Raises the error a real run would hit before training (empty split, batch larger than the split, missing
    input weights of a stage that is not run first).
    """
    from pokediff.models.text import load_text_encoder
    from pokediff.models.unet import build_unet
    from pokediff.models.vae import build_vae

    sizes = check_data_fits(cfg, stages, num_processes)
    n_train = sizes["train"]
    examples = stage_examples(cfg, n_train)
    plan: dict = {
        "data": sizes,
        "num_processes": num_processes,
        "stages": {},
    }
    if "2" in stages and "1" not in stages and vae_path is not None:
        _require_folder(vae_path, "the stage-1 VAE", "--vae-checkpoint")
    if "3" in stages and "2" not in stages and unet_path is not None:
        _require_folder(unet_path, "the stage-2 U-Net", "--diffusion-checkpoint")

    vae = build_vae(cfg.vae, cfg.data.resolution)
    _, text_encoder = load_text_encoder(cfg.text_encoder.name)
    if "1" in stages:
        entry = {"models": {"vae": count_parameters(vae)}, **_steps(cfg, cfg.stage1, examples["1"], num_processes)}
        if cfg.stage1.perceptual_weight > 0:
            from pokediff.models.perceptual import load_perceptual

            perceptual = load_perceptual(cfg.perceptual)
            entry["models"][f"perceptual ({perceptual.name}, frozen)"] = (count_parameters(perceptual)[0], 0)
        plan["stages"]["1"] = entry
    if "2" in stages or "3" in stages:
        unet = build_unet(
            cfg.unet, cfg.vae.latent_channels, vae.latent_size(cfg.data.resolution), text_encoder.config.hidden_size
        )
    if "2" in stages:
        plan["stages"]["2"] = {
            "models": {"unet": count_parameters(unet)},
            **_steps(cfg, cfg.stage2, examples["2"], num_processes),
        }
    if "3" in stages:
        from pokediff.training.stage3_reward import mark_trainable

        mark_trainable(unet)  # as stage 3 does: the keys and values of the text cross-attention only
        plan["stages"]["3"] = {
            "models": {"unet": count_parameters(unet)},
            "clip_source": cfg.clip.source,
            "gate_samples": cfg.stage3.gate_samples,
            "gate_max_kid_increase": cfg.stage3.gate_max_kid_increase,
            "gate_alpha": cfg.stage3.gate_alpha,
            **_steps(cfg, cfg.stage3, examples["3"], num_processes),
        }
    return plan


def format_plan(plan: dict) -> str:
    names = {"1": "stage 1 (VAE)", "2": "stage 2 (U-Net)", "3": "stage 3 (U-Net text cross-attention)"}
    data = plan["data"]
    lines = [
        f"data: train {data['train']}, val {data['val']}, test {data['test']} rows; {plan['num_processes']} process(es)"
    ]
    for stage, entry in plan["stages"].items():
        lines.append(f"{names[stage]}:")
        for model, (total, trainable) in entry["models"].items():
            lines.append(f"  {model}: {total:,} parameters ({trainable:,} trainable)")
        lines.append(
            f"  {entry['epochs']} epochs x {entry['steps_per_epoch']} steps per epoch = "
            f"{entry['total_steps']} optimizer steps, batch size {entry['batch_size']} "
            f"({entry['examples']} training examples)"
        )
        lines.append(
            f"  checkpoint every {entry['checkpoint_every_steps']} steps and at the end: "
            f"{entry['checkpoints_written']} written, newest {entry['checkpoints_kept']} kept"
        )
        if "clip_source" in entry:
            lines.append(f"  CLIP: clip.source={entry['clip_source']} (offline: a domain CLIP is fitted first)")
            gate = entry["gate_samples"]
            lines.append(
                f"  gate: kept only if colour or shape agreement on {gate} training captions (kept out of the "
                "reward) goes up, neither goes down (paired sign test, p <= "
                f"{entry['gate_alpha']:g}), and KID rises by at most {100 * entry['gate_max_kid_increase']:g} %"
                if gate
                else "  gate: off (stage3.gate_samples=0): stage 3 is kept unjudged"
            )
    lines.append("dry run: nothing trained, nothing written")
    return "\n".join(lines)
