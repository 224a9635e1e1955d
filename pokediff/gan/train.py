"""Train a GAN baseline: ``python -m pokediff.gan.train --model dcgan [--config F] [key=value ...]``.

The run folder ``<runtime.output_dir>/<runtime.experiment_name or model>/`` gets ``config.yaml``,
``losses.csv`` (one row per generator step), ``logs/`` (TensorBoard), ``samples/epoch_XXXX.png``
(fixed-noise grids) and ``checkpoints/step_XXXXXXX/`` (see :mod:`pokediff.gan.checkpoint`).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import time
from collections import Counter
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from pokediff.config import ConfigError, config_from_dict, nest, parse_override, save_config
from pokediff.curves import CsvLog
from pokediff.data import TYPE_NAMES, build_dataloader, load_splits, load_sprite_dataset, primary_type_id
from pokediff.device import resolve_device
from pokediff.errors import report_user_errors, write_failure
from pokediff.gan.checkpoint import list_checkpoints, prune_checkpoints, read_meta, resolve_checkpoint
from pokediff.gan.config import MODEL_NAMES, GanConfig, default_config_path, load_gan_config, validate_gan_config
from pokediff.gan.registry import build_models
from pokediff.gan.trainer import GanTrainer
from pokediff.images import save_image_grid

logger = logging.getLogger(__name__)

CSV_FIELDS = [
    "step",
    "epoch",
    "phase",
    "d_loss",
    "g_loss",
    "gp",
    "fm_loss",
    "d_real",
    "d_fake",
    "d_grad_norm",
    "g_grad_norm",
    "lr_g",
    "lr_d",
    "resolution",
    "alpha",
    "skipped",
    "seconds",
]


# -------------------------------------------------------------------------------------------- data
class EpochBatches:
    """Endless (images, type ids) batches over a DataLoader; counts the passes it completes."""

    def __init__(self, loader, seed: int, epoch: int = 0):
        if len(loader) == 0:
            raise ValueError(
                f"the training data ({len(loader.dataset)} images) is smaller than train.batch_size "
                f"({loader.batch_size}); lower the batch size"
            )
        self.loader, self.seed, self.epoch = loader, seed, epoch
        self.epochs_finished = 0  # since the last call to take_finished()
        self._served = len(loader)  # the first call starts a pass

    def __call__(self):
        if self._served == len(self.loader):
            if self.loader.generator is not None:
                self.loader.generator.manual_seed(self.seed + self.epoch)  # the same order again after a resume
            self._iterator, self._served = iter(self.loader), 0
        batch = next(self._iterator)
        self._served += 1
        if self._served == len(self.loader):  # counted at the last batch, so grids follow the epoch at once
            self.epoch += 1
            self.epochs_finished += 1
        return batch["pixel_values"], batch["type_id"]

    def take_finished(self) -> int:
        finished, self.epochs_finished = self.epochs_finished, 0
        return finished


def _loader(data_cfg, batch_size: int, dataset, seed: int):
    return build_dataloader(
        data_cfg,
        "train",
        batch_size,
        shuffle=True,
        drop_last=True,
        dataset=dataset,
        generator=torch.Generator().manual_seed(seed),
    )


def build_training_data(cfg: GanConfig):
    """(train split of the sprites, its primary-type histogram)."""
    train_split = load_splits(cfg.data, require=("train",))["train"]
    type_ids = [primary_type_id(t) for t in train_split["types"]] if "types" in train_split.column_names else []
    counts = Counter(i for i in type_ids if i >= 0)
    if cfg.model.name == "cdcgan" and len(counts) == 0:
        raise ValueError("cdcgan needs the primary type of every image: the dataset has no usable 'types' column")
    if cfg.model.name == "cdcgan" and any(i < 0 for i in type_ids):
        bad = sum(i < 0 for i in type_ids)
        raise ValueError(f"cdcgan: {bad} training rows have no known primary type (types not in TYPE_NAMES)")
    return train_split, [counts.get(i, 0) for i in range(len(TYPE_NAMES))]


def build_pretrain_data(cfg: GanConfig):
    """All rows of another dataset (hub name or imagefolder), through the same data layer and transforms."""
    pre = cfg.pretrain
    data_cfg = copy.deepcopy(cfg.data)
    data_cfg.dataset_name, data_cfg.image_column = pre.dataset, pre.image_column
    data_cfg.caption_column = pre.caption_column
    data_cfg.filter_types, data_cfg.filter_generations = [], []
    return data_cfg, load_sprite_dataset(data_cfg)


# ------------------------------------------------------------------------------------------ output
def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> Path:
    """Images in [-1, 1] -> one PNG grid, written atomically."""
    return save_image_grid((images.detach().float() + 1) / 2, path, nrow=nrow)


def _tensorboard(run_dir: Path, enabled: bool):
    if not enabled:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "logs"))


# -------------------------------------------------------------------------------------------- loop
def default_run_dir(cfg: GanConfig) -> Path:
    name = cfg.runtime.experiment_name or "-".join([cfg.model.name, *cfg.data.filter_types])
    return Path(cfg.runtime.output_dir) / name


def train(cfg: GanConfig, resume=None, run_dir=None) -> Path:
    """Train (or resume) a GAN; returns the run folder. ``resume``: a checkpoint or a run folder."""
    validate_gan_config(cfg)
    device = resolve_device(cfg.runtime.device)
    if device.type == "cuda":  # fixed shapes, fp32 weights: let cuDNN pick kernels and use TF32 math
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    if resume is None and list_checkpoints(run_dir):
        raise FileExistsError(
            f"{run_dir} already holds checkpoints of an earlier run: continue it with --resume {run_dir}, "
            "or pick another runtime.experiment_name / --output-dir"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    except OSError as err:
        raise write_failure(run_dir, err) or err
    train_cfg, rt = cfg.train, cfg.runtime

    if resume is not None:
        trainer, state = GanTrainer.from_checkpoint(resume, cfg, device=device)
        fixed_noise = state["extra"]["fixed_noise"].to(device)
        fixed_labels = state["extra"]["fixed_labels"].to(device)
        logger.info("resumed %s at step %d (epoch %d)", resolve_checkpoint(resume), trainer.step, trainer.epoch)
    else:
        trainer = GanTrainer(cfg, device=device)
        fixed_noise = trainer.sample_noise(rt.num_sample_images, torch.Generator().manual_seed(rt.seed))
        fixed_labels = (torch.arange(rt.num_sample_images) % cfg.model.num_classes).to(device)

    train_split, trainer.class_counts = build_training_data(cfg)
    sprites = EpochBatches(_loader(cfg.data, train_cfg.batch_size, train_split, rt.seed), rt.seed, trainer.epoch)
    pretrain = None
    if cfg.pretrain.dataset and trainer.step < cfg.pretrain.steps:
        pre_cfg, pre_rows = build_pretrain_data(cfg)
        pretrain = EpochBatches(_loader(pre_cfg, train_cfg.batch_size, pre_rows, rt.seed), rt.seed)

    # one row per generator step; a resumed run drops the rows past its checkpoint, a fresh one starts a new curve
    losses_csv = CsvLog(run_dir / "losses.csv", CSV_FIELDS)
    resumed_at = trainer.step
    losses_csv.restart(keep=(lambda row: int(row["step"]) <= resumed_at) if resume is not None else None)
    writer = _tensorboard(run_dir, rt.report_to == "tensorboard")
    extra = {"fixed_noise": fixed_noise, "fixed_labels": fixed_labels}

    def checkpoint():
        trainer.save(run_dir / "checkpoints" / f"step_{trainer.step:07d}", extra_tensors=extra)
        prune_checkpoints(run_dir, rt.checkpoints_total_limit)

    def grid(name: str):
        images = trainer.generate(fixed_noise, fixed_labels if trainer.is_conditional else None)
        path = save_grid(images, run_dir / "samples" / f"{name}.png")
        if writer is not None:
            writer.add_images("samples", (images + 1) / 2, trainer.step)
        return path

    steps_per_epoch = max(len(sprites.loader) // train_cfg.n_critic, 1)
    trainer.steps_per_epoch = steps_per_epoch  # progan.schedule counts its phases in epochs
    total = (
        train_cfg.max_steps
        if train_cfg.max_steps is not None
        else cfg.pretrain.steps * bool(pretrain) + train_cfg.epochs * steps_per_epoch
    )
    started = time.time()
    stop_reason = "max_steps"
    bar = tqdm(total=total, initial=min(trainer.step, total), desc=f"gan:{cfg.model.name}", unit="step")
    try:
        while True:
            if train_cfg.max_steps is not None and trainer.step >= train_cfg.max_steps:
                break
            if trainer.epoch >= train_cfg.epochs:
                stop_reason = "epochs"
                break
            if train_cfg.max_minutes is not None and time.time() - started >= 60 * train_cfg.max_minutes:
                stop_reason = "max_minutes"
                break
            in_pretrain = pretrain is not None and trainer.step < cfg.pretrain.steps
            metrics = trainer.train_step(pretrain if in_pretrain else sprites)
            row = {
                "step": trainer.step,
                "epoch": trainer.epoch,
                "phase": "pretrain" if in_pretrain else "train",
                **metrics,
                "lr_g": trainer.opt_g.param_groups[0]["lr"],
                "lr_d": trainer.opt_d.param_groups[0]["lr"],
                "seconds": round(time.time() - started, 2),
            }
            losses_csv.append([row])
            bar.update(1)
            if trainer.step % rt.log_every_steps == 0:
                bar.set_postfix(d=f"{metrics['d_loss']:.3f}", g=f"{metrics['g_loss']:.3f}")
                if writer is not None:
                    for key in ("d_loss", "g_loss", "gp", "fm_loss", "d_real", "d_fake", "d_grad_norm", "g_grad_norm"):
                        writer.add_scalar(f"train/{key}", metrics[key], trainer.step)
            if in_pretrain and trainer.step == cfg.pretrain.steps:
                grid("pretrain_final")
            for _ in range(sprites.take_finished()):
                trainer.epoch += 1
                if trainer.epoch % rt.sample_every_epochs == 0:
                    grid(f"epoch_{trainer.epoch:04d}")
            if trainer.step % rt.checkpoint_every_steps == 0:
                checkpoint()
    except KeyboardInterrupt:  # Ctrl-C still leaves a final grid and checkpoint to resume from
        stop_reason = "interrupted"
    finally:
        bar.close()
    grid(f"final_step_{trainer.step:07d}")
    if not list_checkpoints(run_dir) or list_checkpoints(run_dir)[-1].name != f"step_{trainer.step:07d}":
        checkpoint()
    if writer is not None:
        writer.close()
    logger.info("stopped (%s) at step %d, epoch %d; run folder %s", stop_reason, trainer.step, trainer.epoch, run_dir)
    return run_dir


def plan_training(cfg: GanConfig) -> dict:
    """``--dry-run``: the data, the networks' sizes and the step plan of a fresh run, without training."""
    from pokediff.training.plan import count_parameters

    train_split, _ = build_training_data(cfg)
    train_cfg, rt = cfg.train, cfg.runtime
    batches = len(train_split) // train_cfg.batch_size  # drop_last=True, as in training
    if batches == 0:
        raise ConfigError(
            f"train.batch_size={train_cfg.batch_size}: larger than the training split "
            f"({len(train_split)} images); lower the batch size"
        )
    steps_per_epoch = max(batches // train_cfg.n_critic, 1)
    pretrain_steps = cfg.pretrain.steps if cfg.pretrain.dataset else 0
    total = pretrain_steps + train_cfg.epochs * steps_per_epoch  # training stops at train.epochs or train.max_steps
    if train_cfg.max_steps is not None:
        total = min(total, train_cfg.max_steps)
    generator, discriminator = build_models(cfg)
    return {
        "model": cfg.model.name,
        "train_images": len(train_split),
        "batch_size": train_cfg.batch_size,
        "generator": count_parameters(generator)[0],
        "discriminator": count_parameters(discriminator)[0],
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "max_minutes": train_cfg.max_minutes,
        "checkpoint_every_steps": rt.checkpoint_every_steps,
        "checkpoints_written": total // rt.checkpoint_every_steps + (total % rt.checkpoint_every_steps != 0),
        "checkpoints_kept": rt.checkpoints_total_limit,
        "run_dir": str(default_run_dir(cfg)),
    }


def format_training_plan(plan: dict) -> str:
    budget = f", or {plan['max_minutes']} minutes if sooner" if plan["max_minutes"] is not None else ""
    return "\n".join(
        [
            f"{plan['model']}: generator {plan['generator']:,} parameters, discriminator {plan['discriminator']:,}",
            f"data: {plan['train_images']} training images, batch size {plan['batch_size']}",
            f"{plan['steps_per_epoch']} generator steps per epoch, {plan['total_steps']} generator steps in total{budget}",
            f"checkpoint every {plan['checkpoint_every_steps']} steps and at the end: {plan['checkpoints_written']} "
            f"written, newest {plan['checkpoints_kept']} kept, in {plan['run_dir']}",
            "dry run: nothing trained, nothing written",
        ]
    )


# --------------------------------------------------------------------------------------------- CLI
def _deep_update(base: dict, updates: dict) -> dict:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pokediff.gan.train", description="Train a GAN baseline on the sprites.")
    p.add_argument("--model", choices=MODEL_NAMES, help="which GAN (required unless --resume)")
    p.add_argument(
        "--config",
        action="append",
        help="YAML layered over configs/gan/<model>.yaml (on resume: over the saved config); repeatable",
    )
    p.add_argument("--resume", help="checkpoint folder or run folder (its latest checkpoint) to continue from")
    p.add_argument("--lr", type=float, help="learning rate of both G and D (also on resume)")
    p.add_argument("--lr-g", type=float, help="generator learning rate")
    p.add_argument("--lr-d", type=float, help="discriminator learning rate")
    p.add_argument("--max-steps", type=int, help="stop at this total generator step count")
    p.add_argument("--max-minutes", type=float, help="wall-clock budget of this invocation")
    p.add_argument("--output-dir", help="parent folder of the run folder (runtime.output_dir)")
    p.add_argument("--type", action="append", dest="types", help="train only on Pokémon of this type (repeatable)")
    p.add_argument("--pretrain-dataset", help="datasets hub name or local imagefolder to pretrain on first")
    p.add_argument("--pretrain-steps", type=int, help="generator steps on the pretraining data")
    p.add_argument("--device", help="auto | cpu | cuda[:N]")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check config and data, print the networks' sizes and the step plan, exit without training",
    )
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.lambda_gp=5 model.latent_dim=100")
    return p


