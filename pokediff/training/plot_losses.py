"""Plot a run's losses.csv and animate its sample grids: ``python -m pokediff.training.plot_losses RUN``.

Writes ``RUN/plots/<stage>.png`` (one panel per metric: raw values faint, a moving average bold) and
``RUN/samples/<stage>_progress.gif`` (the fixed-noise grids in epoch order). Drawn with Pillow only.
"""

from __future__ import annotations

import argparse
import math
import re
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pokediff.curves import moving_average
from pokediff.training.metrics import read_losses

# bookkeeping columns that are not worth a panel by default
HIDDEN_METRICS = {"updated", "grad_explosion"}
PANEL_W, PANEL_H, MARGIN = 420, 260, 48
RAW_COLOUR, SMOOTH_COLOUR, VAL_COLOUR = (170, 190, 230), (30, 70, 170), (200, 60, 40)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _panel(name: str, series: list[tuple[int, float]], smooth: int, log_y: bool) -> Image.Image:
    image = Image.new("RGB", (PANEL_W, PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    series = [(s, v) for s, v in series if math.isfinite(v) and (v > 0 or not log_y)]
    draw.text((MARGIN, 6), name + (" (log)" if log_y else ""), fill="black", font=font)
    left, top, right, bottom = MARGIN, 24, PANEL_W - 12, PANEL_H - 28
    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    if not series:
        draw.text((left + 10, top + 10), "no finite values", fill="gray", font=font)
        return image
    steps = [s for s, _ in series]
    values = [math.log10(v) if log_y else v for _, v in series]
    s_min, s_max = min(steps), max(steps)
    v_min, v_max = min(values), max(values)
    if v_max == v_min:
        v_min, v_max = v_min - 0.5, v_max + 0.5
    if s_max == s_min:
        s_max = s_min + 1

    def xy(step, value):
        x = left + (step - s_min) / (s_max - s_min) * (right - left)
        y = bottom - (value - v_min) / (v_max - v_min) * (bottom - top)
        return x, y

    colour = VAL_COLOUR if name.startswith("val") else SMOOTH_COLOUR
    points = [xy(s, v) for s, v in zip(steps, values)]
    if len(points) == 1 or name.startswith("val"):
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    if len(points) > 1:
        if smooth > 1 and not name.startswith("val"):
            draw.line(points, fill=RAW_COLOUR, width=1)
            points = [xy(s, v) for s, v in zip(steps, moving_average(values, smooth))]
        draw.line(points, fill=colour, width=2)
    label = (lambda v: _fmt(10**v)) if log_y else _fmt
    draw.text((4, top - 4), label(v_max), fill="black", font=font)
    draw.text((4, bottom - 8), label(v_min), fill="black", font=font)
    draw.text((left, bottom + 6), f"step {s_min}", fill="black", font=font)
    end = f"step {s_max}"
    draw.text((right - draw.textlength(end, font=font), bottom + 6), end, fill="black", font=font)
    return image


def plot_stage(rows: list[dict], stage: str, out_path, metrics=None, smooth: int = 20, log_y: bool = False) -> Path:
    """One PNG with a panel per metric of ``stage``."""
    series = defaultdict(list)
    for r in rows:
        if r["stage"] == stage:
            series[r["metric"]].append((r["step"], r["value"]))
    names = [m for m in (metrics or sorted(series)) if m in series and (metrics or m not in HIDDEN_METRICS)]
    if not names:
        raise ValueError(f"no metrics to plot for {stage}; present: {sorted(series)}")
    cols = min(3, len(names))
    rows_n = math.ceil(len(names) / cols)
    sheet = Image.new("RGB", (cols * PANEL_W, rows_n * PANEL_H), "white")
    for i, name in enumerate(names):
        positive = all(v > 0 for _, v in series[name])
        panel = _panel(name, sorted(series[name]), smooth, log_y and positive and name in ("loss", "val_loss"))
        sheet.paste(panel, ((i % cols) * PANEL_W, (i // cols) * PANEL_H))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path)
    return out_path


def make_progress_gif(samples_dir, stage: str, out_path=None, frame_ms: int = 400) -> Path | None:
    """``<stage>_epochNNNN.png`` grids in epoch order -> an animated GIF (None when there are no grids)."""
    samples_dir = Path(samples_dir)
    pattern = re.compile(rf"^{re.escape(stage)}_epoch(\d+)\.png$")
    frames = sorted(
        (int(m.group(1)), p) for p in samples_dir.glob(f"{stage}_epoch*.png") if (m := pattern.match(p.name))
    )
    if not frames:
        return None
    images = [Image.open(p).convert("RGB") for _, p in frames]
    out_path = Path(out_path) if out_path else samples_dir / f"{stage}_progress.gif"
    images[0].save(out_path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return out_path


def plot_run(run, metrics=None, smooth: int = 20, log_y: bool = False) -> dict:
    """Plots and GIFs for every stage found in ``run``; returns {name: path}."""
    run = Path(run)
    rows = read_losses(run / "losses.csv")
    outputs = {}
    for stage in sorted({r["stage"] for r in rows}):
        outputs[f"{stage}_plot"] = plot_stage(rows, stage, run / "plots" / f"{stage}.png", metrics, smooth, log_y)
        gif = make_progress_gif(run / "samples", stage)
        if gif is not None:
            outputs[f"{stage}_gif"] = gif
    return outputs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run folder holding losses.csv (outputs/<experiment>)")
    parser.add_argument("--metrics", help="comma-separated metrics to plot (default: all but bookkeeping)")
    parser.add_argument("--smooth", type=int, default=20, help="moving-average window in steps (default: %(default)s)")
    parser.add_argument("--log-y", action="store_true", help="log scale for loss / val_loss")
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    outputs = plot_run(args.run, metrics, args.smooth, args.log_y)
    for name, path in outputs.items():
        print(f"{name}: {path}")
    return outputs


if __name__ == "__main__":
    main()
