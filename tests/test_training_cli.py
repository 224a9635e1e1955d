"""train_3stage.py end to end (tiny, CPU): flags, --data-stats, a --stage all smoke run, plots, 2-process launch."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_training import text_encoder_dir  # noqa: F401  (session fixture shared with test_training.py)
from tiny import tiny_config_overrides

import train_3stage
from pokediff.config import CONFIG_DIR, ConfigError
from pokediff.training import plot_losses
from pokediff.training.metrics import read_losses

REPO_ROOT = Path(__file__).resolve().parent.parent


def tiny_args(data_root, text_encoder_dir, out, perceptual: bool = False, **extra):
    overrides = tiny_config_overrides(data_root, text_encoder_dir, out)
    # no domain-CLIP quality gate: these runs check plumbing, not quality. The perceptual net is off except in
    # the --stage all smoke run, which keeps the user's default (ST-LPIPS offline) on.
    overrides.update(
        {
            "stage2.sample_images_per_prompt": 1,
            "stage2.sample_prompts": ["a red fire type"],
            "clip.min_top1_over_chance": 0.0,
        }
    )
    if not perceptual:
        overrides["stage1.perceptual_weight"] = 0.0
    overrides.update(extra)
    # JSON is valid YAML and keeps strings such as "no" from reading as booleans
    # the GPU config's schema and defaults, shrunk by the overrides (without --config a CPU machine picks cpu.yaml)
    return [
        "--config",
        str(REPO_ROOT / "configs" / "default.yaml"),
        *(f"{k}={json.dumps(v)}" for k, v in overrides.items()),
    ]


def test_flags_become_config_overrides(tmp_path):
    args = train_3stage.parse_args(
        [
            "--experiment-name",
            "exp1",
            "--output-dir",
            str(tmp_path),
            "--max-steps",
            "7",
            "--stage",
            "2",
            "stage2.epochs=3",
            "stage1.batch_size=5",
        ]
    )
    cfg = train_3stage.build_run_config(args)
    assert (cfg.runtime.experiment_name, cfg.runtime.output_dir, cfg.runtime.max_steps) == ("exp1", str(tmp_path), 7)
    assert (cfg.stage2.epochs, cfg.stage1.batch_size) == (3, 5)
    with pytest.raises(ConfigError, match="stage2.epoch'.*did you mean"):
        train_3stage.build_run_config(train_3stage.parse_args(["stage2.epoch=3"]))
    with pytest.raises(ConfigError, match="--hub-model-id"):
        train_3stage.build_run_config(train_3stage.parse_args(["--push-to-hub"]))
    with pytest.raises(SystemExit):
        train_3stage.parse_args(["--stage", "4"])


def test_without_a_gpu_the_cpu_config_is_used_and_said(monkeypatch, caplog):
    assert train_3stage.default_config_path(cuda_available=True) == (CONFIG_DIR / "default.yaml", None)
    path, note = train_3stage.default_config_path(cuda_available=False)
    assert path == CONFIG_DIR / "cpu.yaml" and "no GPU found" in note and "--config configs/default.yaml" in note
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING", logger="train_3stage"):
        cfg = train_3stage.build_run_config(train_3stage.parse_args([]))
    assert cfg.data.resolution == 64 and cfg.runtime.experiment_name == "cpu"
    assert "no GPU found: training configs/cpu.yaml" in caplog.text
    explicit = train_3stage.build_run_config(train_3stage.parse_args(["--config", str(CONFIG_DIR / "default.yaml")]))
    assert explicit.data.resolution == 215


def test_data_stats_prints_json_and_trains_nothing(tiny_data_root, text_encoder_dir, tmp_path, capsys):
    out = train_3stage.main(["--data-stats", *tiny_args(tiny_data_root, text_encoder_dir, tmp_path)])
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == 24 == out["data_stats"]["rows"]
    assert sum(printed["splits"].values()) == 24
    assert not (tmp_path / "pokediff").exists()


def test_a_checkpoint_of_another_stage_is_refused(tmp_path):
    ckpt = tmp_path / "checkpoint-0000002"
    ckpt.mkdir()
    (ckpt / "training_state.json").write_text(json.dumps({"stage": "stage1", "global_step": 2}))
    with pytest.raises(ValueError, match="stage 1 checkpoint.*--stage 2"):
        train_3stage.main(["--stage", "2", "--resume", str(ckpt), f"runtime.output_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        train_3stage.main(["--resume", str(tmp_path), f"runtime.output_dir={tmp_path}"])


def test_stage_all_smoke_run_leaves_a_loadable_pipeline(tiny_data_root, text_encoder_dir, tmp_path):
    from pokediff.pipeline import PokeSpritePipeline

    # the user's default code paths: perceptual loss on (ST-LPIPS offline) in stage 1, then stage 3 fits the
    # offline domain CLIP on ST-LPIPS's trunk, so the perceptual adapter is built twice in one process
    outputs = train_3stage.main(
        [
            "--stage",
            "all",
            "--max-steps",
            "2",
            "--experiment-name",
            "smoke",
            *tiny_args(
                tiny_data_root, text_encoder_dir, tmp_path, perceptual=True, **{"runtime.report_to": "tensorboard"}
            ),
        ]
    )
    run = tmp_path / "smoke"
    assert outputs["vae"] == run / "vae" and outputs["unet"] == run / "unet"
    for name in (
        "config.yaml",
        "losses.csv",
        "vae/config.json",
        "unet/config.json",
        "pipeline/model_index.json",
        "pipeline/README.md",
        "samples/stage1_epoch0001.png",
        "samples/stage2_epoch0001.png",
        "unet_stage3/config.json",
        "domain_clip",
        "stage3_metrics.json",
    ):
        assert (run / name).exists(), name
    # the stage-3 gate judged stage 3's U-Net against stage 2's and said which the pipeline keeps
    assert json.loads((run / "stage3_metrics.json").read_text())["gate"]["kept"] == outputs["stage3_gate"]
    assert outputs["stage3_gate"] in ("stage2", "stage3")
    # the card names every stage this command ran (stage 3 only if the gate kept its U-Net)
    card = (run / "pipeline" / "README.md").read_text()
    assert "Stage 1: ran for these weights, 2 optimizer steps." in card
    assert "Stage 2: ran for these weights, 2 optimizer steps." in card
    assert ("Stage 3: ran for these weights" in card) == (outputs["stage3_gate"] == "stage3")
    perceptual = [
        r["value"]
        for r in read_losses(run / "losses.csv")
        if r["stage"] == "stage1" and r["metric"].endswith("perceptual")
    ]
    assert perceptual and all(v > 0 for v in perceptual), perceptual  # the term was computed, not skipped
    for stage in ("stage1", "stage2"):
        state = json.loads((run / "checkpoints" / stage / "checkpoint-0000002" / "training_state.json").read_text())
        assert state["global_step"] == 2

    pipe = PokeSpritePipeline.from_pretrained(str(outputs["pipeline"]))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red fire type", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    assert image.shape == (1, 3, 215, 215) and torch.isfinite(image).all()
    # stage 1's latent statistics reached the pipeline (per-channel by default: stage1.per_channel_latent_norm)
    stds = pipe.vae.config.latents_std
    assert stds is not None and len(stds) == pipe.vae.config.latent_channels and all(s > 0 for s in stds)

    for stage in ("stage1", "stage2"):  # accelerate's TensorBoard tracker, one folder per stage
        assert list((run / "logs" / stage).glob("events.out.tfevents.*")), stage

    made = plot_losses.main([str(run), "--smooth", "2"])
    assert made["stage1_plot"].is_file() and made["stage2_gif"].is_file()

    # resuming a finished run trains nothing more and keeps the step count
    again = train_3stage.main(
        [
            "--stage",
            "2",
            "--resume",
            "latest",
            "--experiment-name",
            "smoke",
            *tiny_args(tiny_data_root, text_encoder_dir, tmp_path, **{"runtime.max_steps": 2}),
        ]
    )
    assert again["unet"] == run / "unet"
    steps = [
        json.loads(p.read_text())["global_step"]
        for p in (run / "checkpoints" / "stage2").glob("checkpoint-*/training_state.json")
    ]
    assert max(steps) == 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate CLI is not on PATH")
def test_two_process_accelerate_launch(tiny_data_root, text_encoder_dir, tmp_path):
    # 64 px keeps two CPU processes quick; the geometry is covered by the in-process smoke run
    args = tiny_args(tiny_data_root, text_encoder_dir, tmp_path, **{"data.resolution": 64})
    # `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate 1.x routes --cpu to its simple
    # launcher); --multi_gpu starts two via torchrun and, with runtime.cpu=true and no visible GPU, they form a
    # gloo (MULTI_CPU) group.
    cmd = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO_ROOT / "train_3stage.py"),
        "--stage",
        "all",
        "--max-steps",
        "2",
        "--experiment-name",
        "ddp",
        *args,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    run = tmp_path / "ddp"
    assert (run / "pipeline" / "model_index.json").is_file()
    for stage in ("stage1", "stage2"):
        ckpt = run / "checkpoints" / stage / "checkpoint-0000002"
        # one RNG file per rank: two processes really trained
        assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
        assert json.loads((ckpt / "training_state.json").read_text())["global_step"] == 2


def test_push_to_hub_uploads_the_pipeline_folder_with_a_model_card(tmp_path, monkeypatch):
    import huggingface_hub
    from tiny import tiny_pipeline

    folder = tmp_path / "pipeline"
    tiny_pipeline(tmp_path).save_pretrained(folder)
    calls = {}

    class Repo:
        repo_id = "someone/pokediff-test"

    monkeypatch.setattr(
        huggingface_hub,
        "create_repo",
        lambda repo_id, private, exist_ok, **kw: calls.update(create=(repo_id, private)) or Repo(),
    )
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.update(upload=kw))
    cfg = train_3stage.build_run_config(
        train_3stage.parse_args(
            ["--push-to-hub", "--hub-model-id", "someone/pokediff-test", f"runtime.output_dir={tmp_path}"]
        )
    )
    assert train_3stage.push_pipeline(cfg, folder) == "someone/pokediff-test"
    assert calls["create"] == ("someone/pokediff-test", False)
    assert calls["upload"]["repo_id"] == "someone/pokediff-test" and Path(calls["upload"]["folder_path"]) == folder
    assert "someone/pokediff-test" in (folder / "README.md").read_text()
    with pytest.raises(FileNotFoundError, match="pipeline folder not found"):
        train_3stage.push_pipeline(cfg, tmp_path / "nothing")
