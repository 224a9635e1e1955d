"""Saved artefacts a user can trust and share: file modes, pipeline folders that hold only the pipeline, cards
with measured metrics and no local paths, resume as the main path (time limits, warm starts, kill -9), and data
checks before any work. Tiny components, CPU."""

import csv
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from test_bad_inputs import checkpoints, cli_error, stage1_run, train_argv  # noqa: F401  (module fixture)
from test_gan_training import tiny_trainer
from test_training import text_encoder_dir  # noqa: F401  (session fixture)
from tiny import TINY_MAX_TEXT_LENGTH, tiny_pipeline, tiny_scheduler, tiny_unet, tiny_vae

import train_3stage
from pokediff.config import ConfigError
from pokediff.errors import CheckpointError
from pokediff.fileio import write_text_atomic
from pokediff.gan.checkpoint import resolve_checkpoint
from pokediff.hub import card_metrics, write_model_card
from pokediff.pipeline import PokeSpritePipeline
from pokediff.training.stage2_unet import warm_start

REPO_ROOT = Path(__file__).resolve().parent.parent
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def mode(path) -> int:
    return Path(path).stat().st_mode & 0o777


@pytest.fixture
def umask():
    """Set a umask for the test, restore the old one after."""
    old = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(old)


def draw(pipe, seed=0):
    return pipe(
        "a green creature", num_inference_steps=3, generator=torch.Generator().manual_seed(seed), output_type="pt"
    ).images


# ------------------------------------------------------------------------------------------ modes
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_weights_get_the_modes_of_new_files(tmp_path, umask, mask):
    umask(mask)
    out = tmp_path / "pipe"
    tiny_pipeline(tmp_path).save_pretrained(out)
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    # safetensors writes through a 0600 temporary file; the saved file reads like its sibling JSON
    assert mode(weights) == mode(out / "model_index.json") == 0o666 & ~mask
    assert mode(out / "unet") == mode(out) == 0o777 & ~mask
    gan = tiny_trainer("dcgan").save(tmp_path / "gan" / "step_0000001")
    assert mode(gan / "generator.safetensors") == mode(gan / "gan_checkpoint.json") == 0o666 & ~mask
    assert mode(gan) == 0o777 & ~mask


def test_an_overwritten_file_keeps_its_own_mode(tmp_path, umask):
    path = tmp_path / "result.json"
    write_text_atomic(path, "{}")
    assert mode(path) == 0o644
    path.chmod(0o600)
    write_text_atomic(path, '{"a": 1}')
    assert mode(path) == 0o600 and path.read_text() == '{"a": 1}'


# ------------------------------------------------------------------------------------------ folders
def by_name_pipeline():
    pipe = PokeSpritePipeline(
        vae=tiny_vae(),
        unet=tiny_unet(384),  # MiniLM's width
        scheduler=tiny_scheduler(),
        max_text_length=TINY_MAX_TEXT_LENGTH,
        text_encoder_name=MINILM,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_an_unchanged_public_text_encoder_is_saved_by_name(tmp_path):
    pipe = by_name_pipeline()
    out = tmp_path / "pipe"
    # a folder that held a full copy before: the stale copy goes, it would contradict the index
    pipe.text_encoder.save_pretrained(out / "text_encoder")
    pipe.save_pretrained(out)
    assert not (out / "text_encoder").exists() and not (out / "tokenizer").exists()
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["text_encoder_name"] == MINILM
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert size < 5e6, size  # the 87 MB encoder is not in it

    expected = draw(pipe)
    loaded = PokeSpritePipeline.from_pretrained(out)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(draw(loaded), expected)
    from diffusers import DiffusionPipeline

    remote = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)  # the folder's own code, by name too
    remote.set_progress_bar_config(disable=True)
    assert type(remote).__module__ != PokeSpritePipeline.__module__
    assert torch.equal(draw(remote), expected)


