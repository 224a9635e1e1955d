"""What a stage reports: losses.csv (long form) and the trackers (TensorBoard)."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator

from pokediff.curves import CsvLog


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
        self.csv = CsvLog(self.path, self.FIELDS)
        if enabled and not self.path.exists():
            self.csv.restart()

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        self.csv.restart(keep=lambda row: not (row["stage"] == self.stage and int(row["step"]) > step))

    def log(self, step: int, epoch: int, values: dict) -> None:
        if not self.enabled:
            return
        now = f"{time.time():.3f}"
        self.csv.append(
            {"time": now, "stage": self.stage, "epoch": epoch, "step": step, "metric": name, "value": float(value)}
            for name, value in values.items()
        )


class PendingRows:
    """Rows of values that may still be device tensors, moved to the host together by ``read``.

    A training loop that syncs every N updates keeps each update's loss, logged values and metrics here and
    writes them (one losses.csv row per update, as with a sync every step) after one transfer.
    """

    def __init__(self):
        self.rows: list[tuple[int, int, list[dict]]] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, step: int, epoch: int, *parts: dict) -> None:
        self.rows.append((step, epoch, list(parts)))

    def read(self) -> list[tuple[int, int, list[dict]]]:
        """The rows with every tensor value as a Python float (one stacked host read), and empty the list."""
        tensors = [v for _, _, parts in self.rows for part in parts for v in part.values() if torch.is_tensor(v)]
        values = iter(())
        if tensors:
            device = tensors[0].device
            # float64 holds every float32/bf16/fp16 value exactly, so a value reads as .item() would read it
            dtype = torch.float32 if device.type == "mps" else torch.float64
            values = iter(torch.stack([t.detach().reshape(()).to(device, dtype) for t in tensors]).tolist())
        rows = [
            (step, epoch, [{k: next(values) if torch.is_tensor(v) else v for k, v in part.items()} for part in parts])
            for step, epoch, parts in self.rows
        ]
        self.rows = []
        return rows


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