def _check_flag_values(args) -> None:
    """Refuse flag values that would train nothing or train wrongly, before any work."""
    for flag, value in (("--lr", args.lr), ("--lr-g", args.lr_g), ("--lr-d", args.lr_d)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} must be a finite number > 0, got {value}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1 (generator steps in total), got {args.max_steps}")
    if args.max_minutes is not None and not (math.isfinite(args.max_minutes) and args.max_minutes > 0):
        raise ConfigError(f"--max-minutes must be a finite number > 0, got {args.max_minutes}")
    if args.pretrain_steps is not None and args.pretrain_steps < 0:
        raise ConfigError(f"--pretrain-steps must be >= 0, got {args.pretrain_steps}")


def _flag_overrides(args) -> dict:
    _check_flag_values(args)
    flags = {
        "train.lr_g": args.lr_g if args.lr_g is not None else args.lr,
        "train.lr_d": args.lr_d if args.lr_d is not None else args.lr,
        "train.max_steps": args.max_steps,
        "train.max_minutes": args.max_minutes,
        "runtime.output_dir": args.output_dir,
        "pretrain.dataset": args.pretrain_dataset,
        "pretrain.steps": args.pretrain_steps,
        "runtime.device": args.device,
    }
    if args.types:
        unknown = [name for name in args.types if name.lower() not in TYPE_NAMES]
        if unknown:
            raise ConfigError(f"unknown --type {', '.join(unknown)}; choose from {', '.join(TYPE_NAMES)}")
        flags["data.filter_types"] = [name.lower() for name in args.types]
    return {k: v for k, v in flags.items() if v is not None}


