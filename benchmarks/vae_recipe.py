#!/usr/bin/env python
"""Stage-1 recipe A/B: train the VAE once per variant (same config, seed, data and steps), score val reconstruction.

    python benchmarks/vae_recipe.py --config configs/cpu.yaml --max-steps 150 --jobs 2 \\
        --variant "old-kl: stage1.kl_weight=0.1 stage1.free_bits=0.5" \\
        --variant "low-kl: stage1.kl_weight=1e-5 stage1.free_bits=0" \\
        --variant "low-kl-perc0.1: stage1.kl_weight=1e-5 stage1.free_bits=0 stage1.perceptual_weight=0.1"

Each variant trains in its own process (``--jobs`` at a time, one thread each: on a 2-core machine two small
runs side by side finish sooner than one after the other). Prints JSON and writes it to ``--output``: per
variant the val L1 / PSNR / perceptual distance of the posterior mode, the training wall time, and the
reconstruction grid's path, so the grids can be compared by eye too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def score(cfg, vae_dir: Path, device) -> dict:
    """Val reconstruction (posterior mode) of the VAE in ``vae_dir``: L1, PSNR, perceptual distance."""
    import torch

    from pokediff.data import build_dataloader, tokenize_captions
    from pokediff.eval.reconstruction import reconstruction_metrics
    from pokediff.models.perceptual import load_perceptual
    from pokediff.models.text import load_text_encoder
    from pokediff.models.vae import SpriteVAE

    vae = SpriteVAE.from_pretrained(vae_dir).to(device).eval()
    loader = build_dataloader(cfg.data, "val", batch_size=16, shuffle=False)
    tokenizer, encoder = load_text_encoder(cfg.text_encoder.name)
    encoder = encoder.to(device).eval()

    @torch.no_grad()
    def encode_text(captions):  # only a VAE with decoder cross-attention reads the text
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


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition(":")
    if not sep or not name.strip():
        raise SystemExit(f"error: --variant must read 'NAME: key=value ...', got {text!r}")
    return name.strip(), overrides.split()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"))
    parser.add_argument("--variant", action="append", required=True, help="'NAME: key=value ...' (repeatable)")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--output-dir", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--output", help="write the JSON here too")
    parser.add_argument(
        "--kid-floor",
        action="store_true",
        help="also score each VAE's reconstructions of the train split by KID (benchmarks/vae_kid_floor.py)",
    )
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    out_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="vae_recipe_"))
    out_dir.mkdir(parents=True, exist_ok=True)

    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    pending, running, wall = list(variants), {}, {}
    while pending or running:
        while pending and len(running) < args.jobs:
            name, overrides = pending.pop(0)
            cmd = [
                sys.executable,
                str(REPO / "train_3stage.py"),
                "--config",
                args.config,
                "--stage",
                "1",
                "--output-dir",
                str(out_dir),
                "--experiment-name",
                name,
                "--max-steps",
                str(args.max_steps),
                "runtime.num_threads=1",
                "runtime.report_to=none",
                *overrides,
            ]
            log = open(out_dir / f"{name}.log", "w")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time())
        time.sleep(2)
        for name, (proc, started) in list(running.items()):
            if proc.poll() is not None:
                if proc.returncode:
                    raise SystemExit(f"error: variant {name} failed (exit {proc.returncode}); see {out_dir / name}.log")
                wall[name] = round(time.time() - started, 1)
                del running[name]

    # imported only now: loading torch and the networks would slow the runs above
    from vae_kid_floor import emit_json, kid_floor

    from pokediff.config import load_config

    results = {}
    for name, overrides in variants:
        cfg = load_config(args.config, overrides)
        metrics = score(cfg, out_dir / name / "vae", "cpu")
        grids = sorted((out_dir / name / "samples").glob("stage1_epoch*.png"))
        results[name] = {
            "overrides": overrides,
            **{k: round(float(v), 4) for k, v in metrics.items()},
            "train_wall_s": wall[name],
            "grid": str(grids[-1]) if grids else None,
        }
    if args.kid_floor:
        floors = kid_floor(load_config(args.config).data, [out_dir / name / "vae" for name, _ in variants])
        for name, _ in variants:
            results[name]["reconstruction_kid_vs_train"] = floors["vaes"][str(out_dir / name / "vae")]["kid"]
    summary = {"config": args.config, "max_steps": args.max_steps, "variants": results}
    return emit_json(summary, args.output)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # vae_kid_floor
    main()