def test_a_changed_text_encoder_is_saved_in_full(tmp_path, caplog):
    pipe = by_name_pipeline()
    with torch.no_grad():
        pipe.text_encoder.embeddings.word_embeddings.weight[:] += 0.01
    with caplog.at_level(logging.WARNING):
        pipe.save_pretrained(tmp_path / "pipe")
    assert any("changed since it was loaded" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "pipe" / "text_encoder" / "model.safetensors").is_file()
    loaded = PokeSpritePipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(draw(loaded), draw(pipe))


# ------------------------------------------------------------------------------------------ cards
def test_cards_carry_metrics_as_model_index_and_no_local_path(tmp_path):
    out = tmp_path / "pipe"
    tiny_pipeline(tmp_path).save_pretrained(out)
    metrics = card_metrics({"split": "train", "metrics": {"kid_mean": 0.07, "fid": 80.5, "clip_score": None}})
    assert metrics == {"kid_mean_train": 0.07, "fid_train": 80.5}
    local = tmp_path / "run" / "domain_clip"
    write_model_card(out, stages={2: 5}, metrics=metrics, extra={"stage 3 CLIP": f"domain_clip:{local}"})
    text = (out / "README.md").read_text()
    assert str(tmp_path) not in text and "domain_clip:domain_clip" in text
    results = ModelCard.load(out / "README.md").data.to_dict()["model-index"][0]["results"]
    got = {(r["dataset"]["split"], m["type"]): m["value"] for r in results for m in r["metrics"]}
    assert got == {("train", "kid_mean"): 0.07, ("train", "fid"): 80.5}


# ------------------------------------------------------------------------------------------ resume
def test_gan_resume_falls_back_from_a_damaged_newest_checkpoint(tmp_path, caplog):
    trainer = tiny_trainer("dcgan")
    first = trainer.save(tmp_path / "checkpoints" / "step_0000001")
    newest = trainer.save(tmp_path / "checkpoints" / "step_0000002")
    damaged = newest / "generator.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert resolve_checkpoint(tmp_path) == newest  # listing alone does not read the files
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(tmp_path, verify=True) == first
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(first) in warnings[0] and str(damaged) in warnings[0], warnings
    (first / "gan_checkpoint.json").write_text("{")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        resolve_checkpoint(tmp_path, verify=True)


def test_a_time_limit_stops_a_stage_with_its_weights_and_resume_finishes_it(
    tiny_data_root,
    text_encoder_dir,  # noqa: F811
    tmp_path,
):
    argv = train_argv(tiny_data_root, text_encoder_dir, tmp_path, "--stage", "all", "--max-steps", "3")
    outputs = train_3stage.main([*argv, "stage1.max_minutes=1e-6"])
    run = tmp_path / "exp"
    state = json.loads((checkpoints(tmp_path)[-1] / "training_state.json").read_text())
    assert state["global_step"] == 1 and state["total_steps"] == 3  # stopped after its first update
    assert (run / "vae" / "config.json").is_file() and outputs == {"vae": run / "vae"}
    assert not (run / "unet").exists()  # later stages wait for an unfinished stage 1
    train_3stage.main([*argv[2:], "--stage", "1", "--resume", "latest"])
    state = json.loads((checkpoints(tmp_path)[-1] / "training_state.json").read_text())
    assert state["global_step"] == 3


def test_warm_start_loads_weights_and_refuses_another_architecture(tmp_path):
    source = tiny_unet(32, seed=1)
    source.save_pretrained(tmp_path / "unet")
    target = tiny_unet(32, seed=2)
    assert not torch.equal(target.conv_in.weight, source.conv_in.weight)
    warm_start(target, tmp_path / "unet")
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    source.save_pretrained(tmp_path / "pipe" / "unet")
    warm_start(tiny_unet(32, seed=3), tmp_path / "pipe")  # a pipeline folder's unet/
    with pytest.raises(
        ConfigError, match=r"stage2.init_from .* is another U-Net: its encoder_hid_dim is 32, the config.s gives 48"
    ):
        warm_start(tiny_unet(48), tmp_path / "unet")
    with pytest.raises(FileNotFoundError, match="no U-Net folder"):
        warm_start(target, tmp_path / "missing")


