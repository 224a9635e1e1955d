"""Loss curves: the one CSV writer of the training stages and the GAN trainer, and the one smoother their plots use."""

from __future__ import annotations

import csv
import math
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Optional

from pokediff.fileio import atomic_write


class CsvLog:
    """A CSV file with fixed columns that training appends rows to.

    ``restart(keep)`` rewrites the file (atomically) with its header and the old rows ``keep`` accepts, so a
    resumed run never holds a step twice. Floats are written with 6 significant digits; keys outside
    ``fields`` are ignored.
    """

    def __init__(self, path, fields: Iterable[str]):
        self.path = Path(path)
        self.fields = tuple(fields)

    def restart(self, keep: Optional[Callable[[dict], bool]] = None) -> None:
        """Header + the existing rows ``keep`` accepts (none when ``keep`` is None). A last line without its
        line end (a process killed mid-append) is dropped: it may be cut anywhere, even inside a number."""
        rows = []
        if keep is not None and self.path.is_file():
            text = self.path.read_text(encoding="utf-8", errors="replace")
            lines = text.splitlines(keepends=True)
            if lines and not lines[-1].endswith(("\n", "\r")):
                lines.pop()
            rows = [r for r in csv.DictReader(lines) if keep(r)]
        with atomic_write(self.path) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

    def append(self, rows: Iterable[dict]) -> None:
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean of the last ``window`` finite values at each position.

    Non-finite values (a skipped NaN batch, an inf) are left out of the mean rather than poisoning every later
    point; a position before the first finite value is NaN, so a plot leaves it blank. ``window < 1`` (no
    smoothing) returns the values as they are.
    """
    if window < 1:
        return list(values)
    out, recent = [], deque(maxlen=window)
    for v in values:
        if math.isfinite(v):
            recent.append(v)
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out
