"""GPU day: one command turns a short GPU lease into a trained model, packed samples and speed figures.

    source .devkit/setup.sh && python benchmarks/gpu_day.py --out $OUT/gpu_day        # on the GPU machine
    python benchmarks/gpu_day.py --out /tmp/gpu_day_dry --dry-run                       # the same path on a CPU

Phases, in order of value; each one writes its results into ``<out>/summary.json`` as soon as it ends, and the
log (``<out>/log.txt``) has a timestamp on every line, so a run cut short still says what it did:

1. ``train``: the three stages of ``--config`` (default ``configs/gpu_quick.yaml``), in-process, with the wall
   time and optimizer steps of each; ``losses.csv`` is copied to ``<out>``.
2. ``samples``: ``--train-samples`` sprites from training captions, ``--per-caption`` per val caption and per
   free-form prompt (``pokediff.eval.prompts.FREEFORM_PROMPTS``), seeded, at 215 px, packed into at most two
   ``samples-K.tar`` of <= 16 MiB (WebP, lossless when it fits) with a manifest (file, prompt, seed, target colour,
   source, row); sample grids ``grid_val.png`` / ``grid_freeform.png``. Score them on a CPU with
   ``python -m pokediff.eval --samples <out> --split train|val`` (``--sources freeform`` for the free-form ones).
3. ``sampling_speed``: ``benchmarks/sampling_speed.py`` on the trained pipeline (64 sprites, 25 steps, CFG),
   fp32 and bf16.
4. ``train_throughput``: ``benchmarks/train_throughput.py``, our stage-2 loop vs a stock diffusers loop on the same
   U-Net, bf16, img/s and MFU: once plain, once with channels-last + fused AdamW + foreach EMA, and with
   ``torch.compile`` when the time budget still allows it.

A phase whose estimated cost no longer fits ``--budget-s`` (counted from the start) is skipped, and says so.
Training itself is capped too: each stage's loop gets ``stageN.max_minutes`` from its share of the budget
(``TRAIN_BUDGET_SHARE``; an explicit ``stageN.max_minutes=`` override wins), so a GPU slower than the config's
estimate still leaves time for samples (the first H200 run, 2026-12-04, spent the whole 570 s lease in stage 2).
``--dry-run`` runs everything on the CPU with ``configs/tiny.yaml``, 2 optimizer steps per stage and a handful of
samples: the whole GPU path, exercised before a GPU is ever lent. At most 7 files land in ``--out`` (the device
returns 8); the training run itself lives in ``--work-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from pokediff.fileio import write_text_atomic  # noqa: E402

logger = logging.getLogger("gpu_day")

# Seconds each optional phase needs at least on an H200 (estimates; a phase is skipped when fewer are left).
PHASE_MIN_SECONDS = {"samples": 90, "sampling_speed": 45, "train_throughput": 60, "train_throughput_compile": 150}
# Share of --budget-s each stage's training loop may take (loading, caching, saving and the gate come on top).
TRAIN_BUDGET_SHARE = {"stage1": 0.25, "stage2": 0.35, "stage3": 0.1}
SEED_BASE = {"train": 0, "val": 100_000, "freeform": 200_000}  # seed of sample i of a source: base + i


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder (the device's $OUT/...); at most 7 files")
    p.add_argument(
        "--config",
        default=None,
        help="training config (default: configs/gpu_quick.yaml; configs/tiny.yaml with --dry-run)",
    )
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny config, 2 steps per stage, tiny counts")
    p.add_argument("--work-dir", default=None, help="training run folder (default: a temporary folder)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-clock budget of the whole command; optional phases that no longer fit are skipped "
        "(default: 510 s, i.e. 8.5 min; none with --dry-run)",
    )
    p.add_argument("--device", default=None, help="default: cuda when available (cpu with --dry-run)")
    p.add_argument("--train-samples", type=int, default=None, help="samples from training captions (1000; dry 4)")
    p.add_argument("--val-captions", type=int, default=None, help="val captions sampled (default all; dry 2)")
    p.add_argument("--freeform-prompts", type=int, default=None, help="free-form prompts used (default all; dry 2)")
    p.add_argument("--per-caption", type=int, default=2, help="samples per val caption and per free-form prompt")
    p.add_argument("--steps", type=int, default=None, help="inference steps for the samples (25; dry 2)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's)")
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["samples", "sampling_speed", "train_throughput"],
        help="phases to leave out",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    args = p.parse_args(argv)
    dry = args.dry_run
    args.config = args.config or str(REPO / "configs" / ("tiny.yaml" if dry else "gpu_quick.yaml"))
    args.device = args.device or ("cpu" if dry or not torch.cuda.is_available() else "cuda")
    args.budget_s = args.budget_s if args.budget_s is not None else (None if dry else 510.0)
    defaults = {"train_samples": (4, 1000), "val_captions": (2, None), "freeform_prompts": (2, None), "steps": (2, 25)}
    for name, (dry_value, real_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, dry_value if dry else real_value)
    if dry:
        args.overrides = [
            "runtime.max_steps=2",
            "stage1.batch_size=4",
            "stage2.batch_size=4",
            "stage3.batch_size=2",
            "stage3.eval_num_prompts=2",
            "clip.domain_epochs=2",
            "stage2.sample_images_per_prompt=1",
            "clip.min_top1_over_chance=0",  # a 2-epoch domain CLIP checks plumbing, not quality
            *args.overrides,
        ]
    if args.budget_s is not None:
        given = {o.split("=")[0] for o in args.overrides}
        caps = [
            f"{stage}.max_minutes={share * args.budget_s / 60:.2f}"
            for stage, share in TRAIN_BUDGET_SHARE.items()
            if f"{stage}.max_minutes" not in given
        ]
        args.overrides = [*caps, *args.overrides]
    for name in ("train_samples", "per_caption", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


class Run:
    """The results folder: timestamped log, summary.json rewritten (atomically) after every phase."""

    def __init__(self, args):
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.budget = args.budget_s
        self.log_file = open(self.out / "log.txt", "a", buffering=1)
        self.summary = {
            "benchmark": "gpu_day",
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dry_run": args.dry_run,
            "config": os.path.relpath(args.config, REPO),
            "overrides": args.overrides,
            "device": (
                torch.cuda.get_device_name()
                if args.device.startswith("cuda")
                else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
            ),
            "versions": _versions(),
            "budget_s": self.budget,
            "phases": {},
        }
        self.write()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def log(self, message: str) -> None:
        line = f"[{datetime.now(timezone.utc):%H:%M:%S} +{self.elapsed():6.1f}s] {message}"
        print(line, flush=True)
        self.log_file.write(line + "\n")

    def fits(self, phase: str) -> bool:
        if self.budget is None:
            return True
        left = self.budget - self.elapsed()
        if left >= PHASE_MIN_SECONDS[phase]:
            return True
        self.record(
            phase,
            {
                "status": "skipped",
                "reason": f"{left:.0f} s left of the {self.budget:.0f} s budget, it needs "
                f"~{PHASE_MIN_SECONDS[phase]} s",
            },
        )
        self.log(f"{phase}: skipped ({left:.0f} s left)")
        return False

    def record(self, phase: str, result: dict) -> None:
        self.summary["phases"][phase] = result
        self.write()

    def write(self) -> None:
        self.summary["elapsed_s"] = round(self.elapsed(), 1)
        self.summary["files"] = sorted(p.name for p in self.out.iterdir() if p.is_file() and not p.name.startswith("."))
        write_text_atomic(self.out / "summary.json", json.dumps(self.summary, indent=2))

    def phase(self, name: str, fn, *fn_args):
        """Run one phase: timed, logged, its result (or its error) recorded at once."""
        self.log(f"{name}: start")
        start = time.perf_counter()
        try:
            result = fn(self, *fn_args)
            status = "done"
        except Exception as err:  # a failed phase must not cost the phases after it
            self.log(f"{name}: FAILED: {type(err).__name__}: {err}")
            result, status = (
                {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=8)},
                "failed",
            )
        result = {"status": status, "seconds": round(time.perf_counter() - start, 1), **(result or {})}
        self.record(name, result)
        self.log(f"{name}: {status} in {result['seconds']} s")
        return result


def _versions() -> dict:
    import diffusers
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


# ------------------------------------------------------------------------------------------------ phases
def train_phase(run: Run, args, work: Path) -> dict:
    import train_3stage
    from pokediff.training.metrics import read_losses
    from pokediff.training.setup import build_accelerator, run_dir
    from pokediff.training.stage1_vae import train_stage1
    from pokediff.training.stage2_unet import train_stage2
    from pokediff.training.stage3_reward import train_stage3

    targs = train_3stage.parse_args(
        ["--config", args.config, "--output-dir", str(work), "--experiment-name", "gpu_day", *args.overrides]
    )
    cfg = train_3stage.build_run_config(targs)
    if args.device == "cpu":
        cfg.runtime.cpu = True
    accelerator = build_accelerator(cfg)
    result = {"run_dir": str(run_dir(cfg)), "mixed_precision": accelerator.mixed_precision}
    stages = (
        ("stage1", lambda: train_stage1(cfg, accelerator)),
        ("stage2", lambda: train_stage2(cfg, result["vae"], accelerator)),
        ("stage3", lambda: train_stage3(cfg, result["vae"], result["unet"], accelerator)),
    )
    for (name, fn), key in zip(stages, ("vae", "unet", "pipeline")):
        run.log(f"train: {name} start")
        start = time.perf_counter()
        result[key] = str(fn())
        result[f"{name}_s"] = round(time.perf_counter() - start, 1)
        run.log(f"train: {name} done in {result[f'{name}_s']} s")
        run.record("train", {"status": "running", **result})
    accelerator.end_training()
    result["total_s"] = round(sum(result[f"stage{k}_s"] for k in (1, 2, 3)), 1)
    losses = run_dir(cfg) / "losses.csv"
    if losses.is_file():
        shutil.copy(losses, run.out / "losses.csv")
        steps: dict = {}
        for row in read_losses(losses):
            steps[row["stage"]] = max(steps.get(row["stage"], 0), int(row["step"]))
        result["optimizer_steps"] = steps
    result["config_resolved"] = {
        "stage1": dataclasses.asdict(cfg.stage1),
        "stage2": dataclasses.asdict(cfg.stage2),
        "stage3": dataclasses.asdict(cfg.stage3),
        "scheduler": dataclasses.asdict(cfg.scheduler),
    }
    run.data_cfg = cfg.data
    return result


def sample_plan(data_cfg, args) -> list[dict]:
    """Every sample to make: prompt, seed, target colour, source and split row, in a fixed order."""
    from pokediff.data import load_splits
    from pokediff.eval.color import target_color
    from pokediff.eval.prompts import FREEFORM_PROMPTS
    from pokediff.eval.runner import _rows_for

    splits = load_splits(data_cfg)
    plan = []

    def split_rows(split):
        records = splits[split].remove_columns(data_cfg.image_column)
        return [str(c) for c in records[data_cfg.caption_column]], records.to_list()

    captions, rows = split_rows("train")
    for row in _rows_for(splits["train"], args.train_samples, seed=0):
        plan.append(
            {
                "prompt": captions[row],
                "target_color": target_color(rows[row], captions[row]),
                "source": "train",
                "row": row,
            }
        )
    captions, rows = split_rows("val")
    for row in range(min(args.val_captions or len(captions), len(captions))):
        plan += [
            {
                "prompt": captions[row],
                "target_color": target_color(rows[row], captions[row]),
                "source": "val",
                "row": row,
            }
            for _ in range(args.per_caption)
        ]
    for prompt, color in FREEFORM_PROMPTS[: args.freeform_prompts or len(FREEFORM_PROMPTS)]:
        plan += [
            {"prompt": prompt, "target_color": color, "source": "freeform", "row": None}
            for _ in range(args.per_caption)
        ]
    counters: dict = {}
    for item in plan:
        index = counters[item["source"]] = counters.get(item["source"], -1) + 1
        item["seed"] = SEED_BASE[item["source"]] + index
        item["file"] = f"{item['source']}_{index:04d}.webp"
    return plan


def samples_phase(run: Run, args, pipeline_dir: Path) -> dict:
    from pokediff.eval.runner import save_grid
    from pokediff.eval.samples import SampleRecord, pack_samples, to_uint8
    from pokediff.eval.sampling import DiffusionSampler

    plan = sample_plan(run.data_cfg, args)
    sampler = DiffusionSampler(pipeline_dir, args.device, args.steps, args.guidance)
    images, start = [], time.perf_counter()
    batch_size = 128 if args.device.startswith("cuda") else 4
    for source in ("train", "val", "freeform"):
        items = [item for item in plan if item["source"] == source]
        if not items:
            continue
        # image k of a call uses seed `seed + k`: the plan's seeds are base + index, so one call per source
        for batch in sampler.sample(
            [item["prompt"] for item in items], seed=items[0]["seed"], batch_size=batch_size, progress=False
        ):
            images.extend(batch)
        run.log(f"samples: {source} done ({len(items)} images, {time.perf_counter() - start:.1f} s so far)")
    generate_s = time.perf_counter() - start
    by_source = {s: [im for im, item in zip(images, plan) if item["source"] == s] for s in ("val", "freeform")}
    grids = {}
    for source, source_images in by_source.items():
        if source_images:
            # per-caption samples side by side: each row holds 8 images, i.e. 4 prompts x 2
            grid = save_grid(torch.stack(source_images[:64]), run.out / f"grid_{source}.png", nrow=8)
            grids[source] = grid.name
    run_info = {
        "data": _portable_data_config(run.data_cfg),
        "generated_by": {"pipeline": str(pipeline_dir), "config": run.summary["config"], **sampler.describe()},
    }
    records = [
        SampleRecord(
            file=i["file"],
            prompt=i["prompt"],
            seed=i["seed"],
            target_color=i["target_color"],
            source=i["source"],
            row=i["row"],
        )
        for i in plan
    ]
    packed = pack_samples([to_uint8(im) for im in images], records, run.out, run_info=run_info)
    return {
        "num_images": len(images),
        "by_source": {s: sum(i["source"] == s for i in plan) for s in ("train", "val", "freeform")},
        "steps": args.steps,
        "generate_s": round(generate_s, 1),
        "images_per_s": round(len(images) / generate_s, 2),
        "grids": grids,
        **packed,
    }


def _portable_data_config(data_cfg) -> dict:
    """The data settings the manifest rows refer to, with a repo-relative root (it is scored on another machine)."""
    data = dataclasses.asdict(data_cfg)
    root = Path(data["root"]).expanduser()
    if root.is_absolute() and root.resolve().is_relative_to(REPO):
        data["root"] = str(root.resolve().relative_to(REPO))
    return data


def sampling_speed_phase(run: Run, args, pipeline_dir: Path) -> dict:
    import sampling_speed

    dry = args.dry_run
    base = [
        "--model",
        str(pipeline_dir),
        "--device",
        args.device,
        "--num",
        "4" if dry else "64",
        "--batch-size",
        "4" if dry else "64",
        "--steps",
        "2" if dry else "25",
        "--schedulers",
        "dpm",
        "--repeats",
        "1" if dry else "3",
        "--no-cpu-latency",
    ]
    out = {"float32": sampling_speed.main(base + ["--dtype", "float32"])}
    run.record("sampling_speed", {"status": "running", **out})
    if args.device.startswith("cuda"):
        out["bfloat16"] = sampling_speed.main(base + ["--dtype", "bfloat16"])
    return out


def throughput_phase(run: Run, args) -> dict:
    import train_throughput

    dry = args.dry_run
    common = ["--config", args.config, "--device", args.device]
    common += ["--batch-size", "2", "--steps", "1", "--warmup", "0"] if dry else ["--steps", "20", "--warmup", "5"]
    # the model-shape overrides (a test's tiny U-Net) apply here too; the training-only ones do not matter
    shapes = [o for o in args.overrides if o.split("=")[0].split(".")[0] in ("unet", "vae", "text_encoder", "data")]
    levers = ["--channels-last", "--fused-adamw", "--foreach-ema"]
    out = {"plain": train_throughput.main(common + shapes)}
    run.record("train_throughput", {"status": "running", **out})
    out["levers"] = train_throughput.main(common + levers + shapes)
    run.record("train_throughput", {"status": "running", **out})
    if not dry and run.fits("train_throughput_compile"):
        out["levers_compile"] = train_throughput.main(common + levers + ["--compile"] + shapes)
    return out


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run = Run(args)
    run.log(
        f"gpu_day: config {run.summary['config']}, device {run.summary['device']}, out {run.out}, "
        f"budget {args.budget_s} s"
    )
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_day_"))
    train = run.phase("train", train_phase, args, work)
    pipeline_dir = Path(train.get("pipeline", "")) if train["status"] == "done" else None
    for name, fn in (("samples", samples_phase), ("sampling_speed", sampling_speed_phase)):
        if name in args.skip:
            run.record(name, {"status": "skipped", "reason": "--skip"})
        elif pipeline_dir is None:
            run.record(name, {"status": "skipped", "reason": "training did not finish"})
        elif run.fits(name):
            run.phase(name, fn, args, pipeline_dir)
    if "train_throughput" in args.skip:
        run.record("train_throughput", {"status": "skipped", "reason": "--skip"})
    elif run.fits("train_throughput"):
        run.phase("train_throughput", throughput_phase, args)
    run.summary["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run.write()
    run.log(f"gpu_day: finished in {run.elapsed():.1f} s; files in {run.out}: {', '.join(run.summary['files'])}")
    run.log_file.close()
    return run.summary


if __name__ == "__main__":
    main()
