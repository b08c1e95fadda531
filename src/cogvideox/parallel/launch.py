"""What the `generate` and `batch` commands share to run under torchrun: join the process group, lay the
mesh over it, and leave it cleanly."""

from __future__ import annotations

import torch
import torch.distributed as dist

from cogvideox.errors import InputError
from cogvideox.models.config import TransformerConfig
from cogvideox.parallel.mesh import Mesh, build_mesh, init_distributed, launched_distributed, parse_layout


def join(
    spec: str | None,
    device: torch.device,
    config: TransformerConfig,
    guidance: bool,
    one_group: bool,
) -> tuple[Mesh | None, torch.device]:
    """(mesh, this process's device) for a `--parallel` layout, or (None, device) for a plain run.

    The layout is checked against the model (heads) and the request (guidance) before the process group
    is joined; `one_group` (one video) asks for exactly one group's worth of processes.
    """
    if spec is None and not launched_distributed():
        return None, device
    layout = parse_layout(spec)
    layout.check(heads=config.num_attention_heads, guidance=guidance)
    device = init_distributed(device)
    mesh = build_mesh(layout, device)
    if one_group and mesh.replicas > 1:
        raise InputError(
            f"one video runs on {layout.size} process(es) with --parallel {layout}, but "
            f"{mesh.replicas * layout.size} were started; start {layout.size}, or use `cogvideox batch` "
            "to spread prompts over groups"
        )
    return mesh, device


def leave(mesh: Mesh | None) -> None:
    """Leave the process group (NCCL complains at exit otherwise)."""
    if mesh is not None and dist.is_initialized():
        dist.destroy_process_group()
