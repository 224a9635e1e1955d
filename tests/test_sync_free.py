"""``runtime.sync_every_steps``: the training loop without per-step host reads (CPU, a tiny MLP)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

import pokediff
from pokediff.config import CONFIG_DIR, ConfigError, RuntimeConfig, load_config
from pokediff.training.checkpoints import CheckpointManager
from pokediff.training.guards import NonFiniteLossError
from pokediff.training.loop import run_epochs, start_training
from pokediff.training.metrics import read_losses

STEPS = 6
POKEDIFF_DIR = str(Path(pokediff.__file__).parent)


def _train(tmp_path, sync_every, poison=(), poison_kind="add", nan_max=20, on_step=None):
    """One epoch of STEPS updates on fixed batches; returns (weights seen at the start of each step, final
    weights, losses.csv rows without their time)."""
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(2 * STEPS, 4, generator=g), torch.randn(2 * STEPS, 1, generator=g))
    model, optimizer, loader = acc.prepare(model, optimizer, DataLoader(data, batch_size=2))
    folder = tmp_path / f"sync{sync_every}"
    checkpoints = CheckpointManager(acc, folder / "checkpoints", 1)
    training = start_training(
        acc,
        "stageX",
        model,
        optimizer,
        loader,
        checkpoints,
        None,
        folder / "losses.csv",
        # a clip low enough to act on every step
        SimpleNamespace(epochs=1, learning_rate=0.05, warmup_fraction=0.3, grad_clip=0.05),
        RuntimeConfig(nan_max_consecutive=nan_max, grad_explosion_factor=10.0, sync_every_steps=sync_every),
    )
    seen = []

    def loss(batch, step):
        if on_step is not None:
            on_step(step)
        seen.append([p.detach().clone() for p in model.parameters()])
        x, y = batch
        value = (model(x) - y).pow(2).mean()
        if step in poison:  # "add": finite gradients, NaN loss; "mul": NaN gradients too
            value = value + float("nan") if poison_kind == "add" else value * float("nan")
        return value, {"mse": value.detach()}

    try:
        run_epochs(training, loss, epochs=1, seed=0, checkpoint_every_steps=1000, desc="sync test")
    finally:
        training.close()
    rows = [{k: v for k, v in r.items() if k != "time"} for r in read_losses(folder / "losses.csv")]
    return seen, [p.detach().clone() for p in model.parameters()], rows


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_sync_every_4_trains_exactly_as_every_step_when_all_is_finite(tmp_path):
    seen1, final1, rows1 = _train(tmp_path, 1)
    seen4, final4, rows4 = _train(tmp_path, 4)
    assert all(_same(a, b) for a, b in zip(seen1, seen4))
    assert _same(final1, final4)
    assert not _same(seen1[0], final1)  # it did train
    assert rows1 == rows4  # the same losses.csv: one row set per update, same values
    assert [r["step"] for r in rows4 if r["metric"] == "loss"] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("poison_kind", ["add", "mul"])
@pytest.mark.parametrize("sync_every", [1, 4])
def test_a_nan_loss_step_moves_no_weight_and_training_goes_on(tmp_path, sync_every, poison_kind):
    seen, final, rows = _train(tmp_path, sync_every, poison={2}, poison_kind=poison_kind)
    after = seen[1:] + [final]  # weights after each update
    assert _same(after[2], after[1])  # the poisoned update changed nothing
    assert not _same(after[3], after[2])  # the next one trains again
    assert all(torch.isfinite(p).all() for p in final)
    updated = {r["step"]: r["value"] for r in rows if r["metric"] == "updated"}
    assert updated == {1: 1.0, 2: 1.0, 3: 0.0, 4: 1.0, 5: 1.0, 6: 1.0}
    assert [r["value"] for r in rows if r["metric"] == "skipped_batches"] == [0, 0, 1, 1, 1, 1]


def test_the_clean_steps_after_a_nan_match_between_modes_up_to_adamw_state(tmp_path):
    # sync_every=1 skips the optimizer; >1 takes a zero-gradient step whose weights are put back, so AdamW's
    # moments decay once more: the weights before the NaN agree exactly, the later ones only approximately
    seen1, final1, _ = _train(tmp_path, 1, poison={2})
    seen4, final4, _ = _train(tmp_path, 4, poison={2})
    assert all(_same(a, b) for a, b in zip(seen1[:4], seen4[:4]))
    for a, b in zip(final1, final4):
        torch.testing.assert_close(a, b, rtol=0, atol=0.05)


@pytest.mark.parametrize("poison_kind", ["add", "mul"])
def test_n_non_finite_steps_in_a_row_abort_with_the_same_message_in_both_modes(tmp_path, poison_kind):
    messages = []
    for sync_every in (1, 4):
        with pytest.raises(NonFiniteLossError) as err:
            _train(tmp_path, sync_every, poison={1, 2, 3, 4, 5}, poison_kind=poison_kind, nan_max=3)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith("stageX: 3 batches in a row had a non-finite loss (last at step 3)")


def test_no_host_read_between_syncs(tmp_path, monkeypatch):
    """Every tensor -> host read made by pokediff code is recorded with the step it happened in."""
    reads, current = [], {"step": -1}

    def audited(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(POKEDIFF_DIR):
                reads.append((current["step"], name))
            return real(self, *args, **kwargs)

        return read

    for name in ("item", "__float__", "__int__", "__bool__", "tolist", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, audited(name))

    def on_step(step):
        current["step"] = step

    _train(tmp_path, 4, on_step=on_step)
    # updates 0..5: the window is read after update 3 (4 updates) and after update 5 (the end), once each
    assert reads == [(3, "tolist"), (5, "tolist")]

    reads.clear()
    _train(tmp_path, 1, on_step=on_step)  # the control: every step reads
    assert {step for step, _ in reads} == set(range(STEPS))
    assert any(name == "item" for _, name in reads)


def test_sync_every_steps_below_1_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"^runtime.sync_every_steps=0: must be an integer >= 1$"):
        load_config(CONFIG_DIR / "tiny.yaml", ["runtime.sync_every_steps=0"])
    assert load_config(CONFIG_DIR / "tiny.yaml", ["runtime.sync_every_steps=8"]).runtime.sync_every_steps == 8
