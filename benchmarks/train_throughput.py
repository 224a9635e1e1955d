"""Stage-2 training throughput: our loop vs a stock diffusers-style loop, on the same U-Net and batch.

    python benchmarks/train_throughput.py                 # default config, GPU (bf16 there)
    python benchmarks/train_throughput.py --tiny          # configs/tiny.yaml on CPU, a few steps
    python benchmarks/train_throughput.py --channels-last --fused-adamw --foreach-ema --compile
    python benchmarks/train_throughput.py --tiny --check  # same loss on a fixed batch with each lever on/off
    python benchmarks/train_throughput.py --sync-every 1  # ours through pokediff's OptimizerStepper ...
    python benchmarks/train_throughput.py --sync-every 8  # ... reading to the host every 8 updates only

Ours: latents (posterior mean/std) and text embeddings cached once; each step draws a latent sample, noise and
timesteps, runs the U-Net, Huber (or Min-SNR) loss on the configured target, AdamW, EMA.
Stock (``examples/text_to_image/train_text_to_image.py`` style): every step encodes the pixels with the VAE and
the captions with the text encoder, MSE loss on the noise, AdamW, EMA.

Speed levers, each applied to both loops alike: ``--bf16`` (autocast; default on CUDA), ``--channels-last``,
``--compile`` (``--compile-mode reduce-overhead`` adds CUDA graphs), ``--fused-adamw``, ``--foreach-ema``.
``--sync-every N`` applies to ours only: its step goes through pokediff's ``OptimizerStepper`` (NaN guard,
gradient-explosion detector) with ``runtime.sync_every_steps=N``; without it ours has no guards (as before).
Prints one JSON object: images/s of each loop, the speed-up, FLOPs per image (torch.utils.flop_counter) and the
model FLOP utilisation (MFU) against the device's dense bf16 peak.
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
from dataclasses import asdict, dataclass, replace
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
from pokediff.schedulers import build_noise_scheduler  # noqa: E402
from pokediff.training.guards import GradExplosionDetector, NonFiniteGuard, OptimizerStepper  # noqa: E402
from pokediff.training.metrics import PendingRows  # noqa: E402
from pokediff.training.stage2_unet import diffusion_loss  # noqa: E402

# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s), for MFU; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "RTX 4090": 165.0}
LEVERS = ("bf16", "channels_last", "compile", "fused_adamw", "foreach_ema")


@dataclass(frozen=True)
class Levers:
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode; reduce-overhead = CUDA graphs
    compile_backend: str = "inductor"  # aot_eager: graph capture without code generation (CPU tests)
    fused_adamw: bool = False
    foreach_ema: bool = False
    sync_every: int | None = None  # ours through OptimizerStepper, host reads every N updates (None: no guards)

    def label(self) -> str:
        on = [name for name in LEVERS if getattr(self, name)]
        if self.sync_every is not None:
            on.append(f"sync_every_{self.sync_every}")
        return "+".join(on) or "baseline"


class OneProcess:
    """What ``OptimizerStepper`` asks of an ``Accelerator``, for a plain one-device loop (no accelerate state)."""

    num_processes = 1
    sync_gradients = True

    def __init__(self, device):
        self.device = device

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def unwrap_model(self, model):
        return model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="configs/tiny.yaml, CPU-sized run")
    parser.add_argument("--config", help="config file (default: configs/default.yaml, or tiny.yaml with --tiny)")
    parser.add_argument("--batch-size", type=int, help="default: stage2.batch_size of the config")
    parser.add_argument("--steps", type=int, help="timed steps (default 30 on GPU, 3 with --tiny)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 5 on GPU, 1 with --tiny)")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast in both loops (default: on for CUDA with bf16, off on CPU)",
    )
    parser.add_argument("--channels-last", action="store_true", help="channels_last U-Net in both loops")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net in both loops")
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune"],
        help="torch.compile mode; reduce-overhead replays CUDA graphs (default: %(default)s)",
    )
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default: inductor on CUDA; aot_eager on CPU, which checks the "
        "graph capture without compiling C++)",
    )
    parser.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) in both loops")
    parser.add_argument("--foreach-ema", action="store_true", help="EMAModel(foreach=True) in both loops")
    parser.add_argument(
        "--sync-every",
        type=int,
        metavar="N",
        help="ours through pokediff's OptimizerStepper, reading loss/grad norm/NaN count to the host every N "
        "updates (runtime.sync_every_steps; 1 = every step). Default: ours without the guards",
    )
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (default: from the device name)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="instead of timing: the loss of a fixed batch over max(5, N+1) steps with each lever on/off, and of "
        "ours through the stepper reading to the host every step and every N steps (--sync-every N, default 4)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.sync_every is not None and args.sync_every < 1:
        parser.error(f"--sync-every must be >= 1, got {args.sync_every}")
    return args


def real_captions(n: int) -> list[str]:
    with open(Path(DEFAULT_DATA_DIR) / "metadata.csv", newline="") as f:
        captions = [row["text"] for row in csv.DictReader(f)]
    return [captions[i % len(captions)] for i in range(n)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step_fn, steps: int, warmup: int, device) -> float:
    for i in range(warmup):
        step_fn(i)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step_fn(warmup + i)
    sync(device)
    return time.perf_counter() - start


def flops_of(step_fn) -> int:
    with FlopCounterMode(display=False) as counter:
        step_fn(0)
    return counter.get_total_flops()


def peak_tflops(device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


class Bench:
    """The shared pieces: frozen VAE + text encoder, the initial U-Net, one batch of pixels and captions."""

    def __init__(self, cfg, device, batch: int, seed: int = 0):
        self.cfg, self.device, self.batch = cfg, device, batch
        torch.manual_seed(seed)
        self.vae = build_vae(cfg.vae, cfg.data.resolution).to(device).eval().requires_grad_(False)
        self.tokenizer, text_encoder = load_text_encoder(cfg.text_encoder.name)
        self.text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        self.unet_init = build_unet(
            cfg.unet, cfg.vae.latent_channels, self.vae.latent_size(), text_encoder.config.hidden_size
        )
        self.noise_scheduler = build_noise_scheduler(cfg.scheduler)
        self.pixels = (
            torch.rand(
                batch, 3, cfg.data.resolution, cfg.data.resolution, generator=torch.Generator().manual_seed(seed)
            ).to(device)
            * 2
            - 1
        )
        self.captions = real_captions(batch)
        with torch.no_grad():
            posterior = self.vae.encode(self.pixels).latent_dist
            self.cached_mean, self.cached_std = posterior.mean.float(), posterior.std.float()
            self.cached_emb, self.cached_mask = self.encode_text()
        self.scaling = 1.0 / float(self.cached_mean.std())

    def encode_text(self):
        tokens = tokenize_captions(self.tokenizer, self.captions, self.cfg.data.max_text_length)
        mask = tokens["attention_mask"].to(self.device)
        emb = self.text_encoder(tokens["input_ids"].to(self.device), attention_mask=mask).last_hidden_state
        return emb.float(), mask

    def generator(self, step: int) -> torch.Generator:
        # every loop and lever setting draws the same noise at step k: losses stay comparable
        return torch.Generator(self.device).manual_seed(1_000 + step)

    def ours_loss(self, model, step: int, amp_dtype):
        g, m = self.generator(step), self.cached_mean
        eps = torch.randn(m.shape, generator=g, device=self.device)
        noise = torch.randn(m.shape, generator=g, device=self.device)
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (self.batch,), generator=g, device=self.device
        )
        clamp = self.cfg.stage2.latent_clamp
        latents = ((m + self.cached_std * eps) * self.scaling).clamp(-clamp, clamp)
        with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return diffusion_loss(
                model,
                self.noise_scheduler,
                latents,
                self.cached_emb,
                self.cached_mask,
                self.cfg.stage2.huber_delta,
                self.cfg.stage2.min_snr_gamma,
                noise=noise,
                timesteps=t,
            )

    def stock_loss(self, model, step: int, amp_dtype):
        g = self.generator(step)
        with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            with torch.no_grad():
                latents = self.vae.encode(self.pixels).latent_dist.sample(generator=g).float() * self.scaling
                emb, mask = self.encode_text()
            noise = torch.randn(latents.shape, generator=g, device=self.device)
            t = torch.randint(
                0, self.noise_scheduler.config.num_train_timesteps, (self.batch,), generator=g, device=self.device
            )
            noisy = self.noise_scheduler.add_noise(latents, noise, t)
            pred = model(noisy, t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample
        return F.mse_loss(pred.float(), noise.float())


class TrainLoop:
    """One training loop (ours or stock) on its own copy of the U-Net, with the levers applied."""

    def __init__(self, bench: Bench, kind: str, levers: Levers):
        self.bench, self.kind, self.levers = bench, kind, levers
        device = bench.device
        self.unet = copy.deepcopy(bench.unet_init).to(device).train()
        if levers.channels_last:
            self.unet = self.unet.to(memory_format=torch.channels_last)
        # fused=None keeps torch's default (foreach); fused=False would force the slow per-tensor loop
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-4, fused=True if levers.fused_adamw else None)
        self.ema = EMAModel(self.unet.parameters(), decay=bench.cfg.stage2.ema_decay, foreach=levers.foreach_ema)
        self.ema.to(device)
        self.model = self.unet
        if levers.compile:
            # a mode is an inductor setting; other backends reject it
            mode = {"mode": levers.compile_mode} if levers.compile_backend == "inductor" else {}
            self.model = torch.compile(self.unet, backend=levers.compile_backend, **mode)
        self.amp_dtype = torch.bfloat16 if levers.bf16 else None
        self.loss_fn = bench.ours_loss if kind == "ours" else bench.stock_loss
        self.stepper = None
        if kind == "ours" and levers.sync_every is not None:
            runtime = bench.cfg.runtime
            self.stepper = OptimizerStepper(
                OneProcess(device),
                self.unet,
                self.optimizer,
                torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0),  # the constant lr above
                bench.cfg.stage2.grad_clip,
                NonFiniteGuard(runtime.nan_max_consecutive, stage="benchmark"),
                GradExplosionDetector(runtime.grad_explosion_factor),
                ema=self.ema,
                sync_every=levers.sync_every,
            )
            self.pending = PendingRows()

    def step(self, step: int, model=None) -> torch.Tensor:
        """One optimizer step; returns the loss, detached (no host sync here, except the stepper's own)."""
        loss = self.loss_fn(self.model if model is None else model, step, self.amp_dtype)
        if self.stepper is not None:
            self.pending.add(step, 0, self.stepper.step(loss, step))
            if len(self.pending) >= self.stepper.sync_every:  # the loop's one host read per window
                for k, _, (metrics,) in self.pending.read():
                    self.stepper.settle(k, metrics)
            return loss.detach()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.bench.cfg.stage2.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.unet.parameters())
        return loss.detach()


