#!/usr/bin/env python
"""The CPU quality protocol: score a model trained for the 45-minute CPU budget, and the results table.

    # after `accelerate launch train_3stage.py --stage all --config configs/cpu.yaml` (or a GAN with
    # `python -m pokediff.gan.train --model dcgan --config configs/gan/cpu/dcgan.yaml --max-minutes 45`):
    python benchmarks/cpu_protocol.py score --name diffusion --model outputs/cpu/pipeline --train-minutes 41.2
    python benchmarks/cpu_protocol.py table          # markdown table of benchmarks/results/cpu_*.json

``score`` runs the project's evaluation twice with fixed seeds: against the train split (FID/KID at the
model's resolution, the few-shot protocol) and against the val split (colour and body-shape agreement on val
captions and on free-form prompts, memorisation against the held-out level, diversity). Both results and the training wall
time land in ``benchmarks/results/cpu_<name>.json``; ``table`` prints every such file as one row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# val prompts x 4 samples each for the pairwise diversity; rows scored before 2026-12-05 (session 32) used 4 prompts,
# which moved the figure by ~0.02 between sampling seeds, as much as the differences it was read for
DIVERSITY_PROMPTS = 32


def score(args) -> dict:
    from pokediff.eval.runner import EvalSettings, evaluate, save_grid

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "name": args.name,
        "model": str(args.model),
        "train_minutes": args.train_minutes,
        "machine": args.machine,
        "diversity_prompts": DIVERSITY_PROMPTS,
    }
    for split, num in (("train", args.train_num), ("val", None)):
        settings = EvalSettings(
            split=split,
            num=num,
            seed=0,
            batch_size=args.batch_size,
            memorization=split == "val",
            recon_num=64 if split == "val" else 0,
            diversity_samples=4 if split == "val" else 0,
            diversity_prompts=DIVERSITY_PROMPTS,
            freeform_samples=2 if split == "val" else 0,
        )
        result, grid = evaluate(args.model, settings, device="cpu", progress=not args.quiet)
        out[split] = result
        if len(grid):
            save_grid(grid, RESULTS / f"cpu_{args.name}_{split}.png")
        (RESULTS / f"cpu_{args.name}.json").write_text(json.dumps(out, indent=2))  # each phase as it ends
    if args.update_card:
        from pokediff.hub import card_metrics, update_model_card

        update_model_card(args.model, metrics={**card_metrics(out["train"]), **card_metrics(out["val"])})
    print(json.dumps(row(out), indent=2))
    return out


def _ratio(value, ceiling):
    return None if value is None or not ceiling else value / ceiling


def row(result: dict) -> dict:
    """The table's figures of one ``cpu_<name>.json``."""
    train, val = result["train"]["metrics"], result["val"]["metrics"]
    real = val.get("color_agreement_real")
    return {
        "name": result["name"],
        "kid_train": train["kid_mean"],
        "fid_train": train["fid"],
        "color_val": val.get("color_agreement"),
        "color_val_over_real": _ratio(val.get("color_agreement"), real),
        "color_freeform": val.get("color_agreement_freeform"),
        "color_freeform_over_real": _ratio(val.get("color_agreement_freeform"), real),
        "color_real": real,
        # absent from results scored before the shape judge: None, printed as –
        "shape_val": val.get("shape_agreement"),
        "shape_val_over_real": _ratio(val.get("shape_agreement"), val.get("shape_agreement_real")),
        "shape_freeform": val.get("shape_agreement_freeform"),
        "shape_freeform_over_real": _ratio(val.get("shape_agreement_freeform"), val.get("shape_agreement_real")),
        "shape_real": val.get("shape_agreement_real"),
        "shape_majority": val.get("shape_agreement_majority"),
        "diversity": val.get("diversity"),
        "diversity_real": val.get("diversity_real_dataset"),
        "nn_train_max": val.get("nn_train_similarity_max"),
        "nn_train_real_max": val.get("nn_train_similarity_real_max"),
        "closer_than_real_max": val.get("nn_train_closer_than_real_max"),
        "train_minutes": result.get("train_minutes"),
        "machine": result.get("machine"),
    }


def _fmt(value, digits=3):
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table() -> str:
    rows = [row(json.loads(p.read_text())) for p in sorted(RESULTS.glob("cpu_*.json"))]
    lines = [
        "| model | KID×10³ vs train ↓ | FID vs train ↓ | colour agr. val (÷ real) | colour agr. free-form (÷ real) "
        "| shape agr. val (÷ real; majority) | shape agr. free-form (÷ real) "
        "| diversity (real) | NN-train sim. max (held-out real max) | closer than real | train min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kid = None if r["kid_train"] is None else 1e3 * r["kid_train"]
        lines.append(
            f"| {r['name']} | {_fmt(kid, 1)} | {_fmt(r['fid_train'], 1)} "
            f"| {_fmt(r['color_val'], 2)} ({_fmt(r['color_val_over_real'], 2)}) "
            f"| {_fmt(r['color_freeform'], 2)} ({_fmt(r['color_freeform_over_real'], 2)}) "
            f"| {_fmt(r['shape_val'], 2)} ({_fmt(r['shape_val_over_real'], 2)}; {_fmt(r['shape_majority'], 2)}) "
            f"| {_fmt(r['shape_freeform'], 2)} ({_fmt(r['shape_freeform_over_real'], 2)}) "
            f"| {_fmt(r['diversity'], 3)} ({_fmt(r['diversity_real'], 3)}) "
            f"| {_fmt(r['nn_train_max'], 3)} ({_fmt(r['nn_train_real_max'], 3)}) "
            f"| {_fmt(r['closer_than_real_max'], 2)} | {_fmt(r['train_minutes'], 1)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="evaluate one model on the CPU protocol")
    s.add_argument("--name", required=True, help="row name, e.g. diffusion or wgan_large")
    s.add_argument("--model", required=True, help="pipeline folder or GAN checkpoint/run folder")
    s.add_argument("--train-minutes", type=float, help="training wall time, minutes")
    s.add_argument("--machine", default="2-core CPU (CI-class VM), no GPU")
    s.add_argument("--train-num", type=int, default=725, help="samples for FID/KID vs train (default: the split)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--update-card", action="store_true", help="write both splits' metrics into the pipeline's card")
    sub.add_parser("table", help="print the markdown results table")
    args = parser.parse_args(argv)
    if args.command == "score":
        score(args)
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
