"""Offloading: keep the weights on the host and copy them to the GPU only while they are used.

Applied from outside, through forward hooks on the pipeline's modules; no mode changes a number (the
same weights, the same kernels, in the same order), so outputs are bitwise those of the resident run.

- "none": every component stays on the device.
- "model": whole components (T5, transformer, VAE) live on the host; the one about to run is copied
  in and the previous one dropped. Device weights: the largest component.
- "stream": T5 and transformer blocks live on the host and are copied `lookahead` blocks ahead, on a
  separate CUDA stream, into a ring of `lookahead + 1` preallocated device buffers while earlier blocks
  compute; a buffer is reused once the compute stream is past the block it held. What lies outside the
  blocks (embeddings, output layers) and the whole VAE move as in "model". Device weights: that rest
  plus `lookahead + 1` blocks.
- "sequential": every module that owns weights is copied in right before its own forward and dropped
  right after, with no look-ahead. Device weights: the largest single layer; the least memory this
  design reaches (activations, mostly the VAE decoder's, are then what is left: see `--vae-tiling`).
- "auto": `choose_mode` picks the fastest mode whose estimated peak fits the free device memory.

The host holds ONE copy of every weight, packed per group (a block, a component, a layer) into one flat
byte buffer that is page-locked in place with cudaHostRegister, so the pinned memory is the weights plus
a few bytes of alignment (PyTorch's pinned allocator would round each buffer up to a power of two), and
a group moves in one DMA copy. Dropping a group from the device copies nothing back: inference never
writes a weight, so the parameters just point at the host copy again.

The machinery takes the compute device as a parameter and works with the CPU as that device (real
copies into separate buffers, no streams), which is how the tests check the schedule, the release after
use and the outputs; `record=True` keeps an event log of every fetch, prefetch and release.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cogvideox.errors import InputError, OutOfMemoryError

MODES = ("none", "model", "stream", "sequential")
CHOICES = (*MODES, "auto")
DEFAULT_LOOKAHEAD = 2

_ALIGN = 256  # bytes; every tensor of a flat buffer starts on this boundary (what CUDA kernels like)
_GIB = 2**30
log = logging.getLogger("cogvideox.offload")


def check_mode(mode: str | None) -> str:
    """The mode name, lower-cased; None means "none". Unknown names are an `InputError`."""
    name = "none" if mode is None else str(mode).strip().lower()
    if name not in CHOICES:
        raise InputError(f"unknown offload mode {mode!r}; use one of {', '.join(CHOICES)}")
    return name


# ----------------------------------------------------------------------------------------------------
# Weight groups: tensors that move together, with one packed host copy


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def _view(flat: torch.Tensor, offset: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    count = shape.numel()
    size = count * torch.empty((), dtype=dtype).element_size()
    return flat[offset : offset + size].view(dtype).view(shape)


def _owned_tensors(module: nn.Module, recurse: bool = True) -> list[torch.Tensor]:
    """Parameters and buffers of `module`, each once (tied weights are one tensor)."""
    seen, tensors = set(), []
    for t in [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            tensors.append(t)
    return tensors


class WeightGroup:
    """Tensors (parameters and buffers) that move to the device and back together.

    Built from tensors anywhere (host or device); afterwards their data is a view of the group's packed
    host copy (`host`) except while the group is attached to a device buffer. With `poison`, a detached
    group's tensors point at a buffer of NaNs instead, so a weight used outside its window shows up in
    the output (a check for the tests; the real values stay in `host`).
    """

    def __init__(self, name: str, tensors: list[torch.Tensor], allocate_host, poison: bool = False) -> None:
        self.name = name
        self.tensors = tensors
        self.layout: list[tuple[int, torch.dtype, torch.Size]] = []
        offset = 0
        for t in tensors:
            if type(t) not in (torch.Tensor, nn.Parameter):
                raise TypeError(
                    f"{name}: cannot offload a {type(t).__name__} weight; apply offloading to plain tensors "
                    "(int8 weights stored as int8 tensors with their scales are fine)"
                )
            offset = _aligned(offset)
            self.layout.append((offset, t.dtype, t.shape))
            offset += t.numel() * t.element_size()
        self.nbytes = _aligned(offset) if tensors else 0
        self.host = allocate_host(self.nbytes)  # uint8 [nbytes], page-locked on CUDA
        with torch.no_grad():
            for t, (off, dtype, shape) in zip(tensors, self.layout):
                view = _view(self.host, off, dtype, shape)
                view.copy_(t.detach())
                t.data = view  # the old storage goes as soon as nothing else holds it
        self._parked = [t.data for t in tensors]
        if poison:
            nan = torch.full((self.nbytes,), 255, dtype=torch.uint8)  # 0xFF.. is NaN in every float type
            self._parked = [_view(nan, off, dtype, shape) for off, dtype, shape in self.layout]
            self.detach()
        self.device_buffer: torch.Tensor | None = None  # flat device copy while fetched
        self.slot: int | None = None  # ring slot (streamed blocks)
        self.ready = None  # CUDA event: the copy into the device buffer is done
        self.refs = 0  # nested users (sequential mode)

    @property
    def on_device(self) -> bool:
        return self.device_buffer is not None

    def copy_to(self, buffer: torch.Tensor) -> None:
        """Copy the host weights into `buffer` (flat, uint8, at least `nbytes`) on the current stream."""
        buffer[: self.nbytes].copy_(self.host, non_blocking=True)

    def attach(self, buffer: torch.Tensor) -> None:
        """Point the tensors at their copy in the device buffer."""
        for t, (off, dtype, shape) in zip(self.tensors, self.layout):
            t.data = _view(buffer, off, dtype, shape)

    def detach(self) -> None:
        """Point the tensors back at the host copy (or the poison)."""
        for t, parked in zip(self.tensors, self._parked):
            t.data = parked


class _Ring:
    """`n` preallocated device buffers for streamed blocks, each with the event after which the compute
    stream no longer reads it."""

    def __init__(self, n: int, nbytes: int, allocate) -> None:
        self.buffers = [allocate(nbytes) for _ in range(n)]
        self.released = [None] * n
        self.free = list(range(n))

    def take(self) -> int | None:
        return self.free.pop(0) if self.free else None

    def give(self, slot: int, event) -> None:
        self.released[slot] = event
        self.free.append(slot)


@dataclass
class _Component:
    name: str
    rest: WeightGroup | None = None  # what moves with the component as a whole
    blocks: list[WeightGroup] | None = None  # streamed blocks, in call order
    ring: _Ring | None = None
    layers: list[WeightGroup] | None = None  # sequential mode: one group per weight-owning module


# ----------------------------------------------------------------------------------------------------
# The offloader


class Offload:
    """The offloading of one pipeline: the weight groups, the hooks that move them, and their schedule.

    Build it with `apply`. `device` is where the model computes; the groups' home is the host.
    `events` (with `record=True`) lists ("fetch" | "prefetch" | "release", group name) in order:
    "fetch" is a copy made when the group is needed, "prefetch" one made ahead on the copy stream.
    """

    def __init__(
        self, mode: str, device: torch.device, lookahead: int = DEFAULT_LOOKAHEAD, record: bool = False,
        poison: bool = False,
    ) -> None:
        if mode not in ("model", "stream", "sequential"):
            raise ValueError(f"Offload runs mode 'model', 'stream' or 'sequential', not {mode!r}")
        if lookahead < 0:
            raise InputError(f"the offload look-ahead must be >= 0 blocks, got {lookahead}")
        self.mode, self.device, self.lookahead = mode, torch.device(device), lookahead
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda and mode == "stream" else None
        self.events: list[tuple[str, str]] | None = [] if record else None
        self.reason = ""  # what "auto" weighed, when it chose this mode
        self.components: dict[str, _Component] = {}
        self._poison = poison
        self._active: _Component | None = None
        self._hooks: list = []
        self._registered: list[torch.Tensor] = []
        # Page-locked ranges are unregistered when the offloader goes, before their memory is freed.
        self._finalizer = weakref.finalize(self, _unregister, self._registered)
        self._finalizer.atexit = False

    # -- host memory ---------------------------------------------------------------------------------

    def _allocate_host(self, nbytes: int) -> torch.Tensor:
        with torch.inference_mode(False):
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        if not self.cuda or nbytes == 0:
            return buffer
        status = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)
        if int(status) == 0:
            self._registered.append(buffer)
            return buffer
        warnings.warn(
            f"cudaHostRegister failed ({int(status)}); using PyTorch's pinned allocator, which rounds "
            "each buffer up to a power of two",
            stacklevel=2,
        )
        return buffer.pin_memory()

    @property
    def host_bytes(self) -> int:
        """Bytes of host memory the weight copies take (pinned on CUDA)."""
        return sum(g.host.numel() for g in self.groups())

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights themselves (without alignment)."""
        return sum(t.numel() * t.element_size() for g in self.groups() for t in g.tensors)

    def device_bytes(self) -> int:
        """Bytes of device buffers the offloader holds right now (fetched groups and ring buffers)."""
        total = 0
        for component in self.components.values():
            if component.ring is not None:
                total += sum(b.numel() for b in component.ring.buffers)
        return total + sum(g.device_buffer.numel() for g in self.groups() if g.device_buffer is not None)

    def groups(self) -> Iterator[WeightGroup]:
        for component in self.components.values():
            if component.rest is not None:
                yield component.rest
            yield from component.blocks or []
            yield from component.layers or []

    def where(self, name: str) -> str:
        """"device" or "host": where the group named `name` is now."""
        for group in self.groups():
            if group.name == name:
                return "device" if group.on_device or group.slot is not None else "host"
        raise KeyError(name)

    def _log(self, what: str, group: WeightGroup) -> None:
        if self.events is not None:
            self.events.append((what, group.name))

    # -- wiring ----------------------------------------------------------------------------------------

    def add_component(
        self, name: str, module: nn.Module, entries: list[nn.Module], blocks: nn.ModuleList | None = None
    ) -> None:
        """Offload `module`, which runs when one of `entries` (submodules or itself) is called; in
        "stream" mode `blocks` are streamed, in "sequential" mode every weight-owning module moves alone."""
        component = _Component(name)
        if self.mode == "sequential":
            component.layers = self._layer_groups(name, module)
        else:
            streamed = list(blocks) if (self.mode == "stream" and blocks is not None) else []
            in_blocks = {id(t) for b in streamed for t in _owned_tensors(b)}
            rest = [t for t in _owned_tensors(module) if id(t) not in in_blocks]
            component.rest = WeightGroup(name, rest, self._allocate_host, self._poison)
            component.blocks = []
            prefix = _child_name(module, blocks) if streamed else ""
            for i, block in enumerate(streamed):
                group = WeightGroup(f"{name}.{prefix}.{i}", _owned_tensors(block), self._allocate_host, self._poison)
                component.blocks.append(group)
                self._hooks.append(block.register_forward_pre_hook(self._block_pre_hook(component, i)))
                self._hooks.append(block.register_forward_hook(self._block_post_hook(component, i)))
        self.components[name] = component
        for entry in entries:
            self._hooks.append(
                entry.register_forward_pre_hook(self._entry_hook(component), with_kwargs=True, prepend=True)
            )

    def _layer_groups(self, name: str, module: nn.Module) -> list[WeightGroup]:
        # One group per module owning tensors directly; modules sharing a tensor (tied weights) share a
        # group, so whichever of them runs brings the tensor in.
        owners: dict[int, int] = {}  # tensor id -> cluster
        clusters: list[tuple[list[nn.Module], list[torch.Tensor], list[str]]] = []
        for path, sub in module.named_modules(remove_duplicate=True):
            own = _owned_tensors(sub, recurse=False)
            if not own:
                continue
            linked = sorted({owners[id(t)] for t in own if id(t) in owners})
            if linked:
                target = linked[0]
                for other in linked[1:]:  # merge clusters joined by this module
                    mods, tens, names = clusters[other]
                    clusters[target][0].extend(mods)
                    clusters[target][1].extend(t for t in tens if id(t) not in {id(x) for x in clusters[target][1]})
                    clusters[target][2].extend(names)
                    clusters[other] = ([], [], [])
                    for t in tens:
                        owners[id(t)] = target
            else:
                target = len(clusters)
                clusters.append(([], [], []))
            mods, tens, names = clusters[target]
            mods.append(sub)
            names.append(path)
            for t in own:
                if id(t) not in owners:
                    owners[id(t)] = target
                    tens.append(t)
        groups = []
        for mods, tens, names in clusters:
            if not mods:
                continue
            label = ".".join(p for p in (name, names[0]) if p)
            group = WeightGroup(label, tens, self._allocate_host, self._poison)
            groups.append(group)
            for sub in mods:
                self._hooks.append(sub.register_forward_pre_hook(self._layer_pre_hook(group)))
                self._hooks.append(sub.register_forward_hook(self._layer_post_hook(group)))
        return groups

    def _entry_hook(self, component: _Component):
        def hook(module, args, kwargs):
            if self.mode != "sequential":
                self._enter(component)
            # Inputs made on the weights' old device (T5's token ids follow `model.device`) follow them.
            return _to_device(args, self.device), _to_device(kwargs, self.device)

        return hook

    def _block_pre_hook(self, component: _Component, index: int):
        def hook(module, args):
            self._before_block(component, index)

        return hook

    def _block_post_hook(self, component: _Component, index: int):
        def hook(module, args, output):
            self._after_block(component, index)

        return hook

    def _layer_pre_hook(self, group: WeightGroup):
        def hook(module, args):
            if group.refs == 0:
                self._load(group)
            group.refs += 1

        return hook

    def _layer_post_hook(self, group: WeightGroup):
        def hook(module, args, output):
            group.refs -= 1
            if group.refs == 0:
                self._drop(group)

        return hook

    # -- the schedule ----------------------------------------------------------------------------------

    def _device_buffer(self, nbytes: int) -> torch.Tensor:
        # A normal tensor even inside inference mode, so a later forward outside it may refill it.
        with torch.inference_mode(False):
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def _load(self, group: WeightGroup) -> None:
        """Copy a group in on the compute stream (ordered before the kernels that read it)."""
        buffer = self._device_buffer(group.nbytes)
        group.copy_to(buffer)
        group.device_buffer = buffer
        group.attach(buffer)
        self._log("fetch", group)

    def _drop(self, group: WeightGroup) -> None:
        # Freeing the buffer is safe without events: the caching allocator hands it out again only to
        # work queued after this point on the same (compute) stream.
        group.detach()
        group.device_buffer = None
        self._log("release", group)

    def _enter(self, component: _Component) -> None:
        if self._active is component:
            return
        if self._active is not None:
            self._leave(self._active)
        self._active = component
        if component.rest is not None:
            self._load(component.rest)
        if component.blocks:
            slots = min(len(component.blocks), self.lookahead + 1)
            component.ring = _Ring(slots, max(g.nbytes for g in component.blocks), self._device_buffer)

    def _leave(self, component: _Component) -> None:
        for group in component.blocks or []:
            if group.slot is not None:
                self._wait(group)
                group.detach()
                group.slot = None
                self._log("release", group)
        component.ring = None  # every copy into it is waited for above, so freeing it is ordered
        if component.rest is not None and component.rest.on_device:
            self._drop(component.rest)
        for group in component.layers or []:
            if group.on_device:
                group.refs = 0
                self._drop(group)
        if self._active is component:
            self._active = None

    def _wait(self, group: WeightGroup) -> None:
        if group.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(group.ready)
            group.ready = None

    def _issue(self, component: _Component, index: int, ahead: bool) -> bool:
        """Start copying block `index` into a free ring buffer; False when none is free."""
        ring, group = component.ring, component.blocks[index]
        slot = ring.take()
        if slot is None:
            return False
        group.slot = slot
        buffer = ring.buffers[slot]
        if ahead and self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                if ring.released[slot] is not None:  # the compute stream is done with the buffer's last block
                    self.copy_stream.wait_event(ring.released[slot])
                group.copy_to(buffer)
                group.ready = torch.cuda.Event()
                group.ready.record(self.copy_stream)
        else:
            group.copy_to(buffer)  # on the compute stream, after whatever last read the buffer
        self._log("prefetch" if ahead else "fetch", group)
        return True

    def _before_block(self, component: _Component, index: int) -> None:
        self._enter(component)
        blocks, group = component.blocks, component.blocks[index]
        if group.slot is None:
            if not component.ring.free:  # called out of order: make room by dropping a prefetched block
                victim = next(g for g in blocks if g.slot is not None and g is not group)
                self._wait(victim)
                component.ring.give(victim.slot, None)
                victim.slot = None
                self._log("release", victim)
            self._issue(component, index, ahead=False)
        # Keep the next `lookahead` blocks coming, wrapping round to the next forward's first ones.
        for step in range(1, self.lookahead + 1):
            following = (index + step) % len(blocks)
            if following == index:
                break
            if blocks[following].slot is None and not self._issue(component, following, ahead=True):
                break
        self._wait(group)
        group.attach(component.ring.buffers[group.slot])

    def _after_block(self, component: _Component, index: int) -> None:
        group = component.blocks[index]
        group.detach()
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        component.ring.give(group.slot, event)
        group.slot = None
        self._log("release", group)

    # -- lifecycle -------------------------------------------------------------------------------------

    def release_all(self) -> None:
        """Send every weight home (after a generation, or after an error left some on the device)."""
        for component in self.components.values():
            self._leave(component)
        self._active = None

    def remove(self) -> None:
        """Undo the offloading: no hooks, every weight on the host (unpinned) as plain tensors."""
        self.release_all()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for group in self.groups():
            group.detach()
            with torch.no_grad():
                for t in group.tensors:
                    t.data = t.data.clone()  # off the page-locked buffer, which is about to go
        self._finalizer()