def lever_check(
    bench: Bench, base: Levers, steps: int = 2, kinds=("ours", "stock"), levers=LEVERS, sync_every=()
) -> dict:
    """Loss of the fixed batch at each of ``steps`` steps, baseline vs each lever flipped on alone.

    Step 0 compares the forward pass, step 1 also the first optimizer/EMA update. Each N of ``sync_every``
    adds, for ours, a run through ``OptimizerStepper`` reading to the host every N updates ("sync_every_N").
    Returns ``{kind: {label: [loss, ...]}}`` with the baseline under "baseline".
    """
    out: dict = {}
    for kind in kinds:
        runs = {}
        syncs = [f"sync_every_{n}" for n in sync_every] if kind == "ours" else []
        for name in ("baseline",) + tuple(levers) + tuple(syncs):
            if name.startswith("sync_every_"):
                setting = replace(base, sync_every=int(name.rsplit("_", 1)[1]))
            else:
                setting = base if name == "baseline" else replace(base, **{name: True})
            loop = TrainLoop(bench, kind, setting)
            runs[name] = [float(loop.step(k)) for k in range(steps)]
        out[kind] = runs
    return out


def measure(bench: Bench, levers: Levers, steps: int, warmup: int, peak: float | None) -> dict:
    """images/s, FLOPs per image and MFU of both loops under ``levers``."""
    result = {}
    for kind in ("ours", "stock"):
        loop = TrainLoop(bench, kind, levers)
        seconds = timed(loop.step, steps, warmup, bench.device)
        # FLOPs counted on the eager U-Net (the counter does not see inside compiled graphs)
        flops = flops_of(lambda k: loop.step(k, model=loop.unet)) // bench.batch
        ips = steps * bench.batch / seconds
        result[kind] = {
            "images_per_s": float(f"{ips:.4g}"),  # 4 significant digits: a slow CPU run can be < 1 img/s
            "train_flops_per_image": flops,
            "achieved_tflops": float(f"{ips * flops / 1e12:.4g}"),
            "mfu": float(f"{ips * flops / (peak * 1e12):.4g}") if peak else None,
        }
    result["speedup"] = round(result["ours"]["images_per_s"] / result["stock"]["images_per_s"], 3)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    text_logger = logging.getLogger("pokediff.data.text")
    previous = text_logger.level
    text_logger.setLevel(logging.ERROR)  # the stock loop re-tokenises every step
    try:
        return _benchmark(args)
    finally:
        text_logger.setLevel(previous)  # the caller's logging (gpu_day's, a test's) as it was


