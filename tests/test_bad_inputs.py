"""Every user-causable mistake ends in one ``error: ...`` line (exit 2) naming the file or value, or in its
documented recovery; docs/bad_inputs.md lists the cases. Tiny components, CPU, seconds."""

import errno
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import text_encoder_dir  # noqa: F401  (session fixture)
from test_training_cli import tiny_args

import train_3stage
from pokediff.errors import CheckpointError, report_user_errors, verify_checkpoint_files
from pokediff.training import setup as training_setup
from pokediff.training import stage1_vae, stage2_unet

SMALL = {"data.resolution": 64, "runtime.checkpoint_every_steps": 1, "runtime.checkpoints_total_limit": 2}


def cli_error(capsys, main, argv) -> str:
    """Run a CLI ``main`` under the ``__main__`` handling; returns its one error line (exit status 2)."""
    with pytest.raises(SystemExit) as exit_:
        report_user_errors(main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: "), err
    return err[-1]


def train_argv(data_root, text_encoder, out, *flags, **extra):
    return [*flags, "--experiment-name", "exp", *tiny_args(data_root, text_encoder, out, **{**SMALL, **extra})]


@pytest.fixture(scope="module")
def stage1_run(tiny_data_root, text_encoder_dir, tmp_path_factory):  # noqa: F811
    """A finished 2-step stage-1 run with checkpoints at steps 1 and 2 (copied by each test that damages it)."""
    out = tmp_path_factory.mktemp("stage1_run")
    train_3stage.main(train_argv(tiny_data_root, text_encoder_dir, out, "--stage", "1", "--max-steps", "2"))
    return out


@pytest.fixture
def run_copy(stage1_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(stage1_run, out)
    return out


def checkpoints(out, stage="stage1"):
    return sorted((out / "exp" / "checkpoints" / stage).glob("checkpoint-*"))


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path):
    path.write_text('{"stage": "stage1", "global_')


DAMAGE = {
    "weights truncated": ("model.safetensors", truncate),
    "optimizer truncated": ("optimizer.bin", truncate),
    "training_state.json garbled": ("training_state.json", garble),
}


# ------------------------------------------------------------------------------ damaged checkpoints
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_named_and_latest_falls_back(
    damage,
    run_copy,
    tiny_data_root,
    text_encoder_dir,  # noqa: F811
    capsys,
    caplog,
):
    name, spoil = DAMAGE[damage]
    first, newest = checkpoints(run_copy)
    spoil(newest / name)
    # an explicit checkpoint: one line naming the damaged file
    line = cli_error(
        capsys,
        train_3stage.main,
        train_argv(
            tiny_data_root, text_encoder_dir, run_copy, "--stage", "1", "--max-steps", "2", "--resume", str(newest)
        ),
    )
    assert line.startswith(f"error: checkpoint file {newest / name} is damaged")
    # --resume latest: the step-1 checkpoint instead, said in the log; the stage then finishes normally
    with caplog.at_level(logging.WARNING):
        train_3stage.main(
            train_argv(
                tiny_data_root, text_encoder_dir, run_copy, "--stage", "1", "--max-steps", "2", "--resume", "latest"
            )
        )
    # one warning line names both: the damaged file and the checkpoint resumed from
    warnings = [r.getMessage() for r in caplog.records if "newest intact checkpoint" in r.getMessage()]
    assert len(warnings) == 1 and f"{newest / name} is damaged" in warnings[0], warnings
    assert warnings[0].startswith(f"resuming from {first}, the newest intact checkpoint"), warnings
    state = json.loads((checkpoints(run_copy)[-1] / "training_state.json").read_text())
    assert state["global_step"] == 2
    verify_checkpoint_files(checkpoints(run_copy)[-1])


def test_no_intact_checkpoint_is_one_line(run_copy, tiny_data_root, text_encoder_dir, capsys):  # noqa: F811
    for ckpt in checkpoints(run_copy):
        garble(ckpt / "training_state.json")
    line = cli_error(
        capsys,
        train_3stage.main,
        train_argv(
            tiny_data_root, text_encoder_dir, run_copy, "--stage", "1", "--max-steps", "2", "--resume", "latest"
        ),
    )
    assert line.startswith("error: --resume latest: no intact checkpoint in ")


@pytest.mark.parametrize(
    "flags, extra, message",
    [
        (["--max-steps", "3"], {}, "was made for a 2-step stage1, this run gives 3 steps"),
        (
            ["--max-steps", "2"],
            {"vae.block_out_channels": [8, 16, 16, 32]},
            "it was made with another model configuration (size mismatch for vae.",
        ),
    ],
)
def test_resume_with_other_settings_is_one_line(
    run_copy,
    tiny_data_root,
    text_encoder_dir,
    capsys,  # noqa: F811
    flags,
    extra,
    message,
):
    line = cli_error(
        capsys,
        train_3stage.main,
        train_argv(tiny_data_root, text_encoder_dir, run_copy, "--stage", "1", "--resume", "latest", *flags, **extra),
    )
    assert message in line


def test_stage_1_from_a_stage_2_checkpoint_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "checkpoint-0000002"
    ckpt.mkdir()
    (ckpt / "training_state.json").write_text(json.dumps({"stage": "stage2", "global_step": 2}))
    line = cli_error(
        capsys, train_3stage.main, ["--stage", "1", "--resume", str(ckpt), f"runtime.output_dir={tmp_path}"]
    )
    assert line == f"error: --resume {ckpt} is a stage 2 checkpoint but --stage 1 was asked"
    (ckpt / "training_state.json").write_text("{")
    line = cli_error(
        capsys, train_3stage.main, ["--stage", "1", "--resume", str(ckpt), f"runtime.output_dir={tmp_path}"]
    )
    assert line.startswith(f"error: checkpoint file {ckpt / 'training_state.json'} is damaged")


# ------------------------------------------------------------------------------ runs that go wrong
def test_stage_1_without_a_finite_val_loss_stops_with_an_error(
    tiny_data_root,
    text_encoder_dir,
    tmp_path,  # noqa: F811
    capsys,
    monkeypatch,
):
    monkeypatch.setattr(stage1_vae, "evaluate_vae", lambda *a, **k: float("nan"))
    line = cli_error(
        capsys,
        train_3stage.main,
        train_argv(tiny_data_root, text_encoder_dir, tmp_path, "--stage", "1", "--max-steps", "1"),
    )
    assert line.startswith("error: stage 1 ended without usable weights: every validation loss was NaN/inf")
    assert not (tmp_path / "exp" / "vae").exists()


def test_stage_2_without_a_finite_val_loss_stops_with_an_error(
    stage1_run,
    tiny_data_root,
    text_encoder_dir,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
):
    monkeypatch.setattr(stage2_unet, "validation_loss", lambda *a, **k: float("inf"))
    line = cli_error(
        capsys,
        train_3stage.main,
        train_argv(
            tiny_data_root,
            text_encoder_dir,
            tmp_path,
            "--stage",
            "2",
            "--max-steps",
            "1",
            "--vae-checkpoint",
            str(stage1_run / "exp" / "vae"),
        ),
    )
    assert line.startswith("error: stage 2 ended without usable weights")
    assert not (tmp_path / "exp" / "unet").exists()


def test_nan_guard_fires_in_a_stage_shorter_than_its_limit(
    tiny_data_root,
    text_encoder_dir,
    tmp_path,  # noqa: F811
    capsys,
    monkeypatch,
):
    real = stage1_vae._vae_losses

    def nan_losses(*args, **kwargs):
        loss, parts, recon = real(*args, **kwargs)
        return loss * float("nan"), parts, recon

    monkeypatch.setattr(stage1_vae, "_vae_losses", nan_losses)
    line = cli_error(
        capsys,
        train_3stage.main,
        train_argv(
            tiny_data_root,
            text_encoder_dir,
            tmp_path,
            "--stage",
            "1",
            "--max-steps",
            "2",
            **{"runtime.nan_max_consecutive": 20},
        ),
    )
    assert line.startswith("error: stage1: 2 batches in a row had a non-finite loss")


@pytest.mark.parametrize("total_steps, warmup_fraction", [(20, 0.05), (4, 0.25), (2, 0.1), (3, 0.5)])
def test_one_cycle_survives_runs_shorter_than_the_warmup(total_steps, warmup_fraction, caplog):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    with caplog.at_level(logging.WARNING):
        scheduler = training_setup.one_cycle(optimizer, 1e-3, total_steps, warmup_fraction, num_processes=1)
    lrs = []
    for _ in range(total_steps):  # the stages step the schedule once per optimizer update
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert all(math.isfinite(lr) and 0 < lr <= 1e-3 for lr in lrs)
    short = warmup_fraction * max(total_steps, 2) < 2
    assert any("too few for a warm-up" in r.getMessage() for r in caplog.records) == short


# ------------------------------------------------------------------------------ outputs that cannot be written
def test_disk_full_during_a_checkpoint_names_it_and_keeps_the_last_one(
    tiny_data_root,
    text_encoder_dir,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
):
    import accelerate.utils.other

    real_save = torch.save

    def save_until_full(obj, f, *args, **kwargs):
        if "checkpoint-0000002" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    monkeypatch.setattr(accelerate.utils.other.torch, "save", save_until_full)
    line = cli_error(
        capsys,
        train_3stage.main,
        train_argv(tiny_data_root, text_encoder_dir, tmp_path, "--stage", "1", "--max-steps", "3"),
    )
    folder = tmp_path / "exp" / "checkpoints" / "stage1"
    assert line.startswith(
        f"error: could not write {folder / '.tmp-checkpoint-0000002'}: the write failed (disk full?)"
    )
    assert line.endswith(f"the last complete checkpoint {folder / 'checkpoint-0000001'} is intact")
    assert [p.name for p in folder.iterdir()] == ["checkpoint-0000001"]  # no half-written folder left
    verify_checkpoint_files(folder / "checkpoint-0000001")


@pytest.mark.parametrize(
    "error", [OSError(errno.ENOSPC, "No space left on device"), PermissionError(errno.EROFS, "Read-only file system")]
)
def test_unwritable_run_folder_names_the_path(
    tiny_data_root,
    text_encoder_dir,
    tmp_path,
    capsys,  # noqa: F811
    monkeypatch,
    error,
):
    def refuse(cfg, path):
        error.filename = str(path)
        raise error

    monkeypatch.setattr(training_setup, "save_config", refuse)
    line = cli_error(
        capsys,
        train_3stage.main,
        train_argv(tiny_data_root, text_encoder_dir, tmp_path, "--stage", "1", "--max-steps", "1"),
    )
    reason = "no space left on device" if error.errno == errno.ENOSPC else "read-only file system"
    assert line.startswith(f"error: could not write {tmp_path / 'exp' / 'config.yaml'}: {reason}")


# ------------------------------------------------------------------------------ generate
@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("pipe")
    tiny_pipeline(folder / "parts").save_pretrained(folder / "pipeline")
    return folder / "pipeline"


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--guidance", "inf"],
            "`guidance_scale` must be a finite number >= 1 (1 = no classifier-free guidance), got inf",
        ),
        (
            ["--guidance", "nan"],
            "`guidance_scale` must be a finite number >= 1 (1 = no classifier-free guidance), got nan",
        ),
        (["--seed", str(2**64 - 1), "--num", "2"], f"--seed must be in 0..{2**64 - 2} with --num 2"),
        (["--seed", "-1"], "--seed must be in 0.."),
        (
            ["--guidance-interval", "0.7", "0.2"],
            "--guidance-interval: `guidance_interval` must be (start, stop) fractions of the steps with 0 <= start < "
            "stop <= 1, got [0.7, 0.2]",
        ),
        (["--guidance-interval", "0", "nan"], "--guidance-interval: `guidance_interval` must be (start, stop)"),
        (["--shape-guidance", "-1"], "--shape-guidance must be >= 0 (0 = off), got -1.0"),
        (["--shape-guidance", "nan"], "--shape-guidance must be >= 0 (0 = off), got nan"),
        (["--out", "{tmp}/afile/x.png"], "--out {tmp}/afile/x.png: {tmp}/afile is a file, not a folder"),
        (["--out", "{tmp}/adir"], "--out must be a .png path"),
        (["--out", "{tmp}/adir.png"], "--out {tmp}/adir.png is a folder; give a file path"),
    ],
)
def test_generate_bad_arguments_fail_before_sampling(pipeline_dir, tmp_path, capsys, monkeypatch, extra, message):
    from pokediff import generate
    from pokediff.pipeline import PokeSpritePipeline

    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.png").mkdir()
    if "--guidance" not in extra:  # found from the arguments alone: before the pipeline is even loaded
        monkeypatch.setattr(PokeSpritePipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    argv = [
        "--model",
        str(pipeline_dir),
        "a cat",
        "--num",
        "1",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "s.png"),
        *extra,
    ]
    assert generate.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert not [p for p in tmp_path.rglob("*.png") if p.is_file()]


