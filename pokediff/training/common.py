"""Loop pieces shared by the training stages: accelerator setup, stability guards, checkpoints, logs, samples.

Every stage follows the same shape (the habits of diffusers' ``examples/text_to_image/train_text_to_image.py``):
``build_accelerator`` -> ``start_stage`` -> ``accelerator.prepare`` -> ``CheckpointManager.resolve/load`` -> for each
epoch ``epoch_batches`` -> ``seed_step`` -> loss -> ``OptimizerStepper.step`` (non-finite guard, adaptive clipping,
EMA) -> ``log_metrics`` -> ``CheckpointManager.save`` every N steps -> ``end_stage``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

from pokediff.config import ConfigError, save_config
from pokediff.errors import CheckpointError, PokediffError, verify_checkpoint_files, write_failure
from pokediff.fileio import swap_into_place

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_NAME = "training_state.json"
EMA_DIR_NAME = "ema"


# ------------------------------------------------------------------------------------ run setup
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
    if rt.num_threads > 0:
        torch.set_num_threads(rt.num_threads)
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
    # the same seed on every rank: identical initial weights (and EMA shadows); per-step randomness differs by
    # rank through seed_step
    set_seed(rt.seed)
    return accelerator


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


def seed_step(seed: int, step: int, process_index: int = 0, stream: str = "") -> int:
    """Seed torch's global RNG from (seed, step, process): noise, timesteps and dropout of a step do not
    depend on what ran before it, so a resumed run repeats an uninterrupted one bit for bit."""
    digest = hashlib.sha256(f"{seed}:{stream}:{step}:{process_index}".encode()).digest()
    value = int.from_bytes(digest[:8], "little") % (2**63 - 1)
    torch.manual_seed(value)
    return value


class EpochSeededDataset(torch.utils.data.Dataset):
    """Wraps a map-style dataset so random augmentation of item ``i`` in epoch ``e`` depends on (seed, e, i) only.

    accelerate calls ``set_epoch`` on the dataset; the global RNG is forked, so loading never disturbs the
    training step's RNG (and vice versa), whatever the prefetching or the resume point.
    """

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + int(index))
            return self.dataset[index]

    def __getattr__(self, name):  # captions, type_ids, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def wrap_dataloader_seeded(loader: torch.utils.data.DataLoader, seed: int) -> torch.utils.data.DataLoader:
    """A copy of ``loader`` over ``EpochSeededDataset(loader.dataset, seed)`` (same batching and collation).

    Workers are not persistent: a persistent worker keeps the dataset copy of the first epoch and would never
    see ``set_epoch``, repeating the same augmentation every epoch.
    """
    return torch.utils.data.DataLoader(
        EpochSeededDataset(loader.dataset, seed),
        batch_size=loader.batch_size,
        shuffle=isinstance(loader.sampler, torch.utils.data.RandomSampler),
        drop_last=loader.drop_last,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        persistent_workers=False,
        pin_memory=loader.pin_memory,
    )


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
        logger.warning("only %d steps: too few for a warm-up of %.0f%%, the learning rate starts at its peak",
                       total_steps, 100 * warmup_fraction)
        warmup_fraction = 0.5 / scheduler_steps
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=learning_rate,
        total_steps=scheduler_steps,
        pct_start=warmup_fraction,
    )


# ------------------------------------------------------------------------------ stability guards
class NonFiniteLossError(PokediffError, RuntimeError):
    """Raised after ``runtime.nan_max_consecutive`` non-finite batches in a row."""


class NonFiniteGuard:
    """Skip batches whose loss or gradients are NaN/Inf, count them, and abort after N in a row.

    The check is reduced over processes so every rank takes the same skip decision (DDP stays in step).
    """

    def __init__(self, max_consecutive: int, accelerator: Optional[Accelerator] = None, stage: str = ""):
        if max_consecutive < 1:
            raise ConfigError(f"runtime.nan_max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.accelerator = accelerator
        self.stage = stage
        self.total_skipped = 0
        self.consecutive = 0

    def all_finite(self, *tensors: torch.Tensor) -> bool:
        bad = torch.zeros((), device=tensors[0].device)
        for t in tensors:
            bad = bad + (~torch.isfinite(t.detach().float())).any().float()
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        return bool(bad.item() == 0)

    def skip(self, step: int, reason: str) -> None:
        self.total_skipped += 1
        self.consecutive += 1
        logger.warning(
            "%s step %d: non-finite %s, batch skipped (%d in a row, %d in total)",
            self.stage, step, reason, self.consecutive, self.total_skipped,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.stage}: {self.consecutive} batches in a row had a non-finite {reason} (last at step {step}); "
                "training diverged. Lower the learning rate, check the data, or resume from an earlier checkpoint "
                f"(runtime.nan_max_consecutive={self.max_consecutive})."
            )

    def ok(self) -> None:
        self.consecutive = 0

    def state_dict(self) -> dict:
        return {"total_skipped": self.total_skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.total_skipped = int(state.get("total_skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))


class GradExplosionDetector:
    """Flags a gradient norm far above its running median and proposes an adaptive clip value.

    A spike (norm > ``factor`` x median of the last ``window`` norms) is clipped down to the median, so one bad
    batch moves the weights no more than a typical one. The history only grows by ``factor`` x median per
    spike, so a genuine, lasting change of scale is accepted after a while.
    """

    def __init__(self, factor: float, window: int = 100, min_history: int = 10):
        if factor <= 1.0:
            raise ConfigError(f"runtime.grad_explosion_factor must be > 1, got {factor}")
        self.factor = factor
        self.min_history = min_history
        self.history: deque = deque(maxlen=window)
        self.events = 0

    def clip_value(self, norm: float, base_clip: float) -> tuple[float, bool]:
        """(max norm to clip to, whether this is an explosion); also records ``norm``."""
        exploded = False
        clip = base_clip
        if len(self.history) >= self.min_history:
            median = statistics.median(self.history)
            if norm > self.factor * median:
                exploded = True
                self.events += 1
                clip = min(base_clip, median)
                norm = self.factor * median
        self.history.append(float(norm))
        return clip, exploded

    def state_dict(self) -> dict:
        return {"history": list(self.history), "events": self.events}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(float(v) for v in state.get("history", []))
        self.events = int(state.get("events", 0))


def clip_gradients(
    accelerator: Accelerator, parameters, base_clip: float, detector: Optional[GradExplosionDetector]
) -> tuple[torch.Tensor, bool]:
    """Clip to ``base_clip`` (or lower on an explosion); returns (pre-clip total norm, exploded)."""
    parameters = [p for p in parameters if p.grad is not None]
    # max_norm=inf: only measure (and unscale for fp16) here; the real clip value depends on the norm.
    norm = accelerator.clip_grad_norm_(parameters, float("inf"))
    norm = torch.as_tensor(norm, dtype=torch.float32)
    if not torch.isfinite(norm):
        return norm, False
    clip, exploded = (base_clip, False) if detector is None else detector.clip_value(float(norm), base_clip)
    torch.nn.utils.clip_grads_with_norm_(parameters, clip, norm.to(parameters[0].device))
    return norm, exploded


def epoch_batches(accelerator: Accelerator, loader, epoch: int, skip: int = 0):
    """The batches of ``epoch`` (shuffled by (seed, epoch)), minus the first ``skip`` already consumed."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    return accelerator.skip_first_batches(loader, skip) if skip else loader


