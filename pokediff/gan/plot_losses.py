"""Plot a GAN run's ``losses.csv``: ``python -m pokediff.gan.plot_losses RUN [--output PNG] [--smooth N]``.

Drawn with PIL (no plotting library needed): one panel per group of columns (all-zero columns left out), the raw curve faint and a
moving average on top; grey vertical lines mark a change of phase (pretrain -> train) or of progan stage.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pokediff.curves import moving_average

PANELS = [
    ("losses", ["d_loss", "g_loss"]),
    ("discriminator outputs (real / fake)", ["d_real", "d_fake"]),
    ("gradient penalty / feature matching", ["gp", "fm_loss"]),
    ("gradient norms", ["d_grad_norm", "g_grad_norm"]),
]
COLORS = [(31, 119, 180), (214, 39, 40)]
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 80, 20, 28, 30


def read_losses(path) -> dict[str, list]:
    """Columns of a losses.csv; numeric columns as floats (blank -> nan)."""
    path = Path(path)
    if path.is_dir():
        path = path / "losses.csv"
    if not path.is_file():
        raise FileNotFoundError(f"losses file not found: {path} (pass a GAN run folder or its losses.csv)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} has no rows yet: train for a few steps first")
    columns: dict[str, list] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        try:
            columns[key] = [float(v) if v != "" else math.nan for v in values]
        except ValueError:
            columns[key] = values
    if "step" not in columns:
        raise ValueError(f"{path} has no 'step' column; is it a GAN losses.csv?")
    return columns


def _value_range(series: list[list[float]]) -> tuple[float, float]:
    finite = sorted(v for s in series for v in s if math.isfinite(v))
    if not finite:
        return 0.0, 1.0
    # 1st-99th percentile: a single early spike should not flatten the rest of the curve
    lo, hi = finite[int(0.01 * (len(finite) - 1))], finite[int(0.99 * (len(finite) - 1))]
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _draw_panel(draw, font, box, title, steps, named_series, smooth, boundaries):
    x0, y0, x1, y1 = box
    px0, py0, px1, py1 = x0 + MARGIN_LEFT, y0 + MARGIN_TOP, x1 - MARGIN_RIGHT, y1 - MARGIN_BOTTOM
    draw.rectangle([px0, py0, px1, py1], outline=(0, 0, 0))
    draw.text((px0, y0 + 8), title, fill=(0, 0, 0), font=font)
    s_min, s_max = steps[0], max(steps[-1], steps[0] + 1)
    smoothed = {name: moving_average(values, smooth) for name, values in named_series.items()}
    lo, hi = _value_range(list(named_series.values()))

    def to_xy(step, value):
        x = px0 + (step - s_min) / (s_max - s_min) * (px1 - px0)
        v = min(max(value, lo), hi)
        return x, py1 - (v - lo) / (hi - lo) * (py1 - py0)

    for step in boundaries:
        x, _ = to_xy(step, lo)
        draw.line([(x, py0), (x, py1)], fill=(190, 190, 190))
    for k in range(5):  # y ticks
        value = lo + (hi - lo) * k / 4
        _, y = to_xy(s_min, value)
        draw.line([(px0 - 4, y), (px0, y)], fill=(0, 0, 0))
        draw.text((x0 + 4, y - 6), _fmt(value), fill=(0, 0, 0), font=font)
    for k in range(5):  # x ticks
        step = s_min + (s_max - s_min) * k / 4
        x, _ = to_xy(step, lo)
        draw.line([(x, py1), (x, py1 + 4)], fill=(0, 0, 0))
        draw.text((x - 10, py1 + 8), str(int(round(step))), fill=(0, 0, 0), font=font)
    stride = max(1, len(steps) // 2000)  # a few thousand points per line is plenty for 900 px
    legend_x = px0 + 8
    for (name, values), color in zip(named_series.items(), COLORS):
        faint = tuple(int(c + (255 - c) * 0.7) for c in color)
        for series, fill, width in ((values, faint, 1), (smoothed[name], color, 2)):
            points = [to_xy(s, v) for s, v in zip(steps[::stride], series[::stride]) if math.isfinite(v)]
            if len(points) > 1:
                draw.line(points, fill=fill, width=width)
            elif points:
                draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=fill)
        draw.line([(legend_x, py0 + 12), (legend_x + 18, py0 + 12)], fill=color, width=2)
        draw.text((legend_x + 22, py0 + 6), name, fill=(0, 0, 0), font=font)
        legend_x += 30 + 7 * len(name)


def _boundaries(columns: dict) -> list[float]:
    """Steps where the phase or the progan resolution changes."""
    marks = []
    for key in ("phase", "resolution"):
        values = columns.get(key)
        if values:
            marks += [columns["step"][i] for i in range(1, len(values)) if values[i] != values[i - 1]]
    return sorted(set(marks))


def plot_losses(run_or_csv, output=None, smooth: int = 25, width: int = 900, panel_height: int = 220) -> Path:
    """Write the loss curves of a GAN run as a PNG (default: <run>/losses.png); returns its path."""
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1 step, got {smooth}")
    source = Path(run_or_csv)
    columns = read_losses(source)

    def informative(name):  # e.g. gp of a run without gradient penalty: an all-zero line says nothing
        return name in columns and any(math.isfinite(v) and v != 0 for v in columns[name])

    panels = [(title, [n for n in names if informative(n)]) for title, names in PANELS]
    panels = [(title, names) for title, names in panels if names]
    if not panels:
        raise ValueError(f"{source} has none of the loss columns {[n for _, names in PANELS for n in names]}")
    image = Image.new("RGB", (width, panel_height * len(panels)), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    steps, marks = columns["step"], _boundaries(columns)
    for i, (title, names) in enumerate(panels):
        box = (0, i * panel_height, width, (i + 1) * panel_height)
        _draw_panel(draw, font, box, title, steps, {n: columns[n] for n in names}, smooth, marks)
    folder = source if source.is_dir() else source.parent
    output = Path(output) if output else folder / "losses.png"
    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output)
    return output


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="python -m pokediff.gan.plot_losses", description=__doc__.splitlines()[0])
    p.add_argument("run", help="GAN run folder (or its losses.csv)")
    p.add_argument("--output", help="PNG to write (default: <run>/losses.png)")
    p.add_argument("--smooth", type=int, default=25, help="moving-average window in steps")
    args = p.parse_args(argv)
    try:
        path = plot_losses(args.run, args.output, smooth=args.smooth)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
