"""Parallel layouts and the process groups that carry them.

A layout says how many processes share one video and how: `cfg` (the unconditional and conditional
halves of the guidance batch on different processes), `ulysses` (the sequence split, gathered into whole
sequences over a subset of heads by an all-to-all) and `ring` (the sequence split, keys and values
passed around a ring). Their product is the group size; a larger world runs several such groups side by
side (`batch` spreads prompts over them).

Ranks inside a group are numbered cfg-major, ring next, ulysses innermost:
    group rank = c * (ring * ulysses) + r * ulysses + u
so the ranks of one Ulysses group, whose all-to-all carries the most bytes, are neighbours (the same
node, NVLink), and the sequence shard of a rank is s = r * ulysses + u.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cogvideox.errors import InputError

_KINDS = ("cfg", "ulysses", "ring")


@dataclass(frozen=True)
class Layout:
    """Degrees of the three kinds of parallelism; 1 = not used."""

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    @property
    def size(self) -> int:
        """Processes per video."""
        return self.cfg * self.ulysses * self.ring

    @property
    def sequence(self) -> int:
        """Processes that split one sequence (Ulysses x ring)."""
        return self.ulysses * self.ring

    def __str__(self) -> str:
        return ",".join(f"{kind}={getattr(self, kind)}" for kind in _KINDS)

    def check(self, heads: int | None = None, world_size: int | None = None, guidance: bool = True) -> None:
        """Raise `InputError` if this layout cannot run a model with `heads` attention heads on
        `world_size` processes (which must be a multiple of `size`: one group per video in flight)."""
        if self.cfg not in (1, 2):
            raise InputError(f"cfg={self.cfg}: the guidance batch has two halves, so cfg is 1 or 2")
        if self.cfg == 2 and not guidance:
            raise InputError("cfg=2 splits the guidance batch, but guidance is off (scale <= 1); use cfg=1")
        if heads is not None and heads % self.ulysses:
            divisors = [d for d in range(2, heads + 1) if heads % d == 0][:6]
            raise InputError(
                f"ulysses={self.ulysses} does not divide the model's {heads} attention heads; use a divisor "
                f"({', '.join(map(str, divisors))}, ...) or ring={self.ulysses}, which works for any degree"
            )
        if world_size is not None and world_size % self.size:
            raise InputError(
                f"--parallel {self} needs {self.size} processes per video, but {world_size} were started "
                f"(torchrun --nproc-per-node): start a multiple of {self.size}"
            )


def parse_layout(text: str | Layout | None) -> Layout:
    """ "cfg=2,ulysses=2,ring=1" (any subset, any order; missing kinds are 1) -> `Layout`."""
    if text is None:
        return Layout()
    if isinstance(text, Layout):
        return text
    degrees: dict[str, int] = {}
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        kind, sep, value = part.partition("=")
        kind = kind.lower()
        if not sep or kind not in _KINDS:
            raise InputError(
                f"cannot read {part!r} in the parallel layout {text!r}; write kind=degree pairs such as "
                "cfg=2,ulysses=2,ring=1 (kinds: cfg, ulysses, ring)"
            )
        if kind in degrees:
            raise InputError(f"{kind} appears twice in the parallel layout {text!r}")
        try:
            degree = int(value)
        except ValueError:
            degree = 0
        if degree < 1:
            raise InputError(f"{kind}={value!r} in the parallel layout: the degree must be a positive integer")
        degrees[kind] = degree
    return Layout(**degrees)


@dataclass(frozen=True)
class Mesh:
    """This process's place in a layout: its group's ranks and the sub-groups collectives run over.

    `replica` numbers the groups of a world larger than the layout. Groups are None where they would
    have a single member (nothing to communicate). `device` is where collectives' tensors live (CUDA
    for NCCL, the CPU for gloo).
    """

    layout: Layout
    rank: int  # rank inside the group, 0 ... layout.size - 1
    replica: int
    replicas: int
    device: torch.device
    ranks: tuple[int, ...] = (0,)  # global ranks of the group
    group: object = None  # the whole group (text encoder and VAE split, seed)
    cfg_group: object = None
    sequence_group: object = None  # Ulysses x ring: the gather after the last block
    ulysses_group: object = None
    ring_group: object = None
    ring_ranks: tuple[int, ...] = (0,)  # global ranks of this process's ring, in ring order

    @property
    def cfg_index(self) -> int:
        return self.rank // self.layout.sequence

    @property
    def sequence_index(self) -> int:
        """Which shard of the joint sequence this process holds."""
        return self.rank % self.layout.sequence

    @property
    def ring_index(self) -> int:
        return self.sequence_index // self.layout.ulysses

    @property
    def is_leader(self) -> bool:
        """Rank 0 of its group: the one that writes files and prints."""
        return self.rank == 0


def single_process_mesh(device: torch.device | str = "cpu") -> Mesh:
    """The mesh of a run without torch.distributed: one process does everything."""
    return Mesh(Layout(), rank=0, replica=0, replicas=1, device=torch.device(device))


def build_mesh(layout: Layout, device: torch.device | str | None = None) -> Mesh:
    """Create the process groups of `layout` over the initialised default group and return this
    process's mesh. Every process must call it (group creation is collective) with the same layout."""
    if not dist.is_initialized():
        if layout.size != 1:
            raise InputError(
                f"--parallel {layout} needs {layout.size} processes: launch with "
                f"torchrun --nproc-per-node {layout.size} -m cogvideox ..."
            )
        return single_process_mesh(device or "cpu")
    world, me = dist.get_world_size(), dist.get_rank()
    layout.check(world_size=world)
    G, S, U = layout.size, layout.sequence, layout.ulysses
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"

    mine: dict[str, object] = {}
    ring_ranks: tuple[int, ...] = (me,)

    def make(name: str, ranks: list[int]) -> None:
        # new_group is collective over the whole world: every process creates every group, in order.
        nonlocal ring_ranks
        group = dist.new_group(ranks) if len(ranks) > 1 else None
        if me in ranks:
            mine[name] = group
            if name == "ring":
                ring_ranks = tuple(ranks)

    for replica in range(world // G):
        base = replica * G
        make("group", [base + q for q in range(G)])
        for s in range(S):
            make("cfg", [base + c * S + s for c in range(layout.cfg)])
        for c in range(layout.cfg):
            make("sequence", [base + c * S + s for s in range(S)])
            for r in range(layout.ring):
                make("ulysses", [base + c * S + r * U + u for u in range(U)])
            for u in range(U):
                make("ring", [base + c * S + r * U + u for r in range(layout.ring)])
    replica = me // G
    return Mesh(
        layout,
        rank=me - replica * G,
        replica=replica,
        replicas=world // G,
        device=torch.device(device),
        ranks=tuple(range(replica * G, (replica + 1) * G)),
        group=mine["group"],
        cfg_group=mine["cfg"],
        sequence_group=mine["sequence"],
        ulysses_group=mine["ulysses"],
        ring_group=mine["ring"],
        ring_ranks=ring_ranks,
    )


def launched_distributed() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device | str | None = None) -> torch.device:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on the CPU)
    and return this process's device: `cuda:LOCAL_RANK` when `device` is CUDA (or None with CUDA
    present), else the CPU. Without a launcher it only resolves the device."""
    from cogvideox import loading

    device = loading.choose_device(device)
    if not launched_distributed() and not dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def broadcast_int(value: int, mesh: Mesh) -> int:
    """Rank 0's `value` on every rank of the group (e.g. a random seed drawn once)."""
    if mesh.group is None:
        return value
    # int64 holds seeds below 2**63; larger ones travel as their two's-complement bit pattern.
    signed = value - 2**64 if value >= 2**63 else value
    tensor = torch.tensor([signed], dtype=torch.int64, device=mesh.device)
    dist.broadcast(tensor, src=mesh.ranks[0], group=mesh.group)
    got = int(tensor.item())
    return got + 2**64 if got < 0 else got
