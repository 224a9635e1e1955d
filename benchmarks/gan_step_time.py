"""Seconds per GAN training step (one generator update with its critic updates), on the real sprites.

    python benchmarks/gan_step_time.py                              # every model, configs/gan/cpu/<model>.yaml
    python benchmarks/gan_step_time.py --models vitgan dcgan --steps 10
    python benchmarks/gan_step_time.py --models vitgan --no-cpu-config model.g_depth=2

Sizes a run for a wall-clock budget: steps in 45 minutes = 2700 / wall s/step. Prints one JSON object per
model: wall and process-CPU seconds per step (CPU time is summed over threads, so on a shared machine it
says more than the wall time), GFLOPs per step (torch.utils.flop_counter: matrix products and
convolutions only; the same on any machine), steps per epoch, the 1-minute load average and the fp32
matmul GFLOP/s the machine delivered just before and after (a busy machine's share of itself).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pokediff.gan import train as gan_train  # noqa: E402
from pokediff.gan.config import GAN_CONFIG_DIR, MODEL_NAMES  # noqa: E402
from pokediff.gan.trainer import GanTrainer  # noqa: E402


def matmul_gflops(size: int = 1024, repeats: int = 10) -> float:
    """What the machine delivers right now on dense fp32 matrix products: reads the step times against it
    (a shared machine delivers a fraction of its idle figure, and that fraction changes by the minute)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return round(2 * size**3 * repeats / (time.perf_counter() - start) / 1e9, 1)


def time_model(name: str, use_cpu_config: bool, overrides: list[str], warmup: int, steps: int) -> dict:
    argv = ["--model", name, "--device", "cpu", *overrides]
    if use_cpu_config:
        argv[2:2] = ["--config", str(GAN_CONFIG_DIR / "cpu" / f"{name}.yaml")]
    cfg, _, _ = gan_train.config_from_args(gan_train.build_parser().parse_args(argv))
    trainer = GanTrainer(cfg)
    train_split, trainer.class_counts = gan_train.build_training_data(cfg)
    loader = gan_train._loader(cfg.data, cfg.train.batch_size, train_split, cfg.runtime.seed)
    batches = gan_train.EpochBatches(loader, cfg.runtime.seed)
    trainer.steps_per_epoch = max(len(loader) // cfg.train.n_critic, 1)
    load_before = os.getloadavg()[0]
    gflops_before = matmul_gflops()
    for _ in range(warmup):
        trainer.train_step(batches)
    gflop = None
    try:
        with FlopCounterMode(display=False) as flops:
            trainer.train_step(batches)
        gflop = round(flops.get_total_flops() / 1e9, 2)
    except AssertionError:  # torch's module tracker trips over no_grad module calls in some models
        pass
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        metrics = trainer.train_step(batches)
    wall, cpu = (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps
    return {
        "model": name,
        "config": f"configs/gan/cpu/{name}.yaml" if use_cpu_config else f"configs/gan/{name}.yaml",
        "overrides": overrides,
        "resolution": metrics["resolution"],
        "batch_size": cfg.train.batch_size,
        "n_critic": cfg.train.n_critic,
        "wall_s_per_step": round(wall, 3),
        "cpu_s_per_step": round(cpu, 3),
        "gflop_per_step": gflop,
        "steps_per_epoch": trainer.steps_per_epoch,
        "steps_in_45_min": int(2700 / wall),
        "generator_params": sum(p.numel() for p in trainer.generator.parameters()),
        "discriminator_params": sum(p.numel() for p in trainer.discriminator.parameters()),
        "threads": torch.get_num_threads(),
        "load_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "matmul_gflops_before_after": [gflops_before, matmul_gflops()],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    parser.add_argument("--no-cpu-config", action="store_true", help="time configs/gan/<model>.yaml as shipped")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    for name in args.models:
        print(json.dumps(time_model(name, not args.no_cpu_config, args.overrides, args.warmup, args.steps)), flush=True)


if __name__ == "__main__":
    main()
