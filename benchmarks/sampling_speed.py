"""Sampling throughput of PokeSpritePipeline vs the same U-Net in a plain loop; prints JSON.

    python benchmarks/sampling_speed.py --model outputs/pokediff/pipeline --device cuda
    python benchmarks/sampling_speed.py --random-init --device cpu --num 8 --schedulers dpm
    # the shipped model with pipe.optimize_for_cpu(torch.bfloat16), one sprite at a time
    python benchmarks/sampling_speed.py --model pokediff/pretrained/pokediff-64 --device cpu --num 4 \
        --batch-size 1 --schedulers dpm --repeats 5 --threads 2 --optimize-cpu bfloat16

Per scheduler: images/s of ``pipe(...)`` for ``--num`` sprites (``--steps`` steps, guidance ``--guidance``), and of
a bare loop over the same components (precomputed text embeddings, U-Net + scheduler step + VAE decode, no
input checks or progress bar); plus the latency of one sprite on the CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pokediff.config import load_config  # noqa: E402
from pokediff.models.text import load_text_encoder  # noqa: E402
from pokediff.models.unet import build_unet  # noqa: E402
from pokediff.models.vae import build_vae  # noqa: E402
from pokediff.pipeline import PokeSpritePipeline  # noqa: E402
from pokediff.schedulers import INFERENCE_SCHEDULERS, build_inference_scheduler, make_inference_scheduler  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def random_pipeline(config_path=None) -> PokeSpritePipeline:
    """Default-config components with random VAE/U-Net weights (the text encoder is the configured one)."""
    cfg = load_config(config_path)
    tokenizer, text_encoder = load_text_encoder(cfg.text_encoder.name)
    vae = build_vae(cfg.vae, cfg.data.resolution)
    unet = build_unet(cfg.unet, cfg.vae.latent_channels, vae.latent_size(), text_encoder.config.hidden_size)
    return PokeSpritePipeline(
        vae=vae.eval(),
        unet=unet.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=build_inference_scheduler(cfg.scheduler),
        max_text_length=cfg.data.max_text_length,
        background=cfg.data.background,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompts(n: int) -> list[str]:
    base = [
        "a small green grass type creature",
        "a fiery orange dragon with wings",
        "a round pink fairy",
        "a blue turtle",
    ]
    return [base[i % len(base)] for i in range(n)]


def time_pipeline(pipe, n, steps, guidance, batch_size, device) -> float:
    prompts = _prompts(n)
    _sync(device)
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        chunk = prompts[i : i + batch_size]
        gens = [torch.Generator().manual_seed(i + k) for k in range(len(chunk))]
        # shape guidance off: the plain loop has none, and one of the prompts names a body shape ("with wings")
        pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt",
             shape_guidance_scale=0.0)  # fmt: skip
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def time_plain_loop(pipe, n, steps, guidance, batch_size, device) -> float:
    """The same work without the pipeline: embeddings once, then unet/step/decode per batch."""
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    prompts = _prompts(n)
    _sync(device)
    start = time.perf_counter()
    cond, cond_mask, uncond, uncond_mask = pipe.encode_prompt(prompts, device, 1, True)
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        text = torch.cat([uncond[i : i + b], cond[i : i + b]])
        mask = torch.cat([uncond_mask[i : i + b], cond_mask[i : i + b]])
        shape = (b, unet.config.in_channels, pipe.latent_size, pipe.latent_size)
        latents = torch.randn(shape, device=device)  # float32 whatever the U-Net's dtype, as in the pipeline
        scheduler.set_timesteps(steps, device=device)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents, latents]), t).to(unet.dtype)
            out = unet(x, t, encoder_hidden_states=text, encoder_attention_mask=mask, return_dict=False)[0]
            eps_uncond, eps_cond = out.float().chunk(2)
            latents = scheduler.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, latents).prev_sample
        vae.decode(vae.unscale_latents(latents).to(vae.dtype)).sample.clamp(-1, 1)
    _sync(device)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a saved PokeSpritePipeline folder")
    src.add_argument("--random-init", action="store_true", help="default-config components, random weights")
    p.add_argument("--config", default=None, help="config YAML for --random-init (default: built-in defaults)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--num", type=int, default=64, help="sprites per measurement")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--schedulers", nargs="+", choices=sorted(INFERENCE_SCHEDULERS), default=["dpm", "ddim", "ddpm"])
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement; the fastest counts")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-cpu-latency", action="store_true", help="skip the single-sprite CPU latency")
    p.add_argument("--channels-last", action="store_true", help="U-Net and VAE in channels-last memory format")
    speedup = p.add_mutually_exclusive_group()
    speedup.add_argument(
        "--compile", action="store_true", help="torch.compile the U-Net and the VAE decoder (compile time reported)"
    )
    speedup.add_argument(
        "--optimize-cpu",
        choices=["float32", "bfloat16"],
        help="pipe.optimize_for_cpu(dtype): the U-Net in this dtype, compiled with frozen weights (compile time reported)",
    )
    args = p.parse_args(argv)
    if args.guidance <= 1:
        p.error("--guidance must be > 1: the benchmark measures classifier-free guidance")
    if args.optimize_cpu and (torch.device(args.device).type != "cpu" or args.dtype != "float32"):
        p.error("--optimize-cpu needs --device cpu and --dtype float32 (it sets the U-Net's dtype itself)")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pipe = PokeSpritePipeline.from_pretrained(args.model) if args.model else random_pipeline(args.config)
    pipe.set_progress_bar_config(disable=True)
    base_scheduler_config = pipe.scheduler.config
    pipe.to(device)
    if args.dtype != "float32":
        pipe.to(dtype=DTYPES[args.dtype])
    if args.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    compile_s = None
    if args.compile:
        pipe.unet = torch.compile(pipe.unet)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder)
    elif args.optimize_cpu:
        pipe.optimize_for_cpu(DTYPES[args.optimize_cpu])
    if args.compile or args.optimize_cpu:
        start = time.perf_counter()  # the first calls compile, for batch 1 and batch --batch-size
        time_pipeline(pipe, 1, 2, args.guidance, 1, device)
        time_pipeline(pipe, min(args.num, args.batch_size), 2, args.guidance, args.batch_size, device)
        compile_s = round(time.perf_counter() - start, 1)

    result = {
        "source": args.model or "random-init",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": args.dtype,
        "num_images": args.num,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "unet_params_m": round(sum(q.numel() for q in pipe.unet.parameters()) / 1e6, 2),
        "vae_params_m": round(sum(q.numel() for q in pipe.vae.parameters()) / 1e6, 2),
        "torch_threads": torch.get_num_threads(),
        "channels_last": args.channels_last,
        "compiled": args.compile,
        "optimize_for_cpu": args.optimize_cpu,
        "compile_s": compile_s,
        "repeats": args.repeats,
        "schedulers": {},
    }
    for name in args.schedulers:
        pipe.scheduler = make_inference_scheduler(name, base_scheduler_config)
        warm = min(args.num, args.batch_size, 4)
        time_pipeline(pipe, warm, 2, args.guidance, args.batch_size, device)  # warm-up: kernels, allocator
        time_plain_loop(pipe, warm, 2, args.guidance, args.batch_size, device)
        t_pipe, t_loop = float("inf"), float("inf")
        for _ in range(args.repeats):  # alternate so drift in machine load hits both alike
            t_pipe = min(t_pipe, time_pipeline(pipe, args.num, args.steps, args.guidance, args.batch_size, device))
            t_loop = min(t_loop, time_plain_loop(pipe, args.num, args.steps, args.guidance, args.batch_size, device))
        result["schedulers"][name] = {
            "pipeline_images_per_s": round(args.num / t_pipe, 3),
            "plain_loop_images_per_s": round(args.num / t_loop, 3),
            "pipeline_overhead_pct": round(100 * (t_pipe - t_loop) / t_loop, 1),
        }

    if not args.no_cpu_latency:
        pipe.to("cpu")
        if args.dtype != "float32":
            pipe.to(dtype=torch.float32)
        pipe.scheduler = make_inference_scheduler(args.schedulers[0], base_scheduler_config)
        time_pipeline(pipe, 1, 2, args.guidance, 1, torch.device("cpu"))
        result["cpu_single_sprite_latency_s"] = round(
            min(time_pipeline(pipe, 1, args.steps, args.guidance, 1, torch.device("cpu")) for _ in range(args.repeats)),
            3,
        )
        result["cpu_latency_scheduler"] = args.schedulers[0]
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
