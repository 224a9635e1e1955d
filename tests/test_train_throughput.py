"""benchmarks/train_throughput.py: each speed lever leaves the loss of a fixed batch where it was (CPU)."""

from dataclasses import replace

import pytest
import torch
from tiny import TINY_UNET, TINY_VAE, load_benchmark, save_tiny_text_encoder

from pokediff.config import load_config


@pytest.fixture(scope="module")
def bench_module():
    return load_benchmark("train_throughput")


@pytest.fixture(scope="module")
def bench(bench_module, tmp_path_factory):
    encoder = save_tiny_text_encoder(tmp_path_factory.mktemp("tiny_text"))
    overrides = {
        **TINY_VAE,
        **TINY_UNET,
        "text_encoder.name": encoder,
        "data.max_text_length": 16,
        "unet.cross_attention_dim": 32,
    }
    cfg = load_config(None, overrides)
    return bench_module.Bench(cfg, torch.device("cpu"), batch=2)


def _check_levers(bench_module, bench, levers):
    base = bench_module.Levers(compile_backend="aot_eager")  # graph capture without a C++ build
    losses = bench_module.lever_check(bench, base, steps=2, levers=levers)
    for kind in ("ours", "stock"):
        runs = losses[kind]
        assert set(runs) == {"baseline", *levers}
        baseline = torch.tensor(runs["baseline"])
        assert torch.isfinite(baseline).all() and (baseline > 0).all()
        for lever in levers:
            # step 0: the forward pass; step 1: after one AdamW + EMA update with the lever on.
            # bf16 autocast rounds activations: close, not equal
            tol = dict(rtol=5e-2, atol=1e-3) if lever == "bf16" else dict(rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(torch.tensor(runs[lever]), baseline, **tol, msg=f"{kind} loop, lever {lever}")


def test_each_lever_keeps_the_fixed_batch_loss(bench_module, bench):
    _check_levers(bench_module, bench, ("bf16", "channels_last", "fused_adamw", "foreach_ema"))


def test_ours_through_the_stepper_keeps_the_fixed_batch_loss_syncing_every_step_or_every_4(bench_module, bench):
    base = bench_module.Levers(compile_backend="aot_eager")
    runs = bench_module.lever_check(bench, base, steps=5, kinds=("ours",), levers=(), sync_every=(1, 4))["ours"]
    assert set(runs) == {"baseline", "sync_every_1", "sync_every_4"}
    baseline = torch.tensor(runs["baseline"])
    # the stepper clips in two calls (measure, then clip) where the plain loop clips in one: equal to rounding
    for name in ("sync_every_1", "sync_every_4"):
        torch.testing.assert_close(torch.tensor(runs[name]), baseline, rtol=1e-4, atol=1e-6, msg=name)
    assert runs["sync_every_1"] == runs["sync_every_4"]  # the device-side path is the same arithmetic


def test_sync_every_below_1_is_refused(bench_module, capsys):
    with pytest.raises(SystemExit):
        bench_module.parse_args(["--sync-every", "0"])
    assert "--sync-every must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow  # dynamo traces the U-Net twice per loop: about a minute on a busy 2-core machine
def test_compile_keeps_the_fixed_batch_loss(bench_module, bench):
    _check_levers(bench_module, bench, ("compile",))


def test_the_fixed_batch_is_fixed_and_the_step_learns(bench_module, bench):
    """Same step index, same draws: two fresh loops agree; the loss of one batch falls with repeated steps."""
    levers = bench_module.Levers()
    a, b = bench_module.TrainLoop(bench, "ours", levers), bench_module.TrainLoop(bench, "ours", levers)
    assert float(a.step(0)) == float(b.step(0))
    loop = bench_module.TrainLoop(bench, "stock", replace(levers, fused_adamw=True))
    for group in loop.optimizer.param_groups:
        group["lr"] = 1e-2
    first = float(loop.step(5))
    for _ in range(5):
        loop.step(5)
    assert float(loop.step(5)) < first


def test_measure_reports_images_per_second_and_flops(bench_module, bench):
    result = bench_module.measure(bench, bench_module.Levers(), steps=1, warmup=0, peak=100.0)
    for kind in ("ours", "stock"):
        assert result[kind]["images_per_s"] > 0
        assert result[kind]["train_flops_per_image"] > 0
        expected = result[kind]["images_per_s"] * result[kind]["train_flops_per_image"] / 100e12
        assert result[kind]["mfu"] == pytest.approx(expected, rel=1e-3)
    # the stock loop also runs the VAE encoder and the text encoder every step
    assert result["stock"]["train_flops_per_image"] > result["ours"]["train_flops_per_image"]
