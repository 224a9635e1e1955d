"""The one training loop of the three stages (the habit of EDM2's ``training/training_loop.py``).

A stage builds and prepares its models and data, then
1. ``start_training`` adds what every stage shares: the update schedule (OneCycle over the stage's updates),
   the stability guards, losses.csv, and the position to resume from;
2. ``run_epochs`` runs the epochs with a loss, a small callable ``loss(batch, global_step) -> (loss, values to
   log)``, and calls the stage's ``end_of_epoch(epoch, finished)`` hook (validation, samples).

Per step: ``seed_step`` -> loss -> ``OptimizerStepper.step`` -> ``log_metrics`` -> a checkpoint every N updates.
With ``runtime.sync_every_steps`` = N > 1 the step's loss and metrics stay on the device; every N updates (and
before a checkpoint, at the end of an epoch and of training) one host read settles them: the guard counts the
non-finite steps, each update still gets its own losses.csv rows, the progress bar shows the last loss.
An epoch cut short by a checkpoint resumes at the next unseen batch; the same batches, noise and updates follow
as in an uninterrupted run.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from pokediff.training.checkpoints import (
    CheckpointManager,
    TrainingState,
    resume_or_start,
    save_training_checkpoint,
)
from pokediff.training.guards import GradExplosionDetector, NonFiniteGuard, OptimizerStepper
from pokediff.training.metrics import LossLogger, PendingRows, log_metrics
from pokediff.training.seeding import epoch_batches, seed_step
from pokediff.training.setup import end_stage, one_cycle, optimizer_steps

logger = logging.getLogger(__name__)

# loss(batch, global_step) -> (scalar loss to back-propagate, further values to log after "loss")
StageLoss = Callable[[object, int], "tuple[torch.Tensor, dict]"]


@dataclass
class StageTraining:
    """One stage's training state: the prepared model and loader, the stepper, checkpoints and losses.csv."""

    accelerator: Accelerator
    stage: str
    model: torch.nn.Module  # the prepared model the optimizer updates
    loader: torch.utils.data.DataLoader  # prepared; one item per per-process batch
    stepper: OptimizerStepper
    checkpoints: CheckpointManager
    losses: LossLogger
    state: TrainingState
    total_steps: int
    updates_per_epoch: int
    checkpoint_extra: dict = field(default_factory=dict)  # stage-specific values saved in every checkpoint
    time_up: bool = False  # stopped at the stage's max_minutes before total_steps (resume continues it)

    @property
    def finished(self) -> bool:
        return self.state.global_step >= self.total_steps

    @property
    def stopping(self) -> bool:
        """No more updates in this process: the schedule is done or the time limit was reached."""
        return self.finished or self.time_up

    def save_checkpoint(self) -> Path:
        return save_training_checkpoint(
            self.checkpoints, self.state, self.stepper.guard, self.stepper.detector, **self.checkpoint_extra
        )

    def log(self, values: dict, epoch: Optional[int] = None) -> None:
        """Values at the current step, to the trackers and losses.csv (``epoch`` defaults to the state's)."""
        log_metrics(
            self.accelerator, self.losses, self.state.global_step, self.state.epoch if epoch is None else epoch, values
        )

    def close(self) -> None:
        self.checkpoints.close()
        end_stage(self.accelerator)


def start_training(
    accelerator: Accelerator,
    stage: str,
    model,
    optimizer,
    loader,
    checkpoints: CheckpointManager,
    resume_from: Optional[Path],
    losses_path,
    schedule,
    runtime,
    ema=None,
) -> StageTraining:
    """The update schedule, guards and losses.csv for the prepared ``model`` / ``optimizer`` / ``loader``, at
    step 0 or at ``resume_from``'s position. ``schedule``: the stage's config section (``epochs``,
    ``learning_rate``, ``warmup_fraction``, ``grad_clip``); ``runtime``: ``RuntimeConfig`` (``max_steps`` and the
    guards: ``nan_max_consecutive``, ``grad_explosion_factor``, ``sync_every_steps``)."""
    updates_per_epoch, total_steps = optimizer_steps(
        len(loader), schedule.epochs, accelerator.gradient_accumulation_steps, runtime.max_steps
    )
    lr_scheduler = accelerator.prepare(
        one_cycle(optimizer, schedule.learning_rate, total_steps, schedule.warmup_fraction, accelerator.num_processes)
    )
    # a stage shorter than nan_max_consecutive must still stop when none of its steps was usable
    guard = NonFiniteGuard(min(runtime.nan_max_consecutive, total_steps), accelerator, stage)
    detector = GradExplosionDetector(runtime.grad_explosion_factor)
    stepper = OptimizerStepper(
        accelerator,
        model,
        optimizer,
        lr_scheduler,
        schedule.grad_clip,
        guard,
        detector,
        ema=ema,
        sync_every=runtime.sync_every_steps,
    )
    losses = LossLogger(losses_path, stage, enabled=accelerator.is_main_process)
    state = resume_or_start(accelerator, checkpoints, resume_from, total_steps, guard, detector, losses)
    return StageTraining(
        accelerator, stage, model, loader, stepper, checkpoints, losses, state, total_steps, updates_per_epoch
    )


