"""GAN checkpoints without pickle: weights and every tensor in safetensors, the rest in one JSON file.

A checkpoint is a folder::

    gan_checkpoint.json        format marker, model name, step/epoch, model classes + init configs,
                               optimizer hyper-parameters and non-tensor state, resolved GAN config
    generator.safetensors      discriminator.safetensors      generator_ema.safetensors (if EMA)
    optimizers.safetensors     optimizer state tensors, keys "<optimizer>.<param index>.<name>"
    extra.safetensors          fixed noise / labels for sample grids, RNG state

It is written into a temporary sibling folder and renamed into place, so a crash never leaves a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pokediff.errors import CheckpointError, newest_intact_checkpoint, verify_checkpoint_files, write_failure
from pokediff.fileio import atomic_write

MARKER = "gan_checkpoint.json"
FORMAT = "pokediff-gan-checkpoint"
VERSION = 1
STEP_DIR = re.compile(r"^step_(\d+)$")


def _tensors_for_file(tensors: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def flatten_optimizer_state(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    """(tensors, json_meta) holding ``optimizer.state_dict()`` without pickling it."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def unflatten_optimizer_state(tensors: dict, meta: dict, prefix: str) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalar_state"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def save_gan_checkpoint(
    path,
    *,
    generator,
    discriminator,
    optimizers: dict,
    meta: dict,
    ema_module=None,
    extra_tensors: dict | None = None,
) -> Path:
    """Write a checkpoint folder atomically; ``meta`` is stored in the JSON (it must be JSON-serialisable)."""
    path = Path(path)
    try:
        with atomic_write(path) as tmp:
            tmp.mkdir()
            save_file(_tensors_for_file(generator.state_dict()), tmp / "generator.safetensors")
            save_file(_tensors_for_file(discriminator.state_dict()), tmp / "discriminator.safetensors")
            if ema_module is not None:
                save_file(_tensors_for_file(ema_module.state_dict()), tmp / "generator_ema.safetensors")
            opt_tensors, opt_meta = {}, {}
            for name, optimizer in optimizers.items():
                tensors, info = flatten_optimizer_state(optimizer, name)
                opt_tensors.update(tensors)
                opt_meta[name] = info
            save_file(_tensors_for_file(opt_tensors), tmp / "optimizers.safetensors")
            save_file(_tensors_for_file(extra_tensors or {}), tmp / "extra.safetensors")
            document = {
                "format": FORMAT,
                "version": VERSION,
                **meta,
                "generator": {"class": type(generator).__name__, "config": dict(generator.config)},
                "discriminator": {"class": type(discriminator).__name__, "config": dict(discriminator.config)},
                "has_ema": ema_module is not None,
                "optimizers": opt_meta,
            }
            (tmp / MARKER).write_text(json.dumps(document, indent=2))
    except Exception as err:  # noqa: BLE001 - only write failures are converted, the rest re-raised
        failure = write_failure(path, err)
        if failure is not None:
            raise failure from err
        raise
    return path


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints under ``<run_dir>/checkpoints``, oldest step first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(run_dir, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path, verify: bool = False) -> Path:
    """A checkpoint folder itself, or the latest one of a run folder. ``verify`` (resuming): every file of it is
    read far enough to know it is whole, and a damaged latest one of a run folder gives way to the newest intact
    one, with one warning naming both."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"GAN checkpoint not found: {path}")
    if (path / MARKER).is_file():
        if verify:
            _check_intact(path)
        return path
    found = list_checkpoints(path)
    if found:
        return newest_intact_checkpoint(found, _check_intact, path / "checkpoints", "--resume") if verify else found[-1]
    raise FileNotFoundError(
        f"{path} is not a GAN checkpoint: no {MARKER} in it, nor checkpoints/step_*/ of a GAN run folder"
    )


def _check_intact(path: Path) -> None:
    verify_checkpoint_files(path)
    read_meta(path)


def is_gan_checkpoint(path) -> bool:
    try:
        resolve_checkpoint(path)
        return True
    except FileNotFoundError:
        return False


def read_meta(path) -> dict:
    path = resolve_checkpoint(path)
    try:
        meta = json.loads((path / MARKER).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint file {path / MARKER} is damaged: {err}") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint file {path / MARKER} is damaged: not a JSON object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / MARKER} is not a pokediff GAN checkpoint (format={meta.get('format')!r})")
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{path} was written by a newer pokediff (checkpoint version {meta['version']} > {VERSION})")
    return meta


def load_tensors(path, name: str, device="cpu") -> dict:
    file = resolve_checkpoint(path) / f"{name}.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {file}")
    try:
        return load_file(str(file), device=str(device))
    except SafetensorError as err:
        raise CheckpointError(f"checkpoint file {file} is damaged: {err}") from err


def load_generator(path, use_ema: bool = True, device="cpu"):
    """(generator in eval mode, meta): the EMA weights when ``use_ema`` and the checkpoint has them."""
    from pokediff.gan.registry import model_from_config

    meta = read_meta(path)
    generator = model_from_config(meta["generator"]["class"], meta["generator"]["config"])
    name = "generator_ema" if use_ema and meta.get("has_ema") else "generator"
    generator.load_state_dict(load_tensors(path, name))
    meta["loaded_weights"] = name
    return generator.to(device).eval(), meta