def _yaml_layers(path) -> list[dict]:
    """The mappings a YAML file stands for, its ``base:`` chain first."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("base", None)
    return (_yaml_layers(path.parent / base) if base else []) + [data]


def _layered(cfg: GanConfig, files, overrides: dict) -> GanConfig:
    merged = cfg.to_dict()
    for file in files or []:
        for layer in _yaml_layers(file):
            _deep_update(merged, layer)
    return validate_gan_config(config_from_dict(GanConfig, _deep_update(merged, overrides)))


def config_from_args(args) -> tuple[GanConfig, Path | None, Path | None]:
    """(config, checkpoint to resume or None, run folder or None = the default one).

    Layers, later wins: configs/gan/<model>.yaml (or, on resume, the checkpoint's saved config), each
    ``--config`` file in order, the flags, then ``key=value`` overrides.
    """
    overrides = nest(_flag_overrides(args))
    _deep_update(overrides, nest(dict(parse_override(o) for o in args.overrides)))
    if args.resume is None:
        if args.model is None:
            raise ConfigError("--model is required (one of " + ", ".join(MODEL_NAMES) + ") unless --resume is given")
        cfg = _layered(load_gan_config(default_config_path(args.model)), args.config, overrides)
        if cfg.model.name != args.model:
            raise ConfigError(f"--model {args.model} but the config files set model.name={cfg.model.name}")
        return cfg, None, None
    checkpoint = resolve_checkpoint(args.resume, verify=True)
    meta = read_meta(checkpoint)
    if args.model is not None and args.model != meta["model_name"]:
        raise ConfigError(f"--model {args.model} but {checkpoint} holds a '{meta['model_name']}' model")
    cfg = _layered(config_from_dict(GanConfig, meta["gan_config"]), args.config, overrides)
    if cfg.model.name != meta["model_name"]:
        raise ConfigError(f"model.name={cfg.model.name} but {checkpoint} holds a '{meta['model_name']}' model")
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" and not args.output_dir else None
    return cfg, checkpoint, run_dir


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return report_user_errors(_configure_and_train, args)


def _configure_and_train(args) -> Path:
    cfg, checkpoint, run_dir = config_from_args(args)
    if args.dry_run:
        print(format_training_plan(plan_training(cfg)))
        return run_dir if run_dir is not None else default_run_dir(cfg)
    return train(cfg, resume=checkpoint, run_dir=run_dir)


if __name__ == "__main__":
    main()
