"""Training checkpoints that resume exactly.

Every random draw of a training step comes from a generator seeded by (run seed, step), so the state to
carry over is only the weights, the optimizer, the EMA and the step count. A checkpoint is written to a
temporary file and renamed, so a crash never leaves a half-written one behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cogvideox.files import write_into_place


def step_generator(seed: int, step: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator for one training step: independent of how the run was interrupted."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return g


def save_checkpoint(path: str | Path, **state: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A full disk or Ctrl-C leaves no partial file to fill it, and the previous checkpoint stays.
    return write_into_place(path, lambda temporary: torch.save(state, temporary))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def latest_checkpoint(folder: str | Path, prefix: str) -> Path | None:
    """The checkpoint `{prefix}-{step}.pt` with the highest step in `folder`, if any."""
    folder = Path(folder)
    best: tuple[int, Path] | None = None
    for p in folder.glob(f"{prefix}-*.pt"):
        try:
            step = int(p.stem.rsplit("-", 1)[1])
        except ValueError:
            continue
        if best is None or step > best[0]:
            best = (step, p)
    return best[1] if best else None
