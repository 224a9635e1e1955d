#!/usr/bin/env python
"""Train pokediff in three stages: 1 = VAE, 2 = U-Net on cached latents, 3 = text alignment.

    accelerate launch train_3stage.py --config configs/default.yaml --stage all
    python train_3stage.py --config configs/tiny.yaml --stage 1 --max-steps 20 stage1.batch_size=4
    python train_3stage.py --resume latest            # continue the run named by the config
    python train_3stage.py --data-stats               # describe the dataset and exit
    python train_3stage.py --config configs/tiny.yaml --dry-run   # check config + data, print the step plan

Any trailing ``key=value`` overrides a config key (``pokediff/config.py`` lists them). A run lands in
``<output_dir>/<experiment_name>/`` with config.yaml, losses.csv, logs/, samples/, checkpoints/, vae/, unet/,
pipeline/ (a ``PokeSpritePipeline`` that ``from_pretrained`` loads).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from pokediff.config import CONFIG_DIR, ConfigError, load_config
from pokediff.errors import CheckpointError, report_user_errors

logger = logging.getLogger("train_3stage")
STAGES = ("1", "2", "3")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", help="YAML config (default: configs/default.yaml on a GPU, configs/cpu.yaml without one)"
    )
    parser.add_argument("--stage", choices=("all",) + STAGES, default="all", help="which stage(s) to run")
    parser.add_argument("--experiment-name", help="run folder name (runtime.experiment_name)")
    parser.add_argument("--output-dir", help="parent of the run folder (runtime.output_dir)")
    parser.add_argument(
        "--resume",
        metavar="latest|PATH",
        help="'latest' continues each stage from its newest checkpoint (a finished stage is only "
        "re-finalised); PATH is one checkpoint folder, whose stage is resumed",
    )
    parser.add_argument("--vae-checkpoint", help="VAE folder for stages 2-3 (default: <run>/vae)")
    parser.add_argument(
        "--diffusion-checkpoint", help="U-Net folder or pipeline folder for stage 3 (default: <run>/unet)"
    )
    parser.add_argument("--data-stats", action="store_true", help="print dataset statistics as JSON and exit")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="load config and data, build the chosen stages' models, print parameter counts and "
        "the step plan, and exit without training or writing anything",
    )
    parser.add_argument("--max-steps", type=int, help="cap every stage at this many optimizer steps (smoke runs)")
    parser.add_argument("--push-to-hub", action="store_true", help="upload <run>/pipeline when training ends")
    parser.add_argument("--hub-model-id", help="hub repository for --push-to-hub, e.g. user/pokediff")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. stage1.epochs=5")
    return parser.parse_args(argv)


def default_config_path(cuda_available: bool | None = None) -> tuple[Path, str | None]:
    """(config to use when --config is not given, a note to print or None).

    The GPU config would run for days on a CPU without a word; without a GPU the CPU config is used, and said.
    """
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if cuda_available:
        return CONFIG_DIR / "default.yaml", None
    return CONFIG_DIR / "cpu.yaml", (
        "no GPU found: training configs/cpu.yaml (64x64 sprites, about 45 minutes on 2 cores) instead of the GPU "
        "config; pass --config configs/default.yaml to train that one anyway"
    )


def build_run_config(args: argparse.Namespace):
    overrides = list(args.overrides)
    for flag, key in (
        ("experiment_name", "runtime.experiment_name"),
        ("output_dir", "runtime.output_dir"),
        ("max_steps", "runtime.max_steps"),
        ("hub_model_id", "hub.hub_model_id"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.push_to_hub:
        overrides.append("hub.push_to_hub=true")
    config_path = args.config
    if config_path is None:
        config_path, note = default_config_path()
        if note:
            logger.warning(note)
    cfg = load_config(config_path, overrides)
    if cfg.hub.push_to_hub and not cfg.hub.hub_model_id:
        raise ConfigError("--push-to-hub needs --hub-model-id (or hub.hub_model_id=...)")
    return cfg


def _stage_of_checkpoint(path: str) -> str:
    from pokediff.training.checkpoints import TRAINING_STATE_NAME, TrainingState

    state_file = Path(path).expanduser() / TRAINING_STATE_NAME
    if not state_file.is_file():
        raise FileNotFoundError(f"--resume {path}: not a checkpoint folder ({TRAINING_STATE_NAME} missing)")
    stage = TrainingState.read(state_file).stage  # "stage1" ...
    return stage.removeprefix("stage")


def _resolve_diffusion(args, run: Path) -> tuple[Path, Path | None]:
    """(unet folder, vae folder implied by a pipeline folder or None)."""
    if args.diffusion_checkpoint is None:
        return run / "unet", None
    path = Path(args.diffusion_checkpoint).expanduser()
    if (path / "model_index.json").is_file():
        return path / "unet", path / "vae"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--diffusion-checkpoint {path}: neither a U-Net folder nor a pipeline folder")
    return path, None


def push_pipeline(cfg, pipeline_dir: Path) -> str:
    """Upload the pipeline folder (with its model card naming the repo) to ``cfg.hub.hub_model_id``."""
    from pokediff.hub import push_pipeline_folder

    push_pipeline_folder(
        pipeline_dir, cfg.hub.hub_model_id, extra={"run": cfg.runtime.experiment_name}, private=cfg.hub.private
    )
    return cfg.hub.hub_model_id


def _final_step(run: Path, stage: int) -> int | None:
    """The optimizer steps of ``stage`` in ``run``: its newest checkpoint's ``global_step`` (None without one)."""
    from pokediff.training.checkpoints import TRAINING_STATE_NAME, TrainingState, list_checkpoints

    found = list_checkpoints(run / "checkpoints" / f"stage{stage}")
    return TrainingState.read(found[-1] / TRAINING_STATE_NAME).global_step if found else None


