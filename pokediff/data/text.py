"""Caption tokenisation and caption dropout (for classifier-free guidance)."""

from __future__ import annotations

import logging
import random

from pokediff.config import ConfigError

logger = logging.getLogger(__name__)


def tokenize_captions(tokenizer, captions, max_length: int):
    """Pad/truncate to ``max_length`` tokens; warns (naming how many) when captions are cut."""
    if isinstance(captions, str):
        captions = [captions]
    if max_length < 2:
        raise ConfigError(f"max_text_length must be at least 2 tokens, got {max_length}")
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max < 100_000 and max_length > model_max:
        raise ConfigError(f"max_text_length {max_length} exceeds the tokenizer's limit of {model_max} tokens")
    full = tokenizer(list(captions), padding=False, truncation=False)["input_ids"]
    cut = sum(len(ids) > max_length for ids in full)
    if cut:
        logger.warning("%d of %d captions are longer than %d tokens and were truncated", cut, len(captions), max_length)
    return tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")


def drop_captions(captions, p: float, generator: random.Random | None = None) -> list[str]:
    """Replace each caption by "" with probability ``p`` (the unconditional prompt)."""
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"caption_dropout must be in [0, 1], got {p}")
    rng = generator or random
    return ["" if rng.random() < p else c for c in captions]
