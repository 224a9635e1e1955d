"""Loading sprites through `datasets`, validating rows, deterministic splits, torch Dataset/DataLoader."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import datasets
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pokediff.errors import PokediffError

from ..config import REPO_ROOT, ConfigError
from .captions import caption_variants
from .constants import primary_type_id
from .transforms import SpriteTransform

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


class BadDataError(PokediffError, ValueError):
    """A dataset row whose image cannot be read or whose caption is missing."""


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _check_hub_reachable(name: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after datasets' long retries, when the hub cannot be reached."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(
            f"dataset '{name}' is not a local folder and the hub ({host}) cannot be reached: {err}. "
            "Use a local imagefolder (data.root) or set HF_HUB_OFFLINE=1 to use a cached copy."
        ) from None


def _load_raw(data_cfg) -> datasets.Dataset:
    name = data_cfg.dataset_name
    if name is None or Path(name).expanduser().is_dir():
        root = Path(name or data_cfg.root).expanduser()
        if not root.is_absolute() and not root.is_dir() and (REPO_ROOT / root).is_dir():
            root = REPO_ROOT / root  # configs name the bundled data relative to the repo
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {root}")
        if not any((root / m).is_file() for m in ("metadata.csv", "metadata.jsonl", "metadata.parquet")):
            raise FileNotFoundError(
                f"{root} has no metadata.csv/metadata.jsonl: it is not an imagefolder with captions"
            )
        return datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
    if _hub_offline():
        try:
            return datasets.load_dataset(name, split="train")
        except Exception as err:  # datasets raises several types for "not cached"
            raise ConnectionError(f"dataset '{name}' is not in the local cache and HF_HUB_OFFLINE=1: {err}") from None
    _check_hub_reachable(name)
    return datasets.load_dataset(name, split="train")


def _image_source(entry) -> str:
    if isinstance(entry, dict):
        return entry.get("path") or "<bytes>"
    return getattr(entry, "filename", None) or "<image>"


def open_image(entry) -> Image.Image:
    """Decode an undecoded `datasets.Image` entry ({"path", "bytes"}); errors name the file."""
    source = _image_source(entry)
    try:
        if isinstance(entry, Image.Image):
            entry.load()
            return entry
        if entry.get("bytes") is not None:
            image = Image.open(io.BytesIO(entry["bytes"]))
        else:
            image = Image.open(entry["path"])
        image.load()
        return image
    except FileNotFoundError:
        raise BadDataError(f"image file is missing: {source}") from None
    except Exception as err:
        raise BadDataError(f"cannot read image {source}: {err}") from None


def _validate(ds: datasets.Dataset, data_cfg) -> tuple[datasets.Dataset, list[str]]:
    """Check every row once, up front, so a bad file is reported by name instead of crashing a worker."""
    problems, keep = [], []
    images = ds[data_cfg.image_column]
    captions = ds[data_cfg.caption_column]
    for i, (entry, caption) in enumerate(zip(images, captions)):
        try:
            open_image(entry)
            if caption is None or not str(caption).strip():
                raise BadDataError(
                    f"row {i} ({_image_source(entry)}) has no caption in column '{data_cfg.caption_column}'"
                )
            keep.append(i)
        except BadDataError as err:
            if not data_cfg.skip_bad_images:
                raise BadDataError(f"{err} (set data.skip_bad_images=true to skip bad rows)") from None
            problems.append(str(err))
    if problems:
        logger.warning("skipped %d bad rows: %s", len(problems), "; ".join(problems[:5]))
        ds = ds.select(keep)
    return ds, problems


def load_sprite_dataset(data_cfg, return_problems: bool = False):
    """All rows of the configured source, filtered and validated; the image column stays undecoded."""
    ds = _load_raw(data_cfg)
    for column in (data_cfg.image_column, data_cfg.caption_column):
        if column not in ds.column_names:
            raise ConfigError(f"column '{column}' not in dataset; columns are {ds.column_names}")
    ds = ds.cast_column(data_cfg.image_column, datasets.Image(decode=False))
    if data_cfg.filter_types:
        if "types" not in ds.column_names:
            raise ConfigError("data.filter_types needs a 'types' column, which this dataset lacks")
        wanted = {t.lower() for t in data_cfg.filter_types}
        ds = ds.filter(lambda t: bool(wanted & set((t or "").lower().split("|"))), input_columns="types")
    if data_cfg.filter_generations:
        if "generation" not in ds.column_names:
            raise ConfigError("data.filter_generations needs a 'generation' column, which this dataset lacks")
        gens = {int(g) for g in data_cfg.filter_generations}
        ds = ds.filter(lambda g: g in gens, input_columns="generation")
    if len(ds) == 0:
        raise ConfigError(f"no rows left after filtering with {filters_text(data_cfg)}: widen the filters")
    ds, problems = _validate(ds, data_cfg)
    return (ds, problems) if return_problems else ds


def _row_key(entry, caption) -> str:
    # the file name keeps a row's split fixed when other rows are added or reordered
    if isinstance(entry, dict) and entry.get("path"):
        return os.path.basename(entry["path"])
    if isinstance(entry, dict) and entry.get("bytes") is not None:
        return hashlib.sha256(entry["bytes"]).hexdigest()
    return str(caption)


def split_assignment(keys, seed: int, fractions) -> list[str]:
    """Each key's split from a seeded hash: independent of the other rows."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ConfigError(f"data.split_fractions must be three non-negative numbers summing to 1, got {fractions}")
    bounds = (fractions[0], fractions[0] + fractions[1])
    out = []
    for key in keys:
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        out.append("train" if u < bounds[0] else "val" if u < bounds[1] else "test")
    return out


