"""The loss-CSV writer, the plots' moving average and the PNG grid writer shared by training, GANs and eval."""

import csv
import math

import pytest
import torch
from PIL import Image

from pokediff.curves import CsvLog, moving_average
from pokediff.images import save_image_grid


def test_moving_average_is_a_trailing_mean_over_finite_values():
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert moving_average([1.0, 2.0, 3.0], 0) == [1.0, 2.0, 3.0]  # no smoothing
    # NaN / inf are left out of the window instead of poisoning every later point
    smoothed = moving_average([math.nan, 2.0, math.inf, 4.0, 6.0], 2)
    assert math.isnan(smoothed[0])  # nothing finite yet: a gap in the plot
    assert smoothed[1:] == [2.0, 2.0, 3.0, 5.0]


def test_csv_log_appends_formats_and_restarts_keeping_chosen_rows(tmp_path):
    log = CsvLog(tmp_path / "losses.csv", ("step", "loss", "phase"))
    log.restart()
    log.append([{"step": 1, "loss": 1 / 3, "phase": "a", "unknown": 9}, {"step": 2, "loss": 0.25, "phase": "b"}])
    log.append([{"step": 3, "loss": 0.125, "phase": "b"}])
    with open(tmp_path / "losses.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0] == {"step": "1", "loss": "0.333333", "phase": "a"}  # 6 significant digits, extra keys ignored
    log.restart(keep=lambda row: int(row["step"]) <= 2)
    with open(tmp_path / "losses.csv", newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2"]
    log.restart()
    assert (tmp_path / "losses.csv").read_text().strip() == "step,loss,phase"
    assert [p.name for p in tmp_path.iterdir()] == ["losses.csv"]


def test_image_grid_layout_and_pixels(tmp_path):
    images = torch.zeros(5, 3, 4, 4)
    images[0] = 1.0
    path = save_image_grid(images, tmp_path / "grid.png")  # 5 images: 3 per row, 2 rows
    grid = Image.open(path)
    assert grid.size == (3 * 6 + 2, 2 * 6 + 2)
    assert grid.getpixel((2, 2)) == (255, 255, 255) and grid.getpixel((8, 2)) == (0, 0, 0)
    assert save_image_grid(images, tmp_path / "row.png", nrow=5) and Image.open(tmp_path / "row.png").size == (32, 8)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        save_image_grid(torch.zeros(2, 1, 4, 4), tmp_path / "bad.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "row.png"]