class OptimizerStepper:
    """One training step's backward/clip/update with the stability rules of every stage.

    Call ``step(loss)`` inside ``accelerator.accumulate(model)``. Backward always runs (so DDP ranks stay in
    step); at a sync point a non-finite loss or gradient norm skips the update (counted by the guard), a
    gradient spike is clipped adaptively. The LR scheduler steps either way so the schedule stays tied to the
    step count. Returns a dict of metrics at a sync point, else ``None``.
    """

    def __init__(self, accelerator, model, optimizer, lr_scheduler, grad_clip: float, guard: NonFiniteGuard,
                 detector: Optional[GradExplosionDetector], ema=None):
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.grad_clip = grad_clip
        self.guard = guard
        self.detector = detector
        self.ema = ema
        self._window_finite = True

    def step(self, loss: torch.Tensor, global_step: int) -> Optional[dict]:
        acc = self.accelerator
        self._window_finite &= self.guard.all_finite(loss)
        acc.backward(loss)
        if not acc.sync_gradients:
            return None
        params = parameters_of(self.model)
        metrics = {"lr": self.lr_scheduler.get_last_lr()[0]}
        if not self._window_finite:
            self.guard.skip(global_step, "loss")
            updated = False
        else:
            norm, exploded = clip_gradients(acc, params, self.grad_clip, self.detector)
            metrics["grad_norm"] = float(norm)
            if not self.guard.all_finite(norm.to(acc.device)):
                self.guard.skip(global_step, "gradient norm")
                updated = False
            else:
                if exploded:
                    logger.warning("step %d: gradient norm %.3g far above its running median: clipped adaptively",
                                   global_step, float(norm))
                metrics["grad_explosion"] = float(exploded)
                self.optimizer.step()
                self.guard.ok()
                updated = True
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._window_finite = True
        if updated and self.ema is not None:
            self.ema.step(parameters_of(unwrap(acc, self.model)))
        metrics["skipped_batches"] = self.guard.total_skipped
        metrics["updated"] = float(updated)
        return metrics


