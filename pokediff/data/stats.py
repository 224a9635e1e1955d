"""`train_3stage.py --data-stats`: a summary of the configured dataset."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from .dataset import load_sprite_dataset, open_image, split_dataset


def data_stats(data_cfg, tokenizer=None) -> dict:
    ds, problems = load_sprite_dataset(data_cfg, return_problems=True)
    splits = split_dataset(ds, data_cfg)
    sizes = Counter(open_image(e).size for e in ds[data_cfg.image_column])
    modes = Counter(open_image(e).mode for e in ds[data_cfg.image_column])
    stats = {
        "rows": len(ds),
        "skipped_bad_rows": len(problems),
        "splits": {name: len(split) for name, split in splits.items()},
        "image_sizes": {f"{w}x{h}": n for (w, h), n in sizes.most_common()},
        "image_modes": dict(modes),
    }
    captions = [str(c) for c in ds[data_cfg.caption_column]]
    if tokenizer is not None:
        lengths = np.array([len(ids) for ids in tokenizer(captions)["input_ids"]])
        stats["caption_tokens"] = {
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "p95": float(np.percentile(lengths, 95)),
            "max": int(lengths.max()),
            "max_text_length": data_cfg.max_text_length,
            "truncated": int((lengths > data_cfg.max_text_length).sum()),
        }
    words = np.array([len(c.split()) for c in captions])
    stats["caption_words"] = {"min": int(words.min()), "median": float(np.median(words)), "max": int(words.max())}
    if "types" in ds.column_names:
        stats["types"] = dict(Counter(t for row in ds["types"] for t in (row or "").split("|") if t).most_common())
    if "color" in ds.column_names:
        stats["colors"] = dict(Counter(ds["color"]).most_common())
    if "generation" in ds.column_names:
        stats["generations"] = dict(sorted(Counter(ds["generation"]).items()))
    return stats


def print_data_stats(data_cfg, tokenizer=None) -> dict:
    stats = data_stats(data_cfg, tokenizer)
    print(json.dumps(stats, indent=2))
    return stats
