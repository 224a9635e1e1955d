"""Checkpoints: accelerate's state plus the stage's position, written atomically, resumed with damage checks."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from accelerate import Accelerator

from pokediff.config import ConfigError
from pokediff.errors import CheckpointError, newest_intact_checkpoint, verify_checkpoint_files, write_failure
from pokediff.fileio import atomic_write, swap_into_place
from pokediff.training.guards import GradExplosionDetector, NonFiniteGuard
from pokediff.training.metrics import LossLogger

logger = logging.getLogger(__name__)


CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_NAME = "training_state.json"
EMA_DIR_NAME = "ema"


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


def _check_intact(path: Path) -> None:
    verify_checkpoint_files(path)
    TrainingState.read(path / TRAINING_STATE_NAME)


def list_checkpoints(folder) -> list[Path]:
    """The complete ``checkpoint-<step>`` folders in ``folder`` (no half-written temporaries), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


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
        return list_checkpoints(self.folder)

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
            return newest_intact_checkpoint(found, _check_intact, self.folder)
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
            mismatch = next(
                (line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))), None
            )
            if mismatch:
                raise CheckpointError(
                    f"cannot load checkpoint {path}: it was made with another model configuration ({mismatch[:300]})"
                ) from err
            raise CheckpointError(f"cannot load checkpoint {path}: {lines[0][:300]}") from err
        if self.loaded_state is None:
            raise FileNotFoundError(f"{path} is not a pokediff checkpoint: {TRAINING_STATE_NAME} is missing")
        logger.info("resumed from %s at step %d", path, self.loaded_state.global_step)
        return self.loaded_state


def resume_or_start(
    accelerator,
    checkpoints: CheckpointManager,
    resume_from: Optional[Path],
    total_steps: int,
    guard: NonFiniteGuard,
    detector: GradExplosionDetector,
    losses: "LossLogger",
) -> TrainingState:
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


def save_training_checkpoint(
    checkpoints: CheckpointManager,
    state: TrainingState,
    guard: NonFiniteGuard,
    detector: GradExplosionDetector,
    **extra,
) -> Path:
    """Checkpoint ``state`` with the guard and detector states (and any stage-specific ``extra`` values)."""
    state.extra = {"guard": guard.state_dict(), "detector": detector.state_dict(), **extra}
    return checkpoints.save(state)


def atomic_save_pretrained(model, folder, **kwargs) -> Path:
    """``model.save_pretrained`` into a temp folder beside ``folder``, then swap it in (main process only)."""
    folder = Path(folder)
    try:
        with atomic_write(folder) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - only write failures are converted, the rest re-raised
        failure = write_failure(folder, err)
        if failure is None:
            raise
        raise failure from err
    return folder