# ------------------------------------------------------------------------------------ checkpoints
@dataclass
class TrainingState:
    """Where a stage stands; saved as JSON beside accelerate's state in every checkpoint."""

    stage: str
    global_step: int = 0  # optimizer updates done (skipped batches count: they consumed data)
    epoch: int = 0
    batches_in_epoch: int = 0  # per-process batches of ``epoch`` already consumed
    total_steps: int = 0
    best_val_loss: float = float("inf")
    extra: dict = field(default_factory=dict)  # guard / detector states, stage-specific values

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["best_val_loss"] = None if math.isinf(self.best_val_loss) else self.best_val_loss
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainingState":
        data = json.loads(text)
        if data.get("best_val_loss") is None:
            data["best_val_loss"] = float("inf")
        return cls(**data)

    @classmethod
    def read(cls, path) -> "TrainingState":
        """The state saved in ``path`` (a training_state.json); ``CheckpointError`` naming it if garbled."""
        path = Path(path)
        try:
            return cls.from_json(path.read_text())
        except (ValueError, TypeError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"checkpoint file {path} is damaged: {err}") from err


class CheckpointManager:
    """Atomic ``accelerator.save_state`` checkpoints in ``<run>/checkpoints/<stage>/checkpoint-<step>``.

    Each checkpoint holds accelerate's files (model weights as safetensors, optimizer, LR scheduler, RNG,
    sampler) plus ``training_state.json`` (step, epoch, position in the epoch, guards) and, if given, the EMA
    weights (``ema/``, diffusers ``EMAModel.save_pretrained``). It is written into ``.tmp-checkpoint-<step>`` and
    renamed when complete, so an interrupted write never replaces or corrupts a usable checkpoint.
    """

    def __init__(self, accelerator: Accelerator, folder, total_limit: int, ema=None, ema_model_cls=None):
        if total_limit < 1:
            raise ConfigError(f"runtime.checkpoints_total_limit must be >= 1, got {total_limit}")
        self.accelerator = accelerator
        self.folder = Path(folder)
        self.total_limit = total_limit
        self.ema = ema
        self.ema_model_cls = ema_model_cls
        self._pending_state: Optional[TrainingState] = None
        self.loaded_state: Optional[TrainingState] = None
        self._handles = [
            accelerator.register_save_state_pre_hook(self._save_hook),
            accelerator.register_load_state_pre_hook(self._load_hook),
        ]

    # accelerate calls these inside save_state / load_state, so the EMA and the position travel with the
    # optimizer and RNG states in one folder.
    def _save_hook(self, models, weights, output_dir):
        if not self.accelerator.is_main_process:
            return
        if self.ema is not None:
            self.ema.save_pretrained(os.path.join(output_dir, EMA_DIR_NAME))
        if self._pending_state is not None:
            Path(output_dir, TRAINING_STATE_NAME).write_text(self._pending_state.to_json())

    def _load_hook(self, models, input_dir):
        state_file = Path(input_dir, TRAINING_STATE_NAME)
        if not state_file.is_file():
            raise FileNotFoundError(f"{input_dir} is not a pokediff checkpoint: {TRAINING_STATE_NAME} is missing")
        self.loaded_state = TrainingState.read(state_file)
        if self.ema is not None:
            ema_dir = Path(input_dir, EMA_DIR_NAME)
            if not ema_dir.is_dir():
                raise FileNotFoundError(f"checkpoint {input_dir} has no EMA weights ({EMA_DIR_NAME}/)")
            from diffusers.training_utils import EMAModel

            loaded = EMAModel.from_pretrained(str(ema_dir), self.ema_model_cls)
            self.ema.load_state_dict(loaded.state_dict())
            self.ema.to(self.accelerator.device)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ listing
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Optional[Path]:
        found = self.checkpoints()
        return found[-1] if found else None

    def resolve(self, resume: Optional[str]) -> Optional[Path]:
        """``None`` -> no resume; ``latest`` -> newest intact checkpoint or None; else a folder that must exist
        and be intact.

        A damaged newest checkpoint (truncated weights, garbled JSON) is passed over for the one before it, with
        a warning naming the damaged file; ``CheckpointError`` if checkpoints exist but none is intact.
        """
        if resume is None:
            return None
        if resume == "latest":
            found = self.checkpoints()
            if not found:
                logger.info("no checkpoint to resume from in %s: starting fresh", self.folder)
                return None
            damaged = []
            for path in reversed(found):
                try:
                    verify_checkpoint_files(path)
                    TrainingState.read(path / TRAINING_STATE_NAME)
                except (CheckpointError, FileNotFoundError) as err:
                    damaged.append(str(err))
                    logger.warning("--resume latest: %s; trying the checkpoint before it", err)
                    continue
                if damaged:
                    logger.warning("--resume latest: falling back to %s, the newest intact checkpoint", path)
                return path
            raise CheckpointError(f"--resume latest: no intact checkpoint in {self.folder}: " + "; ".join(damaged))
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"--resume: checkpoint folder not found: {path}")
        if not (path / TRAINING_STATE_NAME).is_file():
            raise FileNotFoundError(f"--resume: {path} is not a pokediff checkpoint ({TRAINING_STATE_NAME} missing)")
        verify_checkpoint_files(path)
        return path

    # ------------------------------------------------------------------ save / load
    def save(self, state: TrainingState) -> Path:
        """Write a checkpoint for ``state.global_step`` atomically, then prune to ``total_limit``."""
        acc = self.accelerator
        name = f"checkpoint-{state.global_step:07d}"
        final = self.folder / name
        tmp = self.folder / f".tmp-{name}"
        if acc.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by an interrupted write
        acc.wait_for_everyone()
        self._pending_state = state
        try:
            acc.save_state(str(tmp))
        except Exception as err:  # noqa: BLE001 - only write failures are converted, the rest re-raised
            failure = write_failure(tmp, err)
            if failure is None:
                raise
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # a partial folder would only take more space
            previous = self.latest()
            keep = f"; the last complete checkpoint {previous} is intact" if previous else ""
            raise type(failure)(f"{failure}{keep}") from err
        finally:
            self._pending_state = None
        acc.wait_for_everyone()
        if acc.is_main_process:
            try:
                swap_into_place(tmp, final)  # the same step may be saved twice (final save after a periodic one)
            except OSError as err:
                raise write_failure(final, err) or err
            for stale in self.checkpoints()[: -self.total_limit]:
                shutil.rmtree(stale, ignore_errors=True)
            logger.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    def load(self, path) -> TrainingState:
        """Restore models, optimizer, scheduler, RNG, EMA from ``path``; returns the saved position."""
        self.loaded_state = None
        try:
            self.accelerator.load_state(str(path))
        except (RuntimeError, ValueError, KeyError, EOFError, OSError) as err:
            if isinstance(err, (CheckpointError, FileNotFoundError)):
                raise
            lines = [line.strip() for line in str(err).strip().splitlines()] or [type(err).__name__]
            mismatch = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                            None)
            if mismatch:
                raise CheckpointError(f"cannot load checkpoint {path}: it was made with another model configuration "
                                      f"({mismatch[:300]})") from err
            raise CheckpointError(f"cannot load checkpoint {path}: {lines[0][:300]}") from err
        if self.loaded_state is None:
            raise FileNotFoundError(f"{path} is not a pokediff checkpoint: {TRAINING_STATE_NAME} is missing")
        logger.info("resumed from %s at step %d", path, self.loaded_state.global_step)
        return self.loaded_state