def _unregister(buffers: list[torch.Tensor]) -> None:
    for buffer in buffers:
        try:
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
        except Exception:  # the CUDA context may already be gone
            pass
    buffers.clear()


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    for name, module in parent.named_modules():
        if module is child:
            return name
    raise ValueError("the streamed blocks must be a submodule of the component")


def _to_device(value, device: torch.device):
    """`value` with its tensors on `device`. Containers are rebuilt only when a tensor in them moved: the
    VAE passes its frame cache as a dict that the callee fills in place, so it must stay the same object."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, (tuple, list)):
        moved = [_to_device(v, device) for v in value]
        if all(a is b for a, b in zip(moved, value)):
            return value
        return type(value)(moved) if isinstance(value, list) else tuple(moved)
    if isinstance(value, dict):
        moved = {k: _to_device(v, device) for k, v in value.items()}
        if all(moved[k] is v for k, v in value.items()):
            return value
        return moved
    return value


# ----------------------------------------------------------------------------------------------------
# Applying it to a pipeline


def text_blocks(text_model: nn.Module) -> nn.ModuleList | None:
    """The T5 encoder's blocks (`encoder.block`), streamed in "stream" mode."""
    encoder = getattr(text_model, "encoder", None)
    return getattr(encoder, "block", None)


def apply(
    pipe,
    mode: str,
    device: torch.device | str,
    *,
    text_device: torch.device | str | None = None,
    lookahead: int = DEFAULT_LOOKAHEAD,
    record: bool = False,
    poison: bool = False,
) -> Offload | None:
    """Place the pipeline's components for `mode` ("none", "model", "stream" or "sequential"), computing
    on `device`; T5 lives and runs on `text_device` (e.g. "cpu") when one is given. Returns the `Offload`
    (None for "none"). The components may be anywhere to start with; weights end on the host (offloaded
    ones) or on the device (resident ones)."""
    device = torch.device(device)
    text_model = pipe.text_encoder.model
    if text_device is not None:
        text_model.to(text_device)
    if mode == "none":
        pipe.transformer.to(device)
        pipe.vae.to(device)
        if text_device is None:
            text_model.to(device)
        return None
    offload = Offload(mode, device, lookahead, record=record, poison=poison)
    if text_device is None:  # else T5 stays where it was put, unmanaged
        offload.add_component("text_encoder", text_model, [text_model], text_blocks(text_model))
    offload.add_component("transformer", pipe.transformer, [pipe.transformer], pipe.transformer.transformer_blocks)
    offload.add_component("vae", pipe.vae, [pipe.vae.encoder, pipe.vae.decoder])
    return offload