def test_a_warm_start_may_add_dropout_which_acts_only_while_training(tmp_path):
    source = tiny_unet(32, seed=1)  # trained without dropout, as chunks 1-3 of the shipped model were
    source.save_pretrained(tmp_path / "unet")
    target = tiny_unet(32, seed=2, dropout=0.5)
    warm_start(target, tmp_path / "unet")  # a training-only setting is not "another U-Net"
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))
    sample, text = torch.randn(1, 4, 27, 27), torch.randn(1, 5, 32)
    with torch.no_grad():
        reference = source(sample, 10, encoder_hidden_states=text).sample
        evaluated = [target(sample, 10, encoder_hidden_states=text).sample for _ in range(2)]
        target.train()
        trained = [target(sample, 10, encoder_hidden_states=text).sample for _ in range(2)]
    assert torch.equal(*evaluated) and torch.allclose(evaluated[0], reference)  # sampling: no dropout
    assert not torch.allclose(*trained)


def loss_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        text = f.read()
    assert text.endswith("\n")
    rows = list(csv.DictReader(text.splitlines()))
    assert all(len(r) == 6 and None not in r.values() for r in rows), "a row lost fields"
    return rows


def test_kill_9_then_resume_latest_ends_with_every_step_once(
    stage1_run,  # noqa: F811
    tiny_data_root,
    text_encoder_dir,  # noqa: F811
    tmp_path,
):
    """A stage-2 run killed at a random moment after its first checkpoint, then resumed, ends at the same step
    count as an uninterrupted run, with one loss row per step in an intact losses.csv; the resumed run starts
    from the weights of stage 2 of the first run (stage2.init_from is not involved)."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(stage1_run, out)
    total = 16
    argv = train_argv(
        tiny_data_root,
        text_encoder_dir,
        out,
        "--stage",
        "2",
        "--max-steps",
        str(total),
        **{"runtime.checkpoint_every_steps": 2, "stage2.epochs": 100},
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "train_3stage.py"), *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not checkpoints(out, "stage2") and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert checkpoints(out, "stage2"), "no stage-2 checkpoint before the kill"
        time.sleep(random.Random().uniform(0.0, 1.0))  # a random moment: between steps, in a save or an append
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    killed_at = json.loads((checkpoints(out, "stage2")[-1] / "training_state.json").read_text())["global_step"]
    train_3stage.main([*argv, "--resume", "latest"])
    state = json.loads((checkpoints(out, "stage2")[-1] / "training_state.json").read_text())
    assert state["global_step"] == total >= killed_at
    steps = [
        int(r["step"])
        for r in loss_rows(out / "exp" / "losses.csv")
        if r["stage"] == "stage2" and r["metric"] == "loss"
    ]
    assert steps == list(range(1, total + 1))
    assert (out / "exp" / "pipeline" / "model_index.json").is_file()


# ------------------------------------------------------------------------------------------ data checks
@pytest.mark.parametrize(
    "override, message",
    [
        (
            {"stage1.batch_size": 5000},
            r"error: stage1.batch_size=5000 x 1 process\(es\) is larger than the train split: \d+ sprites",
        ),
        (
            {"stage2.batch_size": 5000},
            r"error: stage2.batch_size=5000 x 1 process\(es\) is larger than the train split: \d+ cached",
        ),
        (
            {"data.filter_generations": [99]},
            r"error: no rows left after filtering with data.filter_types=\[\], data.filter_generations=\[99\]",
        ),
    ],
)
def test_data_that_cannot_fill_a_batch_is_refused_before_any_work(
    tiny_data_root,
    text_encoder_dir,  # noqa: F811
    tmp_path,
    capsys,
    override,
    message,
):
    import re

    line = cli_error(
        capsys, train_3stage.main, train_argv(tiny_data_root, text_encoder_dir, tmp_path, "--stage", "all", **override)
    )
    assert re.match(message, line), line
    assert not (tmp_path / "exp").exists()  # nothing was written
