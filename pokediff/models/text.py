"""Text encoder + tokenizer, resolved offline first: local path -> packaged copy -> hub."""

from __future__ import annotations

import logging
from pathlib import Path

from pokediff.text_reference import PACKAGED_TEXT_ENCODERS, packaged_path

logger = logging.getLogger(__name__)


def resolve_text_encoder_path(name: str) -> str:
    """Where to load ``name`` from: an explicit local folder, a packaged copy, else the hub id itself."""
    if not name or not isinstance(name, str):
        raise ValueError(f"text_encoder.name must be a hub id or a folder, got {name!r}")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text encoder folder {path} has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"text encoder folder not found: {name}")
    return packaged_path(name) or name


def load_text_encoder(name: str):
    """(tokenizer, model) for ``name``; offline, a missing hub model fails fast with a clear message."""
    from huggingface_hub import constants
    from transformers import AutoModel, AutoTokenizer

    source = resolve_text_encoder_path(name)
    local = Path(source).is_dir()
    try:
        # transformers 5.x: build tokenizers from a folder; constructing from a vocab file silently
        # gives a near-empty vocabulary.
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local or constants.HF_HUB_OFFLINE)
        model = AutoModel.from_pretrained(source, local_files_only=local or constants.HF_HUB_OFFLINE)
    except OSError as err:
        if not local and constants.HF_HUB_OFFLINE:
            raise OSError(
                f"text encoder '{name}' is not packaged or cached and HF_HUB_OFFLINE=1; use "
                f"'{next(iter(PACKAGED_TEXT_ENCODERS))}' (ships in a pip package) or a local folder"
            ) from err
        raise
    return tokenizer, model