def _benchmark(args) -> dict:
    config = args.config or str(CONFIG_DIR / ("tiny.yaml" if args.tiny else "default.yaml"))
    cfg = load_config(config, args.overrides)
    device = torch.device(args.device)
    if args.tiny and args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.runtime.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.runtime.allow_tf32
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    levers = Levers(
        bf16=bf16_ok if args.bf16 is None else args.bf16,
        channels_last=args.channels_last,
        compile=args.compile,
        compile_mode=args.compile_mode,
        compile_backend=args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager"),
        fused_adamw=args.fused_adamw,
        foreach_ema=args.foreach_ema,
        sync_every=args.sync_every,
    )
    batch = args.batch_size or cfg.stage2.batch_size
    bench = Bench(cfg, device, batch)
    result = {
        "benchmark": "stage2_train_throughput",
        "device": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        ),
        "torch": torch.__version__,
        "config": os.path.relpath(config),
        "batch_size": batch,
        "unet_parameters": sum(p.numel() for p in bench.unet_init.parameters()),
        "levers": asdict(levers),
    }
    if args.check:
        result["benchmark"] = "stage2_lever_check"
        window = args.sync_every or 4
        base = replace(levers, sync_every=None, **dict.fromkeys(LEVERS, False))
        result["fixed_batch_losses"] = lever_check(
            bench, base, steps=max(5, window + 1), sync_every=sorted({1, window})
        )
    else:
        steps = args.steps or (3 if args.tiny else 30)
        warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
        peak = peak_tflops(device, args.peak_tflops)
        result.update({"timed_steps": steps, "warmup_steps": warmup, "peak_bf16_tflops": peak})
        measured = measure(bench, levers, steps, warmup, peak)
        result["ours"], result["stock_diffusers_loop"] = measured["ours"], measured["stock"]
        result["speedup"] = measured["speedup"]
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