def resume_or_start(accelerator, checkpoints: CheckpointManager, resume_from: Optional[Path], total_steps: int,
                    guard: NonFiniteGuard, detector: GradExplosionDetector, losses: "LossLogger") -> TrainingState:
    """A fresh state, or the checkpoint's with the guard, detector and losses.csv brought back to its step."""
    stage = checkpoints.folder.name
    if resume_from is None:
        return TrainingState(stage=stage, total_steps=total_steps)
    state = checkpoints.load(resume_from)
    if state.stage != stage:
        raise CheckpointError(f"--resume: {resume_from} is a {state.stage} checkpoint, not a {stage} one")
    if state.total_steps != total_steps:
        raise CheckpointError(
            f"--resume: checkpoint {resume_from} was made for a {state.total_steps}-step {stage}, this run gives "
            f"{total_steps} steps: resume with the same --max-steps / {stage}.epochs / batch size as that run"
        )
    guard.load_state_dict(state.extra.get("guard", {}))
    detector.load_state_dict(state.extra.get("detector", {}))
    if accelerator.is_main_process:
        losses.truncate_after(state.global_step)
    return state


def save_training_checkpoint(checkpoints: CheckpointManager, state: TrainingState, guard: NonFiniteGuard,
                             detector: GradExplosionDetector, **extra) -> Path:
    """Checkpoint ``state`` with the guard and detector states (and any stage-specific ``extra`` values)."""
    state.extra = {"guard": guard.state_dict(), "detector": detector.state_dict(), **extra}
    return checkpoints.save(state)


