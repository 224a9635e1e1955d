"""Stability guards of every optimizer update: non-finite batches skipped, gradient spikes clipped adaptively."""

from __future__ import annotations

import logging
import statistics
from collections import deque
from typing import Optional

import torch
from accelerate import Accelerator

from pokediff.config import ConfigError
from pokediff.errors import PokediffError
from pokediff.training.setup import parameters_of, unwrap

logger = logging.getLogger(__name__)


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
            self.stage,
            step,
            reason,
            self.consecutive,
            self.total_skipped,
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


class OptimizerStepper:
    """One training step's backward/clip/update with the stability rules of every stage.

    Call ``step(loss)`` inside ``accelerator.accumulate(model)``. Backward always runs (so DDP ranks stay in
    step); at a sync point a non-finite loss or gradient norm skips the update (counted by the guard), a
    gradient spike is clipped adaptively. The LR scheduler steps either way so the schedule stays tied to the
    step count. Returns a dict of metrics at a sync point, else ``None``.
    """

    def __init__(
        self,
        accelerator,
        model,
        optimizer,
        lr_scheduler,
        grad_clip: float,
        guard: NonFiniteGuard,
        detector: Optional[GradExplosionDetector],
        ema=None,
        sync_every: int = 1,
    ):
        if sync_every < 1:
            raise ConfigError(f"runtime.sync_every_steps must be >= 1, got {sync_every}")
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.grad_clip = grad_clip
        self.guard = guard
        self.detector = detector
        self.ema = ema
        self.sync_every = sync_every
        self._window_finite = True
        self._loss_finite: Optional[torch.Tensor] = None  # sync_every > 1: this update's micro-batches, on device

    def step(self, loss: torch.Tensor, global_step: int) -> Optional[dict]:
        if self.sync_every > 1:
            return self._step_on_device(loss)
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
                    logger.warning(
                        "step %d: gradient norm %.3g far above its running median: clipped adaptively",
                        global_step,
                        float(norm),
                    )
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

    def _step_on_device(self, loss: torch.Tensor) -> Optional[dict]:
        """``step`` without a host read (``sync_every > 1``): the update is always taken, neutralised on the
        device when the loss or a gradient is non-finite. Returns raw metrics (device tensors) for ``settle``.

        A non-finite step leaves the weights exactly as they were: its gradients are zeroed (EDM2's nan_to_num,
        then a 0/1 mask, so AdamW's moments stay finite) and, since a zero gradient still moves AdamW's weights
        (momentum and weight decay), the weights are put back from a copy taken before the update. AdamW's step
        count and the decay of its moments still advance, the LR schedule steps and the EMA takes a step towards
        the unmoved weights. Clipping is to the fixed ``grad_clip``: the adaptive clip needs the norm on the host.
        """
        acc = self.accelerator
        loss_finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = loss_finite if self._loss_finite is None else self._loss_finite & loss_finite
        acc.backward(loss)
        if not acc.sync_gradients:
            return None
        loss_finite, self._loss_finite = self._loss_finite, None
        if acc.num_processes > 1:  # every rank takes the same decision (a device-side all-reduce, no host read)
            loss_finite = acc.reduce((~loss_finite).float(), reduction="sum") == 0
        params = [p for p in parameters_of(self.model) if p.grad is not None]
        # max_norm=inf: only measure (and unscale for fp16; its GradScaler still reads found_inf every step)
        norm = torch.as_tensor(acc.clip_grad_norm_(params, float("inf")), dtype=torch.float32)
        grad_finite = torch.isfinite(norm).to(loss_finite.device)
        finite = loss_finite & grad_finite
        neutralise_gradients(params, finite)
        safe_norm = torch.where(finite, norm.to(finite.device), torch.zeros_like(norm, device=finite.device))
        torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, safe_norm.to(params[0].device))
        with torch.no_grad():
            before = [p.detach().clone() for p in params]
            self.optimizer.step()
            for p, old in zip(params, before):
                p.copy_(torch.where(finite.to(p.device), p, old))
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(parameters_of(unwrap(acc, self.model)))
        return {"lr": lr, "grad_norm": norm, "loss_finite": loss_finite, "grad_finite": grad_finite}

    def settle(self, step: int, metrics: dict) -> dict:
        """The metrics of update ``step`` once its raw values are on the host (``sync_every > 1``): the guard
        counts a non-finite step (and raises after ``nan_max_consecutive`` in a row, exactly as every step
        would, only at the next sync), the detector records the norm for logging (it clips nothing here).
        With ``sync_every == 1`` ``step`` already settled the metrics: returned as they are."""
        if self.sync_every == 1:
            return metrics
        settled = {"lr": metrics["lr"]}
        updated = False
        if not metrics["loss_finite"]:
            self.guard.skip(step, "loss")
        else:
            norm = metrics["grad_norm"]
            settled["grad_norm"] = norm
            if not metrics["grad_finite"]:
                self.guard.skip(step, "gradient norm")
            else:
                exploded = False
                if self.detector is not None:
                    _, exploded = self.detector.clip_value(norm, self.grad_clip)
                if exploded:
                    logger.warning(
                        "step %d: gradient norm %.3g far above its running median (clipped to grad_clip only: "
                        "runtime.sync_every_steps > 1)",
                        step,
                        norm,
                    )
                settled["grad_explosion"] = float(exploded)
                self.guard.ok()
                updated = True
        settled["skipped_batches"] = self.guard.total_skipped
        settled["updated"] = float(updated)
        return settled


def neutralise_gradients(parameters, finite: torch.Tensor) -> None:
    """NaN/Inf gradient entries to 0 (EDM2's ``nan_to_num``), then every gradient times ``finite`` (a 0-d
    bool tensor): a step with a non-finite loss or norm contributes nothing, decided on the device."""
    for p in parameters:
        torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
        p.grad.mul_(finite.to(p.grad.device, p.grad.dtype))