def test_generate_largest_seed_works(pipeline_dir, tmp_path):
    from pokediff import generate

    assert (
        generate.main(
            [
                "--model",
                str(pipeline_dir),
                "a cat",
                "--num",
                "1",
                "--steps",
                "1",
                "--seed",
                str(2**64 - 1),
                "--out",
                str(tmp_path / "s.png"),
            ]
        )
        == 0
    )


def test_generate_read_only_out_is_refused_before_sampling(pipeline_dir, tmp_path, capsys, monkeypatch):
    from pokediff import errors, generate

    monkeypatch.setattr(errors.os, "access", lambda path, mode: Path(path) != tmp_path)  # as for a non-root user
    assert generate.main(["--model", str(pipeline_dir), "a cat", "--out", str(tmp_path / "s.png")]) == 2
    assert (
        capsys.readouterr().err.strip() == f"error: --out {tmp_path / 's.png'}: cannot write in {tmp_path} "
        "(permission denied)"
    )


# ------------------------------------------------------------------------------ eval
def test_eval_output_folder_is_refused_before_evaluating(tmp_path, capsys, monkeypatch):
    from pokediff.eval import __main__ as eval_cli

    monkeypatch.setattr(eval_cli, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --output"))
    assert eval_cli.cli(["--model", str(tmp_path), "--output", f"{tmp_path}/some/dir/"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --output {tmp_path}/some/dir is a folder; give a file path"
    (tmp_path / "taken").mkdir()
    assert eval_cli.cli(["--model", str(tmp_path), "--output", str(tmp_path / "taken")]) == 2
    assert "is a folder; give a file path" in capsys.readouterr().err


def test_corrupt_feature_cache_is_rebuilt(tiny_data_root, tmp_path, caplog):
    from pokediff.config import DataConfig
    from pokediff.data import load_splits
    from pokediff.eval import PixelFeatures, reference_features

    cfg = DataConfig(root=str(tiny_data_root), resolution=32, augment=False)
    train = load_splits(cfg)["train"]
    first = reference_features(train, cfg, "train", PixelFeatures(), cache_dir=tmp_path, progress=False)
    truncate(first.path)
    with caplog.at_level(logging.WARNING):
        again = reference_features(train, cfg, "train", PixelFeatures(), cache_dir=tmp_path, progress=False)
    assert not again.cached and any("is unreadable" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(again.features, first.features)
    third = reference_features(train, cfg, "train", PixelFeatures(), cache_dir=tmp_path, progress=False)
    assert third.cached  # the rebuilt file is whole again


# ------------------------------------------------------------------------------ GAN
GAN_COMMON = ["--model", "dcgan"]
GAN_OVERRIDES = ["train.batch_size=8", "runtime.report_to=none"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--lr-d", "inf"], "--lr-d must be a finite number > 0, got inf"),
        (["--max-steps", "0"], "--max-steps must be >= 1 (generator steps in total), got 0"),
        (["--max-minutes", "0"], "--max-minutes must be a finite number > 0, got 0.0"),
    ],
)
def test_gan_train_flag_values_are_checked(tmp_path, capsys, flags, message):
    from pokediff.gan import train as gan_train

    with pytest.raises(SystemExit) as exit_:
        gan_train.main([*GAN_COMMON, "--output-dir", str(tmp_path), *flags, *GAN_OVERRIDES])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "dcgan").exists()  # nothing trained, no untrained checkpoint


@pytest.fixture(scope="module")
def gan_run(tiny_data_root, tmp_path_factory):
    from pokediff.gan import train as gan_train
    from pokediff.gan.config import GAN_CONFIG_DIR

    out = tmp_path_factory.mktemp("gan")
    return gan_train.main(
        [
            "--config",
            str(GAN_CONFIG_DIR / "tiny.yaml"),
            *GAN_COMMON,
            "--output-dir",
            str(out),
            "--max-steps",
            "1",
            *GAN_OVERRIDES,
            f"data.root={tiny_data_root}",
            "data.filter_generations=[]",
        ]
    )


def test_gan_generate_output_naming_a_file_is_refused(gan_run, tmp_path, capsys):
    from pokediff.gan import generate as gan_generate

    (tmp_path / "taken.png").write_text("x")
    with pytest.raises(SystemExit):
        gan_generate.main(["--checkpoint", str(gan_run), "--num", "2", "--output", str(tmp_path / "taken.png")])
    assert (
        capsys.readouterr().err.strip()
        == f"error: --output {tmp_path / 'taken.png'} is an existing file; give a folder"
    )


@pytest.mark.parametrize("name, spoil", [("generator.safetensors", truncate), ("gan_checkpoint.json", garble)])
def test_gan_damaged_checkpoint_is_named(gan_run, tmp_path, capsys, name, spoil):
    from pokediff.gan import generate as gan_generate

    run = tmp_path / "run"
    shutil.copytree(gan_run, run)
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    spoil(ckpt / name)
    with pytest.raises(SystemExit):
        gan_generate.main(["--checkpoint", str(ckpt), "--num", "2", "--output", str(tmp_path / "gen")])
    assert capsys.readouterr().err.strip().startswith(f"error: checkpoint file {ckpt / name} is damaged")


# ------------------------------------------------------------------------------ data
def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    from pokediff.config import DataConfig
    from pokediff.data.transforms import SpriteTransform

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    image = Image.open(tmp_path / "g16.png")
    assert image.mode.startswith("I;16")
    pixels = SpriteTransform(DataConfig(resolution=64, augment=False))(image)  # [-1, 1]
    assert pixels.shape == (3, 64, 64)
    white = (pixels > 0.99).float().mean().item()
    assert white < 0.01  # clipping made 99.6 % of this ramp white
    assert abs(pixels.mean().item()) < 0.02 and pixels.min().item() < -0.99  # the ramp spans black to white


def test_checkpoint_error_is_a_value_error():
    # callers that caught ValueError for resume problems keep working
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize(
    "flags, extra, message",
    [
        (["--max-steps", "0"], {}, "error: runtime.max_steps=0: must be an integer >= 1 (or null)"),
        ([], {"data.filter_generations": [9]}, "error: no rows left after filtering"),
    ],
)
def test_values_found_while_setting_up_a_stage_are_one_line(
    tiny_data_root,
    text_encoder_dir,
    tmp_path,  # noqa: F811
    capsys,
    flags,
    extra,
    message,
):
    line = cli_error(
        capsys,
        train_3stage.main,
        train_argv(tiny_data_root, text_encoder_dir, tmp_path, "--stage", "1", *flags, **extra),
    )
    assert line.startswith(message)


def test_write_failures_of_each_writer_are_recognised(tmp_path):
    from safetensors import SafetensorError

    from pokediff.errors import OutputNotWritableError, write_failure

    target = tmp_path / "ckpt"
    cases = [
        (OSError(errno.ENOSPC, "No space left on device", str(target / "a.bin")), f"{target / 'a.bin'}: no space left"),
        (
            RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"),
            f"{target}: the write failed (disk full?)",
        ),
        (
            SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
            f"{target}: no space left on device",
        ),
    ]
    for err, message in cases:
        failure = write_failure(target, err)
        assert isinstance(failure, OutputNotWritableError) and str(failure).startswith(f"could not write {message}")
    assert write_failure(target, RuntimeError("size mismatch")) is None  # not a write failure: left alone
    assert write_failure(target, OSError(errno.ENOENT, "No such file")) is None
