"""Shared fixtures: offline hub, few CPU threads, small copies of the bundled data."""

import csv
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_DATA = REPO_ROOT / "data" / "pokemon"

torch.set_num_threads(1)  # tiny models: one thread beats two on a 2-core, busy machine


def make_data_subset(dest: Path, count: int = 24) -> Path:
    """An imagefolder with the first ``count`` bundled sprites and their metadata rows."""
    (dest / "images").mkdir(parents=True, exist_ok=True)
    with open(BUNDLED_DATA / "metadata.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for _, row in zip(range(count), reader)]
        fields = reader.fieldnames
    for row in rows:
        shutil.copy(BUNDLED_DATA / row["file_name"], dest / row["file_name"])
    with open(dest / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return dest


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    """24 real sprites (generation 1) in imagefolder layout; read-only by convention."""
    return make_data_subset(tmp_path_factory.mktemp("pokemon24"), 24)


@pytest.fixture
def data_subset(tmp_path):
    """A fresh, writable subset for tests that corrupt or edit it: data_subset(count) -> Path."""

    def make(count: int = 12) -> Path:
        return make_data_subset(tmp_path / f"pokemon{count}", count)

    return make