# ----------------------------------------------------------------------------------------------------
# Sizes, estimates and the automatic choice


@dataclass(frozen=True)
class ComponentSize:
    """Bytes of one component's weights: all, outside its streamed blocks, its largest block (and how
    many blocks), and its largest single weight-owning module."""

    total: int
    rest: int
    block: int
    blocks: int
    layer: int


def size_from_tensors(nbytes: Mapping[str, int], block_prefix: str | None = None) -> ComponentSize:
    """The `ComponentSize` of a state dict given as {key: bytes}; blocks are the keys `{block_prefix}.{i}.`."""
    pattern = re.compile(rf"^{re.escape(block_prefix)}\.(\d+)\.") if block_prefix else None
    per_block: dict[str, int] = {}
    per_layer: dict[str, int] = {}
    rest = 0
    for key, size in nbytes.items():
        per_layer[key.rpartition(".")[0]] = per_layer.get(key.rpartition(".")[0], 0) + size
        match = pattern.match(key) if pattern else None
        if match:
            per_block[match.group(1)] = per_block.get(match.group(1), 0) + size
        else:
            rest += size
    return ComponentSize(
        total=sum(nbytes.values()),
        rest=rest,
        block=max(per_block.values(), default=0),
        blocks=len(per_block),
        layer=max(per_layer.values(), default=0),
    )


