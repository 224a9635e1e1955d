"""benchmarks/gpu_day.py --dry-run, reduced (tiny components, 2 steps per stage, 6 samples), then the samples it
packed scored by `python -m pokediff.eval --samples`: the GPU day path end to end on a CPU."""

import json

import pytest
from test_training import text_encoder_dir  # noqa: F401  (session fixture shared with test_training.py)
from test_training_cli import tiny_args
from tiny import load_benchmark
from torch import nn

from pokediff.eval import PixelFeatures, validate_result
from pokediff.eval.__main__ import main as eval_main
from pokediff.eval.samples import load_samples, read_run_info


class MeanAbsDistance(nn.Module):
    def forward(self, x, y):
        return (x - y).abs().flatten(1).mean(dim=1)


@pytest.mark.slow  # three tiny training stages, sampling and both benchmarks: a minute or more on 2 busy cores
def test_dry_run_end_to_end_then_scored_from_its_archives(tiny_data_root, text_encoder_dir, tmp_path):
    gpu_day = load_benchmark("gpu_day")
    out = tmp_path / "out"
    summary = gpu_day.main(
        [
            "--out",
            str(out),
            "--dry-run",
            "--work-dir",
            str(tmp_path / "work"),
            "--train-samples",
            "2",
            "--val-captions",
            "1",
            "--freeform-prompts",
            "1",
            *tiny_args(tiny_data_root, text_encoder_dir, tmp_path / "unused"),
        ]
    )
    phases = summary["phases"]
    assert {name: p["status"] for name, p in phases.items()} == {
        "train": "done",
        "samples": "done",
        "sampling_speed": "done",
        "train_throughput": "done",
    }, phases
    assert json.loads((out / "summary.json").read_text())["phases"].keys() == phases.keys()

    train = phases["train"]
    assert all(train[f"stage{k}_s"] > 0 for k in (1, 2, 3))
    assert train["optimizer_steps"] == {"stage1": 2, "stage2": 2, "stage3": 2}
    # tiny.yaml's sizes, not gpu_quick's (the two share default.yaml's recipe and its v-prediction)
    assert train["config_resolved"]["scheduler"]["prediction_type"] == "v_prediction"
    assert train["config_resolved"]["stage2"]["batch_size"] == 4 != 128  # tiny_args' size; gpu_quick's is 128

    # at most 8 files come back from the device: everything the run keeps fits in 7
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "grid_freeform.png",
        "grid_val.png",
        "log.txt",
        "losses.csv",
        "samples-0.tar",
        "samples-1.tar",
        "summary.json",
    ]
    log = (out / "log.txt").read_text().splitlines()
    assert log[0].startswith("[") and any("train: stage2 done" in line for line in log)

    samples = phases["samples"]
    assert samples["by_source"] == {"train": 2, "val": 2, "freeform": 2}
    assert samples["encoding"]["lossless"] is True and samples["max_abs_pixel_error_sampled"] == 0
    records = [r for r, _ in load_samples(out)]
    assert [(r["source"], r["seed"]) for r in records] == [
        ("train", 0),
        ("train", 1),
        ("val", 100_000),
        ("val", 100_001),
        ("freeform", 200_000),
        ("freeform", 200_001),
    ]
    assert records[2]["prompt"] == records[3]["prompt"] and records[2]["row"] == 0
    assert records[4]["target_color"] == "red"  # FREEFORM_PROMPTS[0]
    assert read_run_info(out)["data"]["root"] == str(tiny_data_root)

    assert phases["sampling_speed"]["float32"]["schedulers"]["dpm"]["pipeline_images_per_s"] > 0
    for run in ("plain", "levers"):
        assert phases["train_throughput"][run]["ours"]["images_per_s"] > 0
    assert phases["train_throughput"]["levers"]["levers"]["fused_adamw"] is True

    # the archives are scored here as a model would be, against the split their rows come from
    result = eval_main(
        [
            "--samples",
            str(out),
            "--split",
            "val",
            "--clip",
            "none",
            "--batch-size",
            "2",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--output",
            str(tmp_path / "val.json"),
            "--quiet",
        ],
        feature_net=PixelFeatures(),
        perceptual=MeanAbsDistance(),
    )
    validate_result(result)
    assert result["num_samples"] == 2 and result["metrics"]["diversity"] is not None
    assert result["metrics"]["color_agreement"] is not None


def test_each_training_stage_is_capped_by_its_share_of_the_lease(tmp_path):
    gpu_day = load_benchmark("gpu_day")
    args = gpu_day.parse_args(["--out", str(tmp_path), "--budget-s", "600", "stage2.max_minutes=1.5"])
    caps = {o.split("=")[0]: float(o.split("=")[1]) for o in args.overrides if ".max_minutes=" in o}
    # stage 1 and 3 from their shares of 600 s; the explicit stage-2 cap wins over its share
    assert caps == {"stage1.max_minutes": 2.5, "stage2.max_minutes": 1.5, "stage3.max_minutes": 1.0}
    # a dry run has no budget, so nothing is capped
    dry = gpu_day.parse_args(["--out", str(tmp_path), "--dry-run"])
    assert not any(".max_minutes=" in o for o in dry.overrides)
