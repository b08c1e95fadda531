"""Exponential moving average of a model's weights."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Keeps `shadow = decay * shadow + (1 - decay) * param` for every floating-point parameter.

    The shadow lives in fp32 whatever the model's dtype, so a long average does not drown in rounding.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model` (in the model's own dtype)."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        missing = self.shadow.keys() - state["shadow"].keys()
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items()}
