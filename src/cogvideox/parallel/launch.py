"""What the `generate` and `batch` commands share to run under torchrun: join the process group, lay the
mesh over it, and leave it cleanly (`train` joins with `sigterm_kills` too)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from cogvideox.errors import InputError
from cogvideox.models.config import TransformerConfig
from cogvideox.parallel.mesh import Layout, Mesh, build_mesh, init_distributed, launched_distributed, parse_layout


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
    with sigterm_kills():
        device = init_distributed(device)
    if one_group and dist.is_initialized():
        _check_one_group(layout, dist.get_world_size())
    return build_mesh(layout, device), device


@contextmanager
def sigterm_kills() -> Iterator[None]:
    """SIGTERM ends the process at once while it joins the group. Joining waits for every other process in
    C++, where the command's own SIGTERM handler (a clean stop) would only run once the wait ends: a process
    whose partner failed before joining then ignored torchrun's stop until torchrun killed it 30 s later.
    Nothing is being written yet, so there is nothing to clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_one_group(layout: Layout, world: int) -> None:
    """One video needs exactly one group's worth of processes. Checked before the mesh, whose own check
    (a multiple of the group size, right for a batch) would ask a one-video run for a multiple too."""
    if world != layout.size:
        spread = ", or use `cogvideox batch` to spread prompts over groups" if world % layout.size == 0 else ""
        given = f"with --parallel {layout}" if layout.size > 1 else "without --parallel"
        raise InputError(
            f"one video runs on {layout.size} process(es) {given}, but {world} were started "
            f"(torchrun --nproc-per-node): start {layout.size}{spread}"
        )


def leave(mesh: Mesh | None) -> None:
    """Leave the process group (NCCL complains at exit otherwise)."""
    if mesh is not None and dist.is_initialized():
        dist.destroy_process_group()