def _stopped_early(run: Path, stage: int) -> bool:
    """Whether ``stage``'s newest checkpoint is short of its schedule (a time limit stopped it)."""
    from pokediff.training.checkpoints import TRAINING_STATE_NAME, TrainingState, list_checkpoints

    found = list_checkpoints(run / "checkpoints" / f"stage{stage}")
    if not found:
        return False
    state = TrainingState.read(found[-1] / TRAINING_STATE_NAME)
    return state.global_step < state.total_steps


def record_stages_on_card(pipeline_dir: Path, run: Path, ran: list[int]) -> None:
    """Add the earlier stages this command trained to the pipeline's card. Each stage saves the pipeline knowing
    only itself (stage 3 does not know whether stage 1 ran a minute ago or in another run); the command does.
    Stage 3's own record wins (the gate may have taken it back)."""
    from pokediff.hub import update_model_card

    earlier = {stage: _final_step(run, stage) for stage in ran if stage != 3}
    if earlier:
        update_model_card(pipeline_dir, stages=earlier)


def main(argv=None, accelerator=None) -> dict:
    """Run the requested stages; returns {"vae": path, "unet": path, "pipeline": path, ...} of what was made."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one INFO line per file of every checkpoint
    args = parse_args(argv)
    cfg = build_run_config(args)

    if args.data_stats:
        from pokediff.data import print_data_stats
        from pokediff.models.text import load_text_encoder

        tokenizer, _ = load_text_encoder(cfg.text_encoder.name)
        return {"data_stats": print_data_stats(cfg.data, tokenizer)}

    from pokediff.training.setup import build_accelerator, run_dir

    run = run_dir(cfg)
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    resume_for = dict.fromkeys(stages, args.resume)
    if args.resume not in (None, "latest"):
        # an explicit checkpoint belongs to one stage: earlier stages are done, later ones start fresh
        stage = _stage_of_checkpoint(args.resume)
        if stage not in stages:
            raise CheckpointError(
                f"--resume {args.resume} is a stage {stage} checkpoint but --stage {args.stage} was asked"
            )
        stages = stages[stages.index(stage) :]
        resume_for = {s: (args.resume if s == stage else None) for s in stages}

    vae_path = Path(args.vae_checkpoint).expanduser() if args.vae_checkpoint else run / "vae"
    unet_path, pipeline_vae = _resolve_diffusion(args, run)
    if pipeline_vae is not None and args.vae_checkpoint is None:
        vae_path = pipeline_vae

    if args.dry_run:
        from accelerate import PartialState

        from pokediff.training.plan import format_plan, plan_run

        num_processes = accelerator.num_processes if accelerator is not None else PartialState().num_processes
        plan = plan_run(cfg, stages, vae_path, unet_path, num_processes)
        if num_processes == 1 or PartialState().is_main_process:
            print(format_plan(plan))
        return {"plan": plan}

    from pokediff.training.plan import check_data_fits

    # a batch larger than the data, or a split the filters emptied, is refused before any work. The process count
    # comes from the launcher's environment: a PartialState made here, before the Accelerator (runtime.cpu...),
    # would set up the process group differently from it
    processes = accelerator.num_processes if accelerator is not None else int(os.environ.get("WORLD_SIZE", "1"))
    check_data_fits(cfg, stages, processes)
    own_accelerator = accelerator is None
    accelerator = build_accelerator(cfg, accelerator)
    outputs: dict = {}

    if "1" in stages:
        from pokediff.training.stage1_vae import train_stage1

        vae_path = outputs["vae"] = train_stage1(cfg, accelerator, resume=resume_for["1"])
        if len(stages) > 1 and _stopped_early(run, 1):
            logger.warning("stage 1 stopped at stage1.max_minutes: later stages wait for it (--resume latest)")
            stages = ["1"]
    if "2" in stages:
        from pokediff.training.stage2_unet import train_stage2

        unet_path = outputs["unet"] = train_stage2(cfg, vae_path, accelerator, resume=resume_for["2"])
        outputs["pipeline"] = run / "pipeline"
        if "3" in stages and _stopped_early(run, 2):
            logger.warning("stage 2 stopped at stage2.max_minutes: stage 3 waits for it (--resume latest)")
            stages = stages[: stages.index("3")]
    if "3" in stages and cfg.stage3.method == "shape_guidance":
        from pokediff.training.stage3_shape import train_shape_guidance

        # minutes of fitting, no checkpoints: --resume refits
        outputs["pipeline"] = train_shape_guidance(cfg, vae_path, unet_path, accelerator)
    elif "3" in stages:
        from pokediff.training.stage3_reward import train_stage3

        outputs["pipeline"] = train_stage3(cfg, vae_path, unet_path, accelerator, resume=resume_for["3"])
    if "3" in stages:
        if accelerator.is_main_process:
            from pokediff.training.stage3_gate import gate_stage3

            outputs["stage3_gate"] = gate_stage3(cfg, run, accelerator.device)["kept"]
        accelerator.wait_for_everyone()

    if "pipeline" in outputs and accelerator.is_main_process:
        record_stages_on_card(Path(outputs["pipeline"]), run, [int(s) for s in stages])
    if cfg.hub.push_to_hub and accelerator.is_main_process:
        outputs["hub_repo"] = push_pipeline(cfg, Path(outputs.get("pipeline", run / "pipeline")))
    accelerator.wait_for_everyone()
    if own_accelerator:
        accelerator.end_training()
    if accelerator.is_main_process:
        logger.info("done: %s", {k: str(v) for k, v in outputs.items()})
    return outputs


if __name__ == "__main__":
    report_user_errors(main)  # a bad input or a failed write: one "error: ..." line, exit status 2
