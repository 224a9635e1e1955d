#!/usr/bin/env python
"""Run the stage-3 gate on a finished run folder (one trained before the gate existed, or to re-judge).

    python benchmarks/stage3_gate.py outputs/cpu            # judges outputs/cpu/pipeline in place

It compares the pipeline's text encoder (stage 3's) with the pretrained one on ``stage3.gate_samples`` training
captions that name a colour, puts the pretrained one back when stage 3 does not win, and records the verdict in
``stage3_metrics.json`` and the model card (``pokediff/training/stage3_gate.py``). Prints the verdict as JSON.
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pokediff.config import load_config
    from pokediff.training.stage3_gate import gate_stage3

    for needed in ("config.yaml", "pipeline/model_index.json"):
        if not (args.run / needed).is_file():
            raise SystemExit(f"error: {args.run} is not a finished run folder (no {needed})")
    started = time.perf_counter()
    verdict = gate_stage3(load_config(args.run / "config.yaml"), args.run, args.device)
    verdict["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(verdict, indent=2))
    return verdict


if __name__ == "__main__":
    main()
