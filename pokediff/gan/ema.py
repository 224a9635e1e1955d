"""Exponential moving average of the generator, kept as a ready-to-sample module.

The averaging itself is diffusers' ``EMAModel`` (its decay warms up as (1+n)/(10+n) until it reaches
``decay``); this wrapper holds the averaged copy of G and mirrors G's buffers (BatchNorm statistics),
which ``EMAModel`` does not track.
"""

from __future__ import annotations

import copy

import torch
from diffusers.training_utils import EMAModel
from torch import nn


class GeneratorEMA:
    def __init__(self, generator: nn.Module, decay: float):
        self.module = copy.deepcopy(generator).eval().requires_grad_(False)
        self.averager = EMAModel(self.module.parameters(), decay=decay)

    @property
    def decay(self) -> float:
        return self.averager.decay

    @property
    def num_updates(self) -> int:
        return self.averager.optimization_step

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        self.averager.optimization_step = int(value)

    def current_decay(self) -> float:
        """The decay the next update will use."""
        return self.averager.get_decay(self.averager.optimization_step + 1)

    @torch.no_grad()
    def update(self, generator: nn.Module) -> None:
        self.averager.step(generator.parameters())
        self.averager.copy_to(self.module.parameters())
        for mine, theirs in zip(self.module.buffers(), generator.buffers()):
            mine.copy_(theirs)

    def load_module_state(self, state_dict: dict, num_updates: int) -> None:
        """Restore the averaged weights (from a checkpoint) and restart the averager from them."""
        self.module.load_state_dict(state_dict)
        self.averager = EMAModel(self.module.parameters(), decay=self.averager.decay)
        self.averager.optimization_step = int(num_updates)

    def to(self, device) -> "GeneratorEMA":
        self.module.to(device)
        self.averager.to(device)
        return self
