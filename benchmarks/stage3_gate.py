#!/usr/bin/env python
"""Run the stage-3 gate again on a run folder whose stage 3 finished (to re-judge it, e.g. with other settings).

    python benchmarks/stage3_gate.py outputs/cpu            # judges outputs/cpu/unet_stage3 in place
    python benchmarks/stage3_gate.py RUN --set stage3.gate_samples=256   # a shape_guidance run, on 256 captions

It draws ``stage3.gate_samples`` training captions (kept out of stage 3's reward) with stage 2's U-Net and with
stage 3's, scores colour agreement, body-shape balanced accuracy and KID, writes ``<run>/pipeline`` with the U-Net
the rule keeps, and records the verdict in ``stage3_metrics.json`` and the model card
(``pokediff/training/stage3_gate.py``). Prints the verdict as JSON. ``--set`` changes the run's config (the number
of captions, the gate's limits); a shape_guidance run's scale is the one stage 3 recorded in ``stage3_metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder with config.yaml and pipeline/")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override the run's config, e.g. --set stage3.gate_samples=256",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pokediff.config import load_config
    from pokediff.training.stage3_gate import gate_stage3

    for needed in ("config.yaml", "pipeline/model_index.json"):
        if not (args.run / needed).is_file():
            raise SystemExit(f"error: {args.run} has no finished stage 3 (no {needed})")
    started = time.perf_counter()
    try:  # gate_stage3 checks for stage 3's own outputs (a reward or a shape_guidance run)
        verdict = gate_stage3(load_config(args.run / "config.yaml", args.overrides), args.run, args.device)
    except FileNotFoundError as missing:
        raise SystemExit(f"error: {missing}") from None
    verdict["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(verdict, indent=2))
    return verdict


if __name__ == "__main__":
    main()