def atomic_save_pretrained(model, folder, **kwargs) -> Path:
    """``model.save_pretrained`` into a temp folder beside ``folder``, then swap it in (main process only)."""
    folder = Path(folder)
    tmp = folder.parent / f".tmp-{folder.name}"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), safe_serialization=True, **kwargs)
        return swap_into_place(tmp, folder)
    except Exception as err:  # noqa: BLE001 - only write failures are converted, the rest re-raised
        failure = write_failure(folder, err)
        if failure is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise failure from err


# ----------------------------------------------------------------------------------------- logging
class LossLogger:
    """``<run>/losses.csv`` in long form: time, stage, epoch, step, metric, value (main process only).

    On resume, rows of the same stage past the resumed step are dropped so the file never holds a
    step twice.
    """

    FIELDS = ("time", "stage", "epoch", "step", "metric", "value")

    def __init__(self, path, stage: str, enabled: bool = True):
        self.path = Path(path)
        self.stage = stage
        self.enabled = enabled
        if enabled and not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.FIELDS)

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if not (r["stage"] == self.stage and int(r["step"]) > step)]
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(keep)
        os.replace(tmp, self.path)

    def log(self, step: int, epoch: int, values: dict) -> None:
        if not self.enabled:
            return
        now = f"{time.time():.3f}"
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            for name, value in values.items():
                writer.writerow([now, self.stage, epoch, step, name, f"{float(value):.6g}"])


def read_losses(path) -> list[dict]:
    """Rows of a ``losses.csv`` with ``step``/``epoch`` as int and ``value`` as float."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"losses file not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["step"], r["epoch"], r["value"] = int(r["step"]), int(r["epoch"]), float(r["value"])
    return rows


def log_metrics(accelerator: Accelerator, loss_logger: Optional[LossLogger], step: int, epoch: int, values: dict):
    """One call for both sinks: trackers (TensorBoard) and losses.csv."""
    values = {k: float(v) for k, v in values.items()}
    accelerator.log(values, step=step)
    if loss_logger is not None and accelerator.is_main_process:
        loss_logger.log(step, epoch, values)


# ----------------------------------------------------------------------------------------- samples
def save_image_grid(images: torch.Tensor, path, nrow: int) -> Path:
    """Float images (N, 3, H, W) in [0, 1] -> one PNG grid, written atomically."""
    from torchvision.utils import make_grid
    from PIL import Image

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"save_image_grid expects (N, 3, H, W) images, got shape {tuple(images.shape)}")
    grid = make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=1.0)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def log_image_grid(accelerator: Accelerator, name: str, path, step: int) -> None:
    """Send a saved grid to the TensorBoard tracker, if one is active."""
    if not accelerator.is_main_process or not accelerator.trackers:
        return
    import numpy as np
    from PIL import Image

    array = np.asarray(Image.open(path).convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: array[None]}, step=step, dataformats="NHWC")


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
