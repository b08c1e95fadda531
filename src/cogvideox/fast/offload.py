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
- "auto": `memory_plan.choose_mode` picks the fastest mode whose estimated peak fits the free device
  memory, turning VAE tiling on when only the decode is in the way (the estimates live there; `oom`
  explains an out-of-memory error that happens anyway).

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

import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from cogvideox.errors import InputError

MODES = ("none", "model", "stream", "sequential")
CHOICES = (*MODES, "auto")
DEFAULT_LOOKAHEAD = 2

_ALIGN = 256  # bytes; every tensor of a flat buffer starts on this boundary (what CUDA kernels like)


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


# A tensor's place in a flat buffer: byte offset, dtype, shape, and strides (None: contiguous).
Slot = tuple[int, torch.dtype, torch.Size, tuple[int, ...] | None]


def _view(flat: torch.Tensor, slot: Slot) -> torch.Tensor:
    offset, dtype, shape, strides = slot
    size = shape.numel() * torch.empty((), dtype=dtype).element_size()
    typed = flat[offset : offset + size].view(dtype)
    return typed.view(shape) if strides is None else typed.as_strided(shape, strides)


def _strides(t: torch.Tensor) -> tuple[int, ...] | None:
    """The strides to keep for `t`'s copy: a channels-last weight stays channels-last (cogvideox.fast.vae
    makes the VAE's convolutions so on CUDA); anything else is packed contiguous."""
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    if layout is not None and t.is_contiguous(memory_format=layout) and not t.is_contiguous():
        return t.stride()
    return None


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
        self.layout: list[Slot] = []
        offset = 0
        for t in tensors:
            if type(t) not in (torch.Tensor, nn.Parameter):
                raise TypeError(
                    f"{name}: cannot offload a {type(t).__name__} weight; apply offloading to plain tensors "
                    "(int8 weights stored as int8 tensors with their scales are fine)"
                )
            offset = _aligned(offset)
            self.layout.append((offset, t.dtype, t.shape, _strides(t)))
            offset += t.numel() * t.element_size()
        self.nbytes = _aligned(offset) if tensors else 0
        self.host = allocate_host(self.nbytes)  # uint8 [nbytes], page-locked on CUDA
        with torch.no_grad():
            for t, slot in zip(tensors, self.layout):
                view = _view(self.host, slot)
                view.copy_(t.detach())
                t.data = view  # the old storage goes as soon as nothing else holds it
        self._parked = [t.data for t in tensors]
        if poison:
            nan = torch.full((self.nbytes,), 255, dtype=torch.uint8)  # 0xFF.. is NaN in every float type
            self._parked = [_view(nan, slot) for slot in self.layout]
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
        for t, slot in zip(self.tensors, self.layout):
            t.data = _view(buffer, slot)

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
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
            raise InputError(f"the offload look-ahead must be a whole number of blocks >= 0, got {lookahead!r}")
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
        whole: list[str] = []  # modules whose own code reads their children's weights (see below)
        for path, sub in module.named_modules(remove_duplicate=True):
            if any(path.startswith(prefix) for prefix in whole):
                continue  # moved with the enclosing module
            # A module marked `offload_as_one` (a VAE block fused by cogvideox.fast.vae) reads its
            # children's weights without calling them, so their hooks would never run: all its weights
            # move with it.
            as_one = getattr(sub, "offload_as_one", False)
            if as_one:
                whole.append(f"{path}.")
            own = _owned_tensors(sub, recurse=as_one)
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
        """Undo the offloading: no hooks, every weight on the host (unpinned) as plain tensors.

        Each group's packed copy is freed as soon as its tensors have their own, so that undoing the
        offload (as `accelerate` and `load_lora` do around their change) needs the weights plus one group
        of host memory, not twice the weights.
        """
        self.release_all()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for group in self.groups():
            with torch.no_grad():
                for t, slot in zip(group.tensors, group.layout):
                    t.data = _view(group.host, slot).clone()  # the real values, also under `poison`
            self._free_host(group)
        self._finalizer()

    def _free_host(self, group: WeightGroup) -> None:
        """Let `group`'s packed host copy go now (unregistered first when it is page-locked in place)."""
        for i, buffer in enumerate(self._registered):
            if buffer is group.host:
                _unregister([self._registered.pop(i)])
                break
        group.host = torch.empty(0, dtype=torch.uint8)
        group._parked = []


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
