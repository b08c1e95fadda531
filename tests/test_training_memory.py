"""A training step leaves nothing behind: after the first step (which allocates the optimizer's state),
each step frees all it allocates, with the trainer's memory levers on (offloaded activations, kept
attention results, an int8 base) and off. Counted from PyTorch's
profiler, which records each allocation and free of the CPU allocator: the check that would have caught
offloaded activations held from step to step (copies back nothing asked for, kept by a reference cycle),
which on a GPU grew the peak by 4.5 GB a step."""

import gc

import pytest
import torch
from test_fast_fuse import inputs, tiny_transformer
from torch.profiler import ProfilerActivity, profile

from cogvideox.fast.compile import compile_blocks
from cogvideox.train import lora


def net_bytes(step) -> int | None:
    """Bytes the CPU allocator handed out during `step()` and did not get back (None: this PyTorch's
    profiler records no allocations)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        cpu = [e.nbytes() for e in events if e.device_type() == torch.autograd.DeviceType.CPU]
    except AttributeError:  # a PyTorch whose profiler results read otherwise
        return None
    return sum(cpu) if cpu else None


@pytest.mark.parametrize(
    "compiled, save_attention, offload, int8_base",
    [(False, False, True, False), (True, False, True, False), (True, True, True, False), (True, True, True, True),
     (False, False, False, False)],
    ids=["eager", "compiled", "saved", "saved-int8-base", "not-offloaded"],
)
def test_a_training_step_leaves_nothing_behind(compiled, save_attention, offload, int8_base):
    torch.manual_seed(0)
    model = tiny_transformer(num_layers=3)
    lora.inject_lora(model, 4, 4, dtype=torch.float32)
    if int8_base:  # as `cogvideox train --quantize-base int8` does, after the LoRA
        from cogvideox.fast.quantize import quantize

        quantize(model, "int8")
    if compiled:
        compile_blocks(model)
    model.gradient_checkpointing = True
    model.offload_activations = offload
    model.save_attention = save_attention
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    x, text, t, rope = inputs(model, batch=1)

    def step():
        model(x, text, t, image_rotary_emb=rope).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer's state, compilation
    gc.disable()  # what is freed must be freed by the step itself, not by a collection
    try:
        left = [net_bytes(step) for _ in range(2)]
    finally:
        gc.enable()
    if left[0] is None:
        pytest.skip("this PyTorch's profiler records no CPU allocations")
    assert left == [0, 0], left