def run_epochs(
    training: StageTraining,
    loss: StageLoss,
    *,
    epochs: int,
    seed: int,
    checkpoint_every_steps: int,
    desc: str,
    end_of_epoch: Optional[Callable[[int, bool], None]] = None,
    autocast: bool = False,
    max_minutes: Optional[float] = None,
) -> None:
    """Train from ``training.state`` to ``training.total_steps`` updates (or ``epochs`` epochs).

    ``end_of_epoch(epoch, finished)`` runs after each complete epoch and after the last update. ``autocast``
    wraps the loss in ``accelerator.autocast()`` (for frozen models that were not prepared).
    ``max_minutes``: wall-time limit of this call; when reached, training stops after the current update with
    ``training.time_up`` set (the stage then checkpoints and exports as if finished; ``--resume latest``
    continues the same schedule from there).
    """
    acc, state, loader = training.accelerator, training.state, training.loader
    deadline = None if max_minutes is None else time.monotonic() + 60.0 * max_minutes
    progress = tqdm(
        total=training.total_steps, initial=state.global_step, desc=desc, disable=not acc.is_local_main_process
    )
    pending = PendingRows()  # updates not yet read to the host
    training.model.train()
    for epoch in range(state.epoch, epochs):
        if training.finished:
            break
        skip = state.batches_in_epoch if epoch == state.epoch else 0
        state.epoch, state.batches_in_epoch = epoch, skip
        for batch in epoch_batches(acc, loader, epoch, skip):
            seed_step(seed, state.batches_in_epoch, acc.process_index, f"{training.stage}:{epoch}")
            with acc.accumulate(training.model):
                with acc.autocast() if autocast else nullcontext():
                    value, logged = loss(batch, state.global_step)
                metrics = training.stepper.step(value, state.global_step)
            state.batches_in_epoch += 1
            if metrics is None:
                continue
            pending.add(state.global_step, epoch, {"loss": value.detach()}, logged, metrics)
            state.global_step += 1
            progress.update(1)
            if (
                deadline is not None
                and not training.finished
                and state.global_step % training.stepper.sync_every == 0
                and _time_is_up(acc, deadline)
            ):
                training.time_up = True
            checkpoint_due = state.global_step % checkpoint_every_steps == 0 and not training.stopping
            if checkpoint_due or training.stopping or state.global_step % training.stepper.sync_every == 0:
                _settle(training, pending, progress)
            if checkpoint_due:
                training.save_checkpoint()
            if training.stopping:
                break
        _settle(training, pending, progress)
        epoch_done = state.batches_in_epoch >= len(loader)
        if end_of_epoch is not None and (epoch_done or training.stopping):
            end_of_epoch(epoch, training.stopping)
        if epoch_done:
            state.epoch, state.batches_in_epoch = epoch + 1, 0
        if training.time_up:
            break
    progress.close()
    if training.time_up:
        logger.warning(
            "%s reached its time limit (%g min) at step %d of %d: its weights are saved; continue it with "
            "--resume latest",
            training.stage,
            max_minutes,
            state.global_step,
            training.total_steps,
        )


def _time_is_up(accelerator: Accelerator, deadline: float) -> bool:
    """Whether ``deadline`` passed, as the main process sees it (every process stops at the same update)."""
    up = time.monotonic() >= deadline
    if accelerator.num_processes == 1:
        return up  # no device round trip
    from accelerate.utils import broadcast

    return bool(broadcast(torch.tensor([float(up)], device=accelerator.device), from_process=0).item())


def _settle(training: StageTraining, pending: PendingRows, progress) -> None:
    """Read the pending updates to the host (one transfer), settle their metrics and log one row set each."""
    if not pending:
        return
    for step, epoch, (loss, logged, metrics) in pending.read():
        metrics = training.stepper.settle(step, metrics)
        log_metrics(training.accelerator, training.losses, step + 1, epoch, {**loss, **logged, **metrics})
    progress.set_postfix(loss=f"{loss['loss']:.4f}")