def _module_bytes(module: nn.Module) -> dict[str, int]:
    seen, sizes = set(), {}
    for key, t in [*module.named_parameters(), *module.named_buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            sizes[key] = t.numel() * t.element_size()
    return sizes


def pipeline_sizes(pipe) -> dict[str, ComponentSize]:
    """The `ComponentSize` of each component of a built pipeline."""
    return {
        "text_encoder": size_from_tensors(_module_bytes(pipe.text_encoder.model), "encoder.block"),
        "transformer": size_from_tensors(_module_bytes(pipe.transformer), "transformer_blocks"),
        "vae": size_from_tensors(_module_bytes(pipe.vae)),
    }


def folder_sizes(folder: Path, dtype: torch.dtype) -> dict[str, ComponentSize]:
    """The same, from a model folder's safetensors headers, for weights loaded in `dtype` (nothing is read
    but the headers, so "auto" can choose before loading)."""
    from safetensors import safe_open

    from cogvideox import loading

    itemsize = torch.empty((), dtype=dtype).element_size()
    found = {}
    for name, stem, prefix in (
        ("text_encoder", "model", "encoder.block"),
        ("transformer", loading.DIFFUSERS_WEIGHTS, "transformer_blocks"),
        ("vae", loading.DIFFUSERS_WEIGHTS, None),
    ):
        sizes = {}
        for path in loading.weight_files(Path(folder) / name, stem):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    sizes[key] = torch.Size(f.get_slice(key).get_shape()).numel() * itemsize
        if name == "text_encoder":
            # Only the encoder runs; its token embedding is tied to `shared.weight`.
            sizes = {k: v for k, v in sizes.items() if not k.startswith(("decoder.", "encoder.embed_tokens."))}
        found[name] = size_from_tensors(sizes, prefix)
    return found


# Peak activation bytes per pixel of one decoded video for the untiled VAE decoder in a 2-byte dtype:
# about 18 GB at 480x720 (the figure behind models/vae_tiling.py), i.e. ~52 kB per pixel. The decoder
# works on a few latent frames at a time, so the frame count does not enter.
_DECODE_BYTES_PER_PIXEL = 52_000
# Live [tokens, width] tensors at the transformer's peak (residual streams, q/k/v, the 4x MLP), per sample.
_TRANSFORMER_LIVE_WIDTHS = 12


def activation_bytes(
    transformer_config,
    itemsize: int,
    frames: int,
    height: int,
    width: int,
    batch: int = 1,
    guidance: bool = True,
    tile: tuple[int, int] | None = None,
    slicing: bool = False,
    temporal_compression: int = 4,
    spatial_compression: int = 8,
) -> dict[str, int]:
    """Rough peak activation bytes per stage ("text", "denoise", "decode") for a request of that size;
    `tile` is the VAE's tile size in pixels when tiling is on. Estimates, for choosing a mode."""
    c = transformer_config
    samples = batch * (2 if guidance else 1)
    latent_frames = (frames - 1) // temporal_compression + 1
    pt = c.patch_size_t or 1
    tokens = c.max_text_seq_length + (-(-latent_frames // pt)) * (height // spatial_compression // c.patch_size) * (
        width // spatial_compression // c.patch_size
    )
    denoise = samples * tokens * c.inner_dim * itemsize * _TRANSFORMER_LIVE_WIDTHS
    text = samples * c.max_text_seq_length * c.text_embed_dim * itemsize * 8
    pixels = height * width if tile is None else min(height * width, tile[0] * tile[1])
    decode = int(pixels * _DECODE_BYTES_PER_PIXEL * itemsize / 2) * (1 if slicing else batch)
    return {"text": text, "denoise": denoise, "decode": decode}


_STAGE_COMPONENT = {"text": "text_encoder", "denoise": "transformer", "decode": "vae", "encode": "vae"}


def resident_weight_bytes(
    mode: str, stage: str, sizes: Mapping[str, ComponentSize], lookahead: int = DEFAULT_LOOKAHEAD,
    text_on_device: bool = True,
) -> int:
    """Weight bytes on the device while `stage` runs in `mode`."""
    on_device = [n for n in sizes if n != "text_encoder" or text_on_device]
    if mode == "none":
        return sum(sizes[n].total for n in on_device)
    name = _STAGE_COMPONENT[stage]
    if name not in on_device:
        return 0
    size = sizes[name]
    if mode == "model" or (mode == "stream" and not size.blocks):
        return size.total
    if mode == "stream":
        return size.rest + min(size.blocks, lookahead + 1) * size.block
    return size.layer


def estimated_peak(mode, sizes, activations, lookahead=DEFAULT_LOOKAHEAD, text_on_device=True) -> int:
    """Weights on the device plus activations, at the worst stage."""
    return max(
        resident_weight_bytes(mode, stage, sizes, lookahead, text_on_device) + activations[stage]
        for stage in ("text", "denoise", "decode")
    )


def choose_mode(
    sizes: Mapping[str, ComponentSize],
    activations: Mapping[str, int],
    free_bytes: int,
    lookahead: int = DEFAULT_LOOKAHEAD,
    text_on_device: bool = True,
    headroom: float = 0.9,
    vae_tiling: bool = False,
) -> tuple[str, str]:
    """The fastest mode whose estimated peak fits in `headroom` x `free_bytes`, and a sentence saying why."""
    budget = int(free_bytes * headroom)
    peaks = {m: estimated_peak(m, sizes, activations, lookahead, text_on_device) for m in MODES}
    needs = ", ".join(f"{m!r} ~{peaks[m] / _GIB:.1f} GiB" for m in MODES)
    for mode in MODES:
        if peaks[mode] <= budget:
            return mode, f"offload {mode!r}: {free_bytes / _GIB:.1f} GiB free on the device; estimated peaks {needs}"
    hint = "" if vae_tiling else "; --vae-tiling cuts the VAE decoder's share"
    return "sequential", (
        f"offload 'sequential': {free_bytes / _GIB:.1f} GiB free on the device is less than even "
        f"'sequential' is estimated to need (peaks {needs}){hint}"
    )


def free_device_memory(device: torch.device) -> int:
    """Bytes the device has free now, counting what PyTorch's allocator holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def default_activations(transformer_config, vae_config, dtype, tile=None, slicing=False) -> dict[str, int]:
    """`activation_bytes` for one video of the model's default size with guidance (what "auto" plans for)."""
    from cogvideox.request import default_size

    height, width = default_size(transformer_config, vae_config)
    return activation_bytes(
        transformer_config,
        torch.empty((), dtype=dtype).element_size(),
        transformer_config.sample_frames,
        height,
        width,
        tile=tile,
        slicing=slicing,
        temporal_compression=vae_config.temporal_compression,
        spatial_compression=vae_config.spatial_compression,
    )


def _choose_on(device, sizes_fn, transformer_config, vae_config, dtype, text_device, tile, slicing, lookahead):
    device = torch.device(device)
    if device.type != "cuda":
        return "none", "offload 'none': the model computes on the CPU"
    text_on_device = text_device is None or torch.device(text_device) == device
    activations = default_activations(transformer_config, vae_config, dtype, tile, slicing)
    mode, reason = choose_mode(
        sizes_fn(), activations, free_device_memory(device), lookahead, text_on_device, vae_tiling=tile is not None
    )
    log.info(reason)
    return mode, reason


def choose_for_folder(
    folder: Path, configs, dtype: torch.dtype, device, text_device=None, vae_tiling: bool = False,
    vae_slicing: bool = False, lookahead: int = DEFAULT_LOOKAHEAD,
) -> tuple[str, str]:
    """"auto" for a model folder not loaded yet (`configs`: `loading.read_model_configs`): (mode, why)."""
    tile = (configs.vae.sample_height // 2, configs.vae.sample_width // 2) if vae_tiling else None
    return _choose_on(
        device, lambda: folder_sizes(folder, dtype), configs.transformer, configs.vae, dtype, text_device, tile,
        vae_slicing, lookahead,
    )


def choose_for_pipeline(pipe, device, text_device=None, lookahead: int = DEFAULT_LOOKAHEAD) -> tuple[str, str]:
    """"auto" for a built pipeline, with its VAE's tiling and slicing settings: (mode, why)."""
    vae = pipe.vae
    tile = (vae.tiling.sample_height, vae.tiling.sample_width) if vae.use_tiling else None
    return _choose_on(
        device, lambda: pipeline_sizes(pipe), pipe.config, vae.config, pipe.dtype, text_device, tile,
        vae.use_slicing, lookahead,
    )


# ----------------------------------------------------------------------------------------------------
# Running out of memory anyway

_STAGE_LABELS = {
    "text": "text encoding (T5)",
    "encode": "VAE encoding of the input",
    "denoise": "denoising (transformer)",
    "decode": "VAE decoding",
}
_SIZE = re.compile(r"([\d.]+)\s*(B|KiB|MiB|GiB|TiB)")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def parse_oom(message: str) -> tuple[int | None, int | None]:
    """(bytes asked, bytes free) from PyTorch's CUDA out-of-memory message, None where absent."""

    def find(pattern: str) -> int | None:
        match = re.search(pattern, message)
        if not match:
            return None
        size = _SIZE.match(match.group(1))
        return int(float(size.group(1)) * _UNITS[size.group(2)]) if size else None

    asked = find(r"[Tt]ried to allocate ([\d.]+\s*[KMGT]?i?B)")
    free = find(r"of which ([\d.]+\s*[KMGT]?i?B) is free")
    return asked, free


def suggest(
    stage: str,
    mode: str,
    sizes: Mapping[str, ComponentSize],
    deficit: int | None,
    *,
    lookahead: int = DEFAULT_LOOKAHEAD,
    text_on_device: bool = True,
    vae_tiling: bool = False,
    vae_slicing: bool = False,
    batch: int = 1,
) -> str:
    """The first setting that frees at least `deficit` bytes in `stage` (output unchanged ones first)."""
    now = resident_weight_bytes(mode, stage, sizes, lookahead, text_on_device)
    stronger = MODES[MODES.index(mode) + 1 :] if mode in MODES else ()
    for candidate in stronger:
        freed = now - resident_weight_bytes(candidate, stage, sizes, lookahead, text_on_device)
        if freed > 0 and (deficit is None or freed >= deficit):
            return f"--offload {candidate}"
    if stage == "text" and text_on_device:
        return "--text-device cpu"
    if stage in ("decode", "encode"):
        if not vae_tiling:
            return "--vae-tiling"
        if batch > 1 and not vae_slicing:
            return "--vae-slicing"
    return "fewer --frames, a smaller --height/--width" + (" or fewer --num-videos" if batch > 1 else "")


@contextlib.contextmanager
def oom_guard(stage: str, pipe, batch: int = 1) -> Iterator[None]:
    """Turn a CUDA out-of-memory error in `stage` into an `OutOfMemoryError` that says the stage, how
    much was asked and which setting would fit. Offloaded weights go home on any error."""
    offload = getattr(pipe, "offload", None)
    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        message = str(error)
        # The traceback's frames hold the activations that filled the device; let them go.
        error.__traceback__ = None
    except BaseException:
        if offload is not None:
            offload.release_all()
        raise
    else:
        return
    if offload is not None:
        offload.release_all()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise out_of_memory(stage, message, pipe, batch)


def out_of_memory(stage: str, message: str, pipe, batch: int = 1) -> OutOfMemoryError:
    """The `OutOfMemoryError` for PyTorch's `message` raised in `stage` of `pipe`."""
    asked, free = parse_oom(message)
    offload = getattr(pipe, "offload", None)
    mode = offload.mode if offload is not None else "none"
    lookahead = offload.lookahead if offload is not None else DEFAULT_LOOKAHEAD
    managed = offload is not None and "text_encoder" in offload.components
    text_on_device = managed or pipe.text_encoder.model.device == pipe.device
    deficit = None if asked is None else asked - (free or 0)
    advice = suggest(
        stage,
        mode,
        pipeline_sizes(pipe),
        deficit,
        lookahead=lookahead,
        text_on_device=text_on_device,
        vae_tiling=pipe.vae.use_tiling,
        vae_slicing=pipe.vae.use_slicing,
        batch=batch,
    )
    amounts = ""
    if asked is not None:
        amounts = f": it asked for {asked / _GIB:.2f} GiB more"
        if free is not None:
            amounts += f" with {free / _GIB:.2f} GiB free"
    text = f"out of GPU memory in {_STAGE_LABELS.get(stage, stage)}{amounts} (offload {mode}); try {advice}"
    return OutOfMemoryError(text, stage=stage, requested_bytes=asked, suggestion=advice)
