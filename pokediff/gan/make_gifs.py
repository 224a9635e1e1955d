"""Animate a GAN run's fixed-noise grids: ``python -m pokediff.gan.make_gifs RUN [--output GIF]``.

The grids ``<run>/samples/epoch_XXXX.png`` are written by training with the same noise every time, so
the GIF shows the same samples evolving epoch by epoch.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from PIL import Image

EPOCH_GRID = re.compile(r"^epoch_(\d+)\.png$")


def epoch_grids(run_dir) -> list[Path]:
    folder = Path(run_dir) / "samples"
    if not folder.is_dir():
        raise FileNotFoundError(f"no samples/ folder in {run_dir}: is it a GAN run folder?")
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := EPOCH_GRID.match(p.name))]
    if not found:
        raise FileNotFoundError(f"no epoch_XXXX.png grids in {folder}; lower runtime.sample_every_epochs")
    return [p for _, p in sorted(found)]


def make_gif(
    run_dir, output=None, duration_ms: int = 300, hold_last_ms: int = 1500, max_size: int | None = None
) -> Path:
    """One GIF frame per epoch grid (oldest first), the last one held a little longer; returns the path."""
    if duration_ms < 1:
        raise ValueError(f"duration_ms must be >= 1, got {duration_ms}")
    paths = epoch_grids(run_dir)
    frames = []
    for path in paths:
        frame = Image.open(path).convert("RGB")
        if max_size and max(frame.size) > max_size:
            frame.thumbnail((max_size, max_size))
        frames.append(frame)
    if len({f.size for f in frames}) > 1:  # progan grids grow with the resolution: show all at the largest
        size = max((f.size for f in frames), key=lambda s: s[0] * s[1])
        frames = [f.resize(size, Image.Resampling.NEAREST) for f in frames]
    output = Path(output) if output else Path(run_dir) / "samples.gif"
    output.parent.mkdir(parents=True, exist_ok=True)
    durations = [duration_ms] * (len(frames) - 1) + [max(duration_ms, hold_last_ms)]
    frames[0].save(output, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return output


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="python -m pokediff.gan.make_gifs", description=__doc__.splitlines()[0])
    p.add_argument("run", help="GAN run folder")
    p.add_argument("--output", help="GIF to write (default: <run>/samples.gif)")
    p.add_argument("--duration", type=int, default=300, help="milliseconds per frame")
    p.add_argument("--max-size", type=int, help="shrink frames to at most this many pixels a side")
    args = p.parse_args(argv)
    try:
        path = make_gif(args.run, args.output, duration_ms=args.duration, max_size=args.max_size)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