def split_dataset(ds: datasets.Dataset, data_cfg) -> dict[str, datasets.Dataset]:
    keys = [_row_key(e, c) for e, c in zip(ds[data_cfg.image_column], ds[data_cfg.caption_column])]
    assignment = split_assignment(keys, data_cfg.split_seed, data_cfg.split_fractions)
    return {name: ds.select([i for i, a in enumerate(assignment) if a == name]) for name in SPLIT_NAMES}


_METADATA_COLUMNS = ("name", "types", "genus", "color", "shape", "flavor_text")


class SpriteDataset(Dataset):
    """Items: pixel_values (3, R, R) in [-1, 1], text, type_id (primary type, -1 unknown), index."""

    def __init__(self, hf_split: datasets.Dataset, data_cfg, train: bool = False):
        self.data = hf_split
        self.image_column = data_cfg.image_column
        self.caption_column = data_cfg.caption_column
        self.transform = SpriteTransform(data_cfg, train=train)
        self.captions = [str(c) for c in hf_split[self.caption_column]]
        types = hf_split["types"] if "types" in hf_split.column_names else [None] * len(hf_split)
        self.type_ids = [primary_type_id(t) for t in types]
        # training draws one of several captions per sprite (data.caption_variants); evaluation keeps `text`
        self.caption_variants = [[c] for c in self.captions]
        if getattr(data_cfg, "caption_variants", False):
            meta = {c: hf_split[c] for c in _METADATA_COLUMNS if c in hf_split.column_names}
            self.caption_variants = [
                caption_variants({c: values[i] for c, values in meta.items()}, caption)
                for i, caption in enumerate(self.captions)
            ]
        self.sample_captions = bool(train)
        # decoded, resized sprites by index: decoding and resizing the PNG again each epoch was about half of the
        # data path's CPU time at 64 px; each DataLoader worker fills its own copy
        self.cache_images = bool(getattr(data_cfg, "cache_images", False))
        self._prepared: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        prepared = self._prepared.get(index)
        if prepared is None:
            prepared = self.transform.prepare(open_image(self.data[index][self.image_column]))
            if self.cache_images:
                self._prepared[index] = prepared
        variants = self.caption_variants[index]
        text = self.captions[index]
        if self.sample_captions and len(variants) > 1:
            text = variants[int(torch.randint(len(variants), ()))]
        return {
            "pixel_values": self.transform.finish(prepared),
            "text": text,
            "type_id": self.type_ids[index],
            "index": index,
        }


def collate_sprites(items: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "text": [it["text"] for it in items],
        "type_id": torch.tensor([it["type_id"] for it in items], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }


def filters_text(data_cfg) -> str:
    return (
        f"data.filter_types={list(data_cfg.filter_types)}, data.filter_generations={list(data_cfg.filter_generations)}"
    )


def load_splits(data_cfg, require: tuple[str, ...] = ()) -> dict[str, datasets.Dataset]:
    """The three splits; each split named in ``require`` must be non-empty (checked before any training)."""
    splits = split_dataset(load_sprite_dataset(data_cfg), data_cfg)
    for name in require:
        if len(splits[name]) == 0:
            sizes = ", ".join(f"{n} {len(splits[n])}" for n in SPLIT_NAMES)
            raise ConfigError(
                f"the '{name}' split is empty ({sizes} rows) with {filters_text(data_cfg)} and "
                f"data.split_fractions={list(data_cfg.split_fractions)}: widen the filters or change the fractions"
            )
    return splits


def build_dataloader(
    data_cfg,
    split: str,
    batch_size: int,
    shuffle: bool | None = None,
    drop_last: bool = False,
    dataset: datasets.Dataset | None = None,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """DataLoader over one split; only the train split augments (and shuffles by default)."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {SPLIT_NAMES}, got '{split}'")
    if dataset is None:
        dataset = load_splits(data_cfg)[split]
    if len(dataset) == 0:
        raise ConfigError(f"the '{split}' split is empty")
    train = split == "train"
    sprites = SpriteDataset(dataset, data_cfg, train=train)
    return DataLoader(
        sprites,
        batch_size=batch_size,
        shuffle=train if shuffle is None else shuffle,
        drop_last=drop_last,
        num_workers=data_cfg.num_workers,
        collate_fn=collate_sprites,
        generator=generator,
        persistent_workers=data_cfg.num_workers > 0,
    )
