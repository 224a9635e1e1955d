"""Run setup shared by the stages: the accelerator, the run folder and trackers, the update schedule."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Iterable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

from pokediff.config import ConfigError, save_config
from pokediff.errors import write_failure

logger = logging.getLogger(__name__)


def run_dir(cfg) -> Path:
    """``<runtime.output_dir>/<runtime.experiment_name>``."""
    return Path(cfg.runtime.output_dir).expanduser() / cfg.runtime.experiment_name


def resolve_mixed_precision(requested: str, on_cpu: bool) -> str:
    """``auto`` -> bf16 on a GPU that supports it, ``no`` on CPU; explicit values are checked."""
    allowed = ("auto", "no", "fp16", "bf16")
    if requested not in allowed:
        raise ConfigError(f"runtime.mixed_precision must be one of {allowed}, got '{requested}'")
    if requested != "auto":
        return requested
    if on_cpu or not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def build_accelerator(cfg, accelerator: Optional[Accelerator] = None) -> Accelerator:
    """The run's ``Accelerator`` from ``cfg.runtime`` (or ``accelerator`` as given), with TF32 and seeds set.

    The seedable sampler makes each epoch's shuffle a function of (seed, epoch), which is what lets
    ``--resume`` continue with exactly the batches an uninterrupted run would have seen.
    """
    rt = cfg.runtime
    if rt.allow_tf32 and torch.cuda.is_available():
        # TF32 matmuls: ~free speed on Ampere+ with no visible effect on diffusion training.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if accelerator is None:
        if rt.gradient_accumulation_steps < 1:
            raise ConfigError(f"runtime.gradient_accumulation_steps must be >= 1, got {rt.gradient_accumulation_steps}")
        if rt.report_to not in ("tensorboard", "none"):
            raise ConfigError(f"runtime.report_to must be 'tensorboard' or 'none', got '{rt.report_to}'")
        folder = run_dir(cfg)
        accelerator = Accelerator(
            gradient_accumulation_steps=rt.gradient_accumulation_steps,
            mixed_precision=resolve_mixed_precision(rt.mixed_precision, rt.cpu),
            log_with=None if rt.report_to == "none" else rt.report_to,
            project_config=ProjectConfiguration(project_dir=str(folder), logging_dir=str(folder / "logs")),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=rt.seed),
            cpu=rt.cpu,
        )
    if accelerator.device.type == "cpu" or rt.num_threads > 0:
        torch.set_num_threads(cpu_threads_per_process(rt.num_threads, accelerator.num_processes))
    # the same seed on every rank: identical initial weights (and EMA shadows); per-step randomness differs by
    # rank through seed_step
    set_seed(rt.seed)
    return accelerator


def cpu_threads_per_process(num_threads: int, num_processes: int, cores: int | None = None) -> int:
    """``runtime.num_threads`` when set (> 0); for 0, this machine's cores shared among the processes.

    0 does not mean torch's default: ``accelerate launch`` sets OMP_NUM_THREADS=1 for a one-process CPU run,
    which ran the CPU config's VAE step 1.8x and its U-Net step 1.4x slower than 2 threads on a quiet 2-core VM.
    """
    if num_threads > 0:
        return num_threads
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, cores // max(1, num_processes))


def _flat_hparams(cfg) -> dict:
    """TensorBoard hparams accept scalars only: flatten sections, lists become strings."""
    out = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(f"{name}.", value)
            elif isinstance(value, (int, float, str, bool)):
                out[name] = value
            else:
                out[name] = str(value)

    walk("", dataclasses.asdict(cfg))
    return out


def start_stage(accelerator: Accelerator, cfg, stage: str) -> Path:
    """Create the run folder, save the resolved config, start this stage's trackers (``logs/<stage>``)."""
    folder = run_dir(cfg)
    if accelerator.is_main_process:
        try:
            for sub in ("samples", "checkpoints", "logs"):
                (folder / sub).mkdir(parents=True, exist_ok=True)
            save_config(cfg, folder / "config.yaml")
        except OSError as err:
            raise write_failure(folder, err) or err
    accelerator.wait_for_everyone()
    if accelerator.log_with:
        accelerator.init_trackers(stage, config=_flat_hparams(cfg))
    return folder


def end_stage(accelerator: Accelerator) -> None:
    """Close this stage's trackers and forget its prepared objects so the next stage starts clean.

    (``accelerator.end_training`` would also tear down the process group the next stage still needs.)
    """
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
    accelerator.free_memory()


def optimizer_steps(num_batches: int, epochs: int, accumulation: int, max_steps: Optional[int]) -> tuple[int, int]:
    """(updates per epoch, total updates) given per-process batches, epochs and ``runtime.max_steps``."""
    if num_batches < 1:
        raise ConfigError("the training dataloader yields no batches: the batch size is larger than the train split")
    per_epoch = math.ceil(num_batches / accumulation)
    total = per_epoch * epochs
    if max_steps is not None:
        if max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
        total = min(total, max_steps)
    if total < 1:
        raise ConfigError(f"nothing to train: epochs={epochs}")
    return per_epoch, total


def one_cycle(optimizer, learning_rate: float, total_steps: int, warmup_fraction: float, num_processes: int):
    """OneCycleLR over ``total_steps`` updates; accelerate steps a prepared scheduler once per process."""
    if not 0.0 < warmup_fraction < 1.0:
        raise ConfigError(f"warmup_fraction must be in (0, 1), got {warmup_fraction}")
    scheduler_steps = max(total_steps * num_processes, 2)
    if warmup_fraction * scheduler_steps < 2:
        # OneCycleLR divides by the warm-up length in steps minus one (ZeroDivisionError at exactly one step);
        # a run this short (--max-steps) has no room for a warm-up: start at the peak and anneal.
        logger.warning(
            "only %d steps: too few for a warm-up of %.0f%%, the learning rate starts at its peak",
            total_steps,
            100 * warmup_fraction,
        )
        warmup_fraction = 0.5 / scheduler_steps
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=learning_rate,
        total_steps=scheduler_steps,
        pct_start=warmup_fraction,
    )


def unwrap(accelerator: Accelerator, model):
    """The plain model behind DDP / torch.compile wrappers."""
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


def to_channels_last(model, enabled: bool):
    return model.to(memory_format=torch.channels_last) if enabled else model


def maybe_compile(model, enabled: bool):
    return torch.compile(model) if enabled else model


def parameters_of(model) -> Iterable[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
