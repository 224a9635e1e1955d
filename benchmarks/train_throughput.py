"""Stage-2 training throughput: our loop vs a stock diffusers-style loop, on the same U-Net and batch.

    python benchmarks/train_throughput.py                 # default config, GPU
    python benchmarks/train_throughput.py --tiny          # configs/tiny.yaml on CPU, a few steps
    python benchmarks/train_throughput.py --compile --channels-last

Ours: latents (posterior mean/std) and text embeddings cached once; each step draws a latent sample, noise and
timesteps, runs the U-Net under bf16 autocast (GPU), Huber loss, AdamW, EMA.
Stock (``examples/text_to_image/train_text_to_image.py`` style): every step encodes the pixels with the VAE and
the captions with the text encoder, fp32, MSE loss, AdamW, EMA.
Prints one JSON object: images/s of each loop, the speed-up, and FLOPs per image (torch.utils.flop_counter).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pokediff.config import CONFIG_DIR, DEFAULT_DATA_DIR, load_config  # noqa: E402
from pokediff.data import tokenize_captions  # noqa: E402
from pokediff.models.text import load_text_encoder  # noqa: E402
from pokediff.models.unet import build_unet  # noqa: E402
from pokediff.models.vae import build_vae  # noqa: E402
from pokediff.pipeline import build_noise_scheduler  # noqa: E402
from pokediff.training.stage2_unet import diffusion_loss  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="configs/tiny.yaml, CPU-sized run")
    parser.add_argument("--config", help="config file (default: configs/default.yaml, or tiny.yaml with --tiny)")
    parser.add_argument("--batch-size", type=int, help="default: stage2.batch_size of the config")
    parser.add_argument("--steps", type=int, help="timed steps (default 30 on GPU, 3 with --tiny)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 5 on GPU, 1 with --tiny)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net in our loop")
    parser.add_argument("--channels-last", action="store_true", help="channels_last U-Net in our loop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


def real_captions(n: int) -> list[str]:
    with open(Path(DEFAULT_DATA_DIR) / "metadata.csv", newline="") as f:
        captions = [row["text"] for row in csv.DictReader(f)]
    return [captions[i % len(captions)] for i in range(n)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step_fn, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step_fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    sync(device)
    return time.perf_counter() - start


def flops_of(step_fn) -> int:
    with FlopCounterMode(display=False) as counter:
        step_fn()
    return counter.get_total_flops()


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.getLogger("pokediff.data.text").setLevel(logging.ERROR)  # the stock loop re-tokenises every step
    config = args.config or str(CONFIG_DIR / ("tiny.yaml" if args.tiny else "default.yaml"))
    cfg = load_config(config, args.overrides)
    device = torch.device(args.device)
    if args.tiny and args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.runtime.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.runtime.allow_tf32
    batch = args.batch_size or cfg.stage2.batch_size
    steps = args.steps or (3 if args.tiny else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    amp_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None

    torch.manual_seed(0)
    vae = build_vae(cfg.vae, cfg.data.resolution).to(device).eval().requires_grad_(False)
    tokenizer, text_encoder = load_text_encoder(cfg.text_encoder.name)
    text_encoder = text_encoder.to(device).eval().requires_grad_(False)
    latent_size = vae.latent_size()
    unet_init = build_unet(cfg.unet, cfg.vae.latent_channels, latent_size, text_encoder.config.hidden_size)
    noise_scheduler = build_noise_scheduler(cfg.scheduler)
    T = noise_scheduler.config.num_train_timesteps
    pixels = torch.rand(batch, 3, cfg.data.resolution, cfg.data.resolution, device=device) * 2 - 1
    captions = real_captions(batch)
    max_len = cfg.data.max_text_length

    # ---------------------------------------------------------------- ours: cached latents + text, bf16
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        cached_mean, cached_std = posterior.mean.float(), posterior.std.float()
        tokens = tokenize_captions(tokenizer, captions, max_len)
        cached_mask = tokens["attention_mask"].to(device)
        cached_emb = text_encoder(tokens["input_ids"].to(device), attention_mask=cached_mask).last_hidden_state.float()
    scaling = 1.0 / float(cached_mean.std())
    ours_unet = copy.deepcopy(unet_init).to(device).train()
    if args.channels_last:
        ours_unet = ours_unet.to(memory_format=torch.channels_last)
    ours_opt = torch.optim.AdamW(ours_unet.parameters(), lr=1e-4)
    ours_ema = EMAModel(ours_unet.parameters(), decay=cfg.stage2.ema_decay)
    ours_ema.to(device)
    ours_model = torch.compile(ours_unet) if args.compile else ours_unet

    def ours_step(model=None):
        model = ours_model if model is None else model
        latents = ((cached_mean + cached_std * torch.randn_like(cached_mean)) * scaling).clamp(
            -cfg.stage2.latent_clamp, cfg.stage2.latent_clamp)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = diffusion_loss(model, noise_scheduler, latents, cached_emb, cached_mask, cfg.stage2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours_unet.parameters(), cfg.stage2.grad_clip)
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)
        ours_ema.step(ours_unet.parameters())

    # ---------------------------------------------------------------- stock: encode every step, fp32
    stock_unet = copy.deepcopy(unet_init).to(device).train()
    stock_opt = torch.optim.AdamW(stock_unet.parameters(), lr=1e-4)
    stock_ema = EMAModel(stock_unet.parameters(), decay=cfg.stage2.ema_decay)
    stock_ema.to(device)

    def stock_step():
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * scaling
            tok = tokenize_captions(tokenizer, captions, max_len)
            mask = tok["attention_mask"].to(device)
            emb = text_encoder(tok["input_ids"].to(device), attention_mask=mask).last_hidden_state
        noise = torch.randn_like(latents)
        t = torch.randint(0, T, (batch,), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = stock_unet(noisy, t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stock_unet.parameters(), cfg.stage2.grad_clip)
        stock_opt.step()
        stock_opt.zero_grad(set_to_none=True)
        stock_ema.step(stock_unet.parameters())

    ours_s = timed(ours_step, steps, warmup, device)
    stock_s = timed(stock_step, steps, warmup, device)
    # FLOPs counted on the eager U-Net (the counter does not see inside compiled graphs)
    ours_flops = flops_of(lambda: ours_step(ours_unet))
    stock_flops = flops_of(stock_step)

    ours_ips, stock_ips = steps * batch / ours_s, steps * batch / stock_s
    result = {
        "benchmark": "stage2_train_throughput",
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)"),
        "config": os.path.relpath(config),
        "batch_size": batch,
        "timed_steps": steps,
        "unet_parameters": sum(p.numel() for p in unet_init.parameters()),
        "ours": {
            "images_per_s": round(ours_ips, 2),
            "precision": "bf16 autocast" if amp_dtype is not None else "fp32",
            "compile": args.compile,
            "channels_last": args.channels_last,
            "train_flops_per_image": ours_flops // batch,
        },
        "stock_diffusers_loop": {
            "images_per_s": round(stock_ips, 2),
            "precision": "fp32",
            "train_flops_per_image": stock_flops // batch,
        },
        "speedup": round(ours_ips / stock_ips, 3),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
