"""AdamW with its fp32 master weights and moments in CPU memory, for full fine-tuning on one GPU.

The GPU holds only the (bf16) weights and their gradients; each step copies the gradients to the CPU,
updates the fp32 masters there and copies them back. That trades step time for ~12 bytes per weight of
GPU memory, which is what lets a full fine-tune of 5B fit on one GPU.

The step time is memory traffic on the host (5B: 22 GB of masters, 44 GB of moments, 22 GB of fp32
gradients), so the layout is chosen for it: the gradients arrive by DMA into pinned memory allocated once,
and the update is PyTorch's fused CPU AdamW, one multithreaded pass over each tensor in place of the
for-loop implementation's dozen passes and temporaries.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

ARENA_BYTES = 1 << 30  # pinned buffers are allocated in blocks of this size (a power of two: see `packed`)
ALIGN_BYTES = 64  # each packed tensor starts on a cache line


def packed(shapes: list[torch.Size], dtype: torch.dtype, pin: bool) -> list[torch.Tensor]:
    """Uninitialised CPU tensors of `shapes`, laid out in a few large buffers, pinned if `pin`.

    PyTorch's caching host allocator rounds every pinned allocation up to a power of two, so one pinned
    tensor per weight would pin 39.6 GB for 5B's 22.3 GB of fp32 masters (a 151 MB feed-forward weight
    takes 256 MB). Packed first-fit, largest first, into `ARENA_BYTES` blocks, only the unfilled end of
    each block (and the rounding of the last one) is lost.
    """
    item = dtype.itemsize
    align, capacity = ALIGN_BYTES // item, ARENA_BYTES // item
    sizes = [-(-max(s.numel(), 1) // align) * align for s in map(torch.Size, shapes)]
    used: list[int] = []  # elements taken in each buffer
    place: list[tuple[int, int]] = [(0, 0)] * len(shapes)  # (buffer, offset) of each tensor
    for i in sorted(range(len(shapes)), key=lambda i: -sizes[i]):
        b = next((b for b, u in enumerate(used) if u + sizes[i] <= capacity), len(used))
        if b == len(used):
            used.append(0)  # a tensor larger than a block gets a buffer of its own size
        place[i] = (b, used[b])
        used[b] += sizes[i]
    buffers = [torch.empty(u, dtype=dtype, pin_memory=pin) for u in used]
    return [buffers[b][o : o + torch.Size(s).numel()].view(s) for s, (b, o) in zip(shapes, place)]


@functools.cache
def cpu_adamw_options() -> dict:
    """The AdamW implementation for CPU tensors, chosen once: `fused=True` where this PyTorch has the CPU
    kernel (2.4 and later), else the for-loop one. Not `foreach`: on the CPU it is the same per-tensor
    kernels, and its temporaries span every tensor at once (another 22 GB for 5B)."""
    probe = torch.zeros(2, requires_grad=True)
    probe.grad = torch.ones(2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.optim.AdamW([probe], fused=True).step()
    except (RuntimeError, TypeError, ValueError):
        return {"foreach": False}
    return {"fused": True}


class CPUOffloadAdamW:
    """AdamW whose fp32 master weights and moments live in CPU memory (see the module's docstring).

    What it computes is `torch.optim.AdamW` on fp32 copies of the weights, fed the gradients converted to
    fp32; the weights are the masters rounded to their dtype after each step. CPU memory: the masters
    (pinned when the weights are on a GPU), two moments and an fp32 gradient buffer, 16 bytes per weight,
    plus a pinned staging buffer for the gradients in their own dtype (2 bytes per bf16 weight).
    Transfers run on each device's current stream.
    """

    def __init__(self, params: list[nn.Parameter], **kwargs) -> None:
        self.params = params
        shapes = [p.shape for p in params]
        self.devices = sorted({p.device for p in params if p.device.type == "cuda"}, key=str)
        # Where each gradient lands from its GPU (in its own dtype), and its fp32 copy the update reads.
        staged = [i for i, p in enumerate(params) if p.device.type == "cuda"]
        self.staging: list[torch.Tensor | None] = [None] * len(params)
        for dtype in {params[i].dtype for i in staged}:
            same = [i for i in staged if params[i].dtype == dtype]
            for i, t in zip(same, packed([shapes[i] for i in same], dtype, pin=True)):
                self.staging[i] = t
        pin = bool(self.devices)  # pinned memory is for DMA to and from a GPU
        self.masters = packed(shapes, torch.float32, pin)
        with torch.no_grad():
            for m, weight in zip(self.masters, self._download([p.detach() for p in params])):
                m.copy_(weight)
        for m in self.masters:
            m.requires_grad_(True)
        self.grads = [torch.empty(s, dtype=torch.float32) for s in shapes]
        if "fused" not in kwargs and "foreach" not in kwargs:
            kwargs |= cpu_adamw_options()
        self.inner = torch.optim.AdamW(self.masters, **kwargs)
        self.implementation = {k: self.inner.defaults[k] for k in ("fused", "foreach")}

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups  # load_state_dict replaces the list: never hold on to it

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self._gather_gradients()
        self.inner.step()
        for p, m in zip(self.params, self.masters):
            p.copy_(m.to(p.device, non_blocking=True))

    def _gather_gradients(self) -> None:
        """Each master's `.grad`: its weight's gradient in fp32, or None where the weight has none (AdamW
        then leaves it and its moments alone)."""
        gradients = self._download([None if p.grad is None else p.grad.detach() for p in self.params])
        for m, buffer, gradient in zip(self.masters, self.grads, gradients):
            m.grad = None if gradient is None else buffer.copy_(gradient)

    def _download(self, tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """`tensors` (one per weight, on its device, or None) in CPU memory. Those on a GPU go by DMA into
        the pinned staging buffers, all queued before one wait (not a blocking copy each)."""
        for t, staging in zip(tensors, self.staging):
            if t is not None and staging is not None:
                staging.copy_(t, non_blocking=True)
        self._wait_for_transfers()
        return [t if t is None or staging is None else staging for t, staging in zip(tensors, self.staging)]

    def _wait_for_transfers(self) -> None:
        """Until the copies queued to and from the GPUs are done: the gradients have landed, and the last
        step's uploads, which read the masters, are finished with them."""
        for device in self.devices:
            torch.cuda.current_stream(device).synchronize()

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "masters": [m.detach().clone() for m in self.masters]}

    def load_state_dict(self, state: dict) -> None:
        self._wait_for_transfers()
        self.inner.load_state_dict(state["inner"])
        # The saved groups carry the implementation of the run that wrote them (the for-loop one for
        # checkpoints older than the fused path, or fused=True from a PyTorch that has it): use ours.
        for group in self.inner.param_groups:
            group.update(self.implementation)
        with torch.no_grad():
            for p, m, saved in zip(self.params, self.masters, state["masters"]):
                m.copy_(saved)
                p.copy_(saved.to(p.device))
