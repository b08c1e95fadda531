"""Activations saved for the backward pass, kept in pinned host memory (`offload_activations`).

    saves = HostSaves(model)                   # one per forward pass
    for block in blocks:
        with saves:                            # autograd's saved tensors go through it
            video, text = checkpoint(...)

Forward: each saved tensor is copied to pinned host memory on a copy stream, once the compute stream has
produced it; the allocator is told that the copy stream uses its memory, so the compute stream frees it
as soon as it is done with it and the copy runs alongside the next block's compute.

Backward: autograd asks for the saved tensors about in the reverse order of saving (the last block's
first, though within a block in an order of its own). Asking for tensor i starts, on the copy stream,
the copies back of i and of the tensors saved before it that it has not handed over yet (which the next
blocks back will ask for), until `ahead_bytes` of them are on their way or waiting (256 MiB: a 5B
block's inputs take 109 MB, 226 MB with its kept attention results, so a block or more ahead), then
makes the compute stream (not the host) wait for i's copy. So the copies back run ahead of the recompute that needs them, each once; a copy back leaves the
device when handed over as many times as it was saved, and at the latest when the backward pass ends.

A tensor saved again while it still lives (the RoPE tables, which a compiled block saves for its
backward pass) is copied once. Kept on the device instead: the model's weights, parameters and buffers
(a compiled graph saves the weights its backward reads, the int8 ones and their scales of a quantised
base included: copying them would move the model each step) and, on a GPU, tensors
under 1 MiB (copies that cost more than they free). On the CPU there are no streams: each saved tensor
is copied once, as on a GPU (a fresh tensor, so the original is freed), and the bookkeeping is the one
the tests check. The values are untouched: the backward pass computes what it would with the tensors
left in place.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

SMALL_BYTES = 1 << 20  # saved tensors below this stay where they are
AHEAD_BYTES = 256 << 20  # copies back started ahead of the tensor asked for, at most (about)


def _span(t: torch.Tensor) -> int:
    """How many elements of `t`'s storage its view reaches, from its first: its numel for a dense
    tensor, more for a slice of a larger one (the gaps between rows), less for a broadcast one."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def _to_host(t: torch.Tensor, stream=None) -> tuple[torch.Tensor, tuple, torch.device]:
    """A host copy of a saved tensor, with what rebuilds it on the way back (sizes, strides, the reach of
    storage they need) and the device it comes back to. Always fresh memory, so the original can be
    freed. The strides come back as the original's exactly, a slice's included: a compiled backward
    pass asserts the strides of the tensors it saved, and block 0's inputs are slices of the embedded
    sequence. What crosses: the storage the view reaches in one run, unless that is over a quarter more
    than its elements (the text slice of a batch, which spans the video rows between), then the
    elements alone. From a GPU: pinned, on `stream` after the current stream's work so far, and `t`'s
    memory marked as in use by `stream` until the copy is done."""
    span = _span(t)
    t = t.detach()
    source = t.as_strided((span,), (1,)) if span <= 1.25 * t.numel() else t  # a run of storage, or the elements
    host = torch.empty(source.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
    view = (tuple(t.shape), tuple(t.stride()), span)
    if stream is None:
        host.copy_(source)
        return host, view, t.device
    stream.wait_stream(torch.cuda.current_stream(t.device))
    with torch.cuda.stream(stream):
        host.copy_(source, non_blocking=True)
    t.record_stream(stream)
    return host, view, t.device


def _from_host(host: torch.Tensor, view: tuple, device: torch.device) -> torch.Tensor:
    """The saved tensor again on `device`, with its original sizes and strides (see `_to_host`)."""
    shape, stride, span = view
    if host.dim() == 1 and host.numel() == span:  # a run of storage: the view over it
        return host.to(device, non_blocking=True).as_strided(shape, stride)
    out = torch.empty(span, dtype=host.dtype, device=device).as_strided(shape, stride)
    return out.copy_(host, non_blocking=True)  # the elements, into their places


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    """`t`'s memory, or None for a tensor without storage of its own (a DTensor of a sharded model, say:
    such tensors are kept as they are)."""
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class HostSaves(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep the saved activations of one forward pass in host memory (see the
    module's docstring). `model`: whose weights (parameters and buffers) stay on the device. The copies
    back run ahead of the tensor asked for by up to `ahead_bytes`, and, if given, `lookahead` tensors.

    The hooks are the methods of a `_Copies` that does not refer back to this object: autograd's graph
    holds the hooks, so the host copies live exactly as long as the graph (a hook bound to this object
    would make a reference cycle, and the copies, with any copy back not yet asked for, would wait for
    Python's cycle collector, steps later)."""

    def __init__(self, model: nn.Module | None = None, lookahead: int | None = None, ahead_bytes: int = AHEAD_BYTES):
        self.copies = _Copies(model, lookahead, ahead_bytes)
        super().__init__(self.copies.pack, self.copies.unpack)

    def stats(self) -> dict:
        """Tensors copied to the host and their bytes, the bytes of saved tensors kept on the device
        (small ones, or without storage of their own; the weights are not counted), and how many copies
        back have started so far (after a backward pass: as many as were copied). The dict is kept up to
        date: held from the end of the forward pass, it shows the backward pass's copies back too."""
        return self.copies.stats()

    @property
    def fetched(self) -> list[int]:
        """Indices of the saved tensors in the order their copies back started."""
        return self.copies.fetched


class _Copies:
    """The host copies of one forward pass's saved tensors and their copies back (see the module's
    docstring).

    A saved tensor is handed back as many times as it was saved (a table that every block saves is one
    copy, asked for once per block): its copy back stays on the device until then, and the lookahead
    skips tensors already handed over, so each copy back starts once. Whatever was copied back and never
    asked for is dropped when the backward pass ends."""

    def __init__(self, model: nn.Module | None, lookahead: int | None, ahead_bytes: int) -> None:
        self.lookahead = lookahead
        self.ahead_bytes = ahead_bytes
        # Parameters and buffers: a quantised linear's int8 weights and scales are buffers.
        held = itertools.chain(model.parameters(), model.buffers()) if model is not None else ()
        weights = (_storage(t) for t in held)
        self._weights = {storage.data_ptr() for storage in weights if storage is not None}
        self._saved: list[tuple[torch.Tensor, tuple, torch.device]] = []  # by index: what _to_host returns
        self._uses: list[int] = []  # by index: how many times it was saved
        self._left: dict[int, int] = {}  # copied back: how many more times it will be asked for
        self._back: dict[int, tuple[torch.Tensor, object]] = {}  # copied back, still wanted: (tensor, event)
        self._streams: dict[torch.device, object] = {}
        self._seen: dict[tuple, tuple[weakref.ref, int]] = {}  # tensors saved so far, while they live
        self._cleanup_queued = False
        self.fetched: list[int] = []  # indices in the order their copies back started
        # What this pass saved (bytes copied to the host, bytes left on the device, weights aside) and
        # how many copies back started: kept up to date, so a caller holding it sees the backward's too.
        self.counts = {"copied": 0, "copied_bytes": 0, "kept_bytes": 0, "copied_back": 0}

    def stats(self) -> dict:
        return self.counts

    def _stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def pack(self, t: torch.Tensor):
        storage = _storage(t)
        if storage is not None and storage.data_ptr() in self._weights:
            return t  # a weight: kept, and not counted
        if storage is None or t.numel() == 0 or (t.is_cuda and storage.nbytes() < SMALL_BYTES):
            self.counts["kept_bytes"] += t.numel() * t.element_size()
            return t  # kept as it is
        key = (t.data_ptr(), t.shape, t.stride(), t.dtype)
        seen = self._seen.get(key)
        if seen is not None and seen[0]() is not None:
            self._uses[seen[1]] += 1
            return seen[1]  # the same tensor, still alive, saved again (a table every block saves): one copy
        self._saved.append(_to_host(t, self._stream(t.device)))
        self._uses.append(1)
        self.counts["copied"] += 1
        self.counts["copied_bytes"] += self._saved[-1][0].nbytes  # what crosses to the host
        self._seen[key] = (weakref.ref(t), len(self._saved) - 1)
        return len(self._saved) - 1

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        self._drop_leftovers_after_backward()
        self._fetch(packed)
        ahead = ahead_bytes = 0
        for i in range(packed - 1, -1, -1):  # the tensors saved before it, not yet handed over
            if ahead == self.lookahead or ahead_bytes >= self.ahead_bytes:
                break
            if self._left.get(i, 1) > 0:
                self._fetch(i)  # (or already on its way)
                ahead += 1
                ahead_bytes += self._saved[i][0].nbytes
        tensor, event = self._back[packed]
        self._left[packed] -= 1
        if self._left[packed] == 0:
            del self._back[packed]  # handed over as many times as it was saved
        if event is not None:
            current = torch.cuda.current_stream(tensor.device)
            current.wait_event(event)
            tensor.record_stream(current)  # allocated on the copy stream, used on this one
        return tensor

    def _fetch(self, index: int) -> None:
        """Start the copy back of saved tensor `index` (unless it is under way or already here)."""
        if index in self._back:
            return
        host, view, device = self._saved[index]
        self.fetched.append(index)
        self.counts["copied_back"] += 1
        self._left[index] = self._uses[index]  # asked again after that (a second backward): copied again
        stream = self._stream(device)
        if stream is None:  # on the CPU: no copy stream
            self._back[index] = (_from_host(host, view, device), None)
            return
        with torch.cuda.stream(stream):
            tensor = _from_host(host, view, device)
            event = stream.record_event()
        self._back[index] = (tensor, event)

    def _drop_leftovers_after_backward(self) -> None:
        """Once per backward pass: at its end, drop copies back that nothing asked for (a saved tensor
        whose node the pass did not reach). Outside a backward pass (a saved tensor read directly)
        there is no end to wait for."""
        if self._cleanup_queued:
            return
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        except RuntimeError:
            return
        self._cleanup_queued = True

    def _end_of_backward(self) -> None:
        self._back.clear()
        self._left.clear()
        self._cleanup_queued = False
