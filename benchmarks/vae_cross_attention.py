"""Does the VAE decoder's cross-attention to the text help? Train stage 1 both ways, score val reconstruction.

    python benchmarks/vae_cross_attention.py                                   # default config (GPU)
    python benchmarks/vae_cross_attention.py --config configs/tiny.yaml stage1.epochs=3   # CPU

Both runs share the config, seed and data; only ``vae.decoder_cross_attention`` differs. Prints JSON:
val L1 / PSNR / perceptual distance (posterior mode, no sampling) for each, and the better one by perceptual
distance.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from pokediff.config import CONFIG_DIR, load_config
from pokediff.data import build_dataloader, tokenize_captions
from pokediff.eval.reconstruction import reconstruction_metrics
from pokediff.models.perceptual import load_perceptual
from pokediff.models.text import load_text_encoder
from pokediff.models.vae import SpriteVAE
from pokediff.training.stage1_vae import train_stage1


def score(cfg, vae_dir: Path, device) -> dict:
    vae = SpriteVAE.from_pretrained(vae_dir).to(device).eval()
    loader = build_dataloader(cfg.data, "val", batch_size=16, shuffle=False)
    tokenizer, encoder = load_text_encoder(cfg.text_encoder.name)
    encoder = encoder.to(device).eval()

    @torch.no_grad()
    def encode_text(captions):
        tokens = tokenize_captions(tokenizer, captions, cfg.data.max_text_length).to(device)
        return encoder(**tokens).last_hidden_state, tokens["attention_mask"]

    with torch.no_grad():
        return reconstruction_metrics(
            vae,
            ((b["pixel_values"], b["text"]) for b in loader),
            load_perceptual(cfg.perceptual).to(device),
            encode_text=encode_text,
            device=device,
            progress=False,
        )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG_DIR / "default.yaml"))
    parser.add_argument("--output-dir", help="keep the two runs here (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.output_dir or tmp)
        results = {}
        for cross in (False, True):
            name = f"decoder_cross_attention_{'on' if cross else 'off'}"
            cfg = load_config(
                args.config,
                list(args.overrides)
                + [
                    f"vae.decoder_cross_attention={cross}",
                    f"runtime.output_dir={out}",
                    f"runtime.experiment_name={name}",
                    "runtime.report_to=none",
                ],
            )
            start = time.perf_counter()
            vae_dir = train_stage1(cfg)
            train_s = time.perf_counter() - start
            device = "cuda" if torch.cuda.is_available() and not cfg.runtime.cpu else "cpu"
            results[name] = {**score(cfg, vae_dir, device), "train_seconds": round(train_s, 1)}
    better = min(results, key=lambda k: results[k]["perceptual"] if "perceptual" in results[k] else results[k]["l1"])
    report = {
        "benchmark": "vae_decoder_cross_attention",
        "config": args.config,
        "overrides": args.overrides,
        "results": results,
        "better_by_perceptual": better,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
