"""Selective checkpointing (`save_attention`): the backward's recompute skips the attention kernel, and the
gradients are those of plain checkpointing, eager (bit for bit) and with compiled blocks (to rounding)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_parallel import CONFIGS, _inputs
from torch.utils._python_dispatch import TorchDispatchMode

from cogvideox.fast.compile import compile_blocks
from cogvideox.models.transformer import ATTENTION_KERNELS, CogVideoXTransformer

BLOCKS = 4


def _batch_of_one(model):
    """One clip, as training runs (a batch of 2 makes block 0's text a strided slice: a graph of its own)."""
    latents, text, timestep, rope = _inputs(model)
    return latents[:1], text[:1], timestep[:1], rope


class CountAttention(TorchDispatchMode):
    """Counts the fused attention kernels that run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in ATTENTION_KERNELS
        return func(*args, **(kwargs or {}))


def _gradients(save_attention: bool, compiled: bool = False):
    """Parameter gradients of one training step of a 4-block RoPE model with gradient checkpointing, and
    how many attention kernels ran in its backward pass."""
    torch.manual_seed(0)
    model = CogVideoXTransformer(dataclasses.replace(CONFIGS["rope"], num_layers=BLOCKS)).train()
    if compiled:
        compile_blocks(model)
    model.gradient_checkpointing = True
    model.save_attention = save_attention
    latents, text, timestep, rope = _batch_of_one(model)
    out = model(latents, text, timestep, image_rotary_emb=rope)
    counter = CountAttention()
    with counter:
        out.square().mean().backward()
    return {name: p.grad for name, p in model.named_parameters()}, counter.calls


def test_the_fused_attention_kernel_runs_on_the_cpu():
    """The CPU picks the fused flash kernel for these inputs, so the tests below see it kept or run."""
    _, recomputed = _gradients(save_attention=False)
    assert recomputed == BLOCKS  # plain checkpointing: one attention per block again in the backward


def test_saved_attention_gives_the_same_gradients_without_recomputing_it():
    want, _ = _gradients(save_attention=False)
    got, recomputed = _gradients(save_attention=True)
    assert recomputed == 0
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_compiled_blocks_keep_the_attention_in_one_graph():
    from torch._dynamo.utils import counters

    want, _ = _gradients(save_attention=False)
    counters.clear()
    got, recomputed = _gradients(save_attention=True, compiled=True)
    assert counters["stats"]["unique_graphs"] == 1  # the checkpoint compiled with the block, for all blocks
    assert recomputed == 0
    for name in want:
        scale = want[name].abs().max().item()
        assert (got[name] - want[name]).abs().max().item() <= 1e-5 * scale, name


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_offloaded_inputs_with_saved_attention(compiled):
    """Both levers on: the block inputs go through host memory, the gradients stay the plain ones."""
    want, _ = _gradients(save_attention=False)
    torch.manual_seed(0)
    model = CogVideoXTransformer(dataclasses.replace(CONFIGS["rope"], num_layers=BLOCKS)).train()
    if compiled:
        compile_blocks(model)
    model.gradient_checkpointing = model.save_attention = model.offload_activations = True
    latents, text, timestep, rope = _batch_of_one(model)
    model(latents, text, timestep, image_rotary_emb=rope).square().mean().backward()
    for name, p in model.named_parameters():
        scale = want[name].abs().max().item()
        assert (p.grad - want[name]).abs().max().item() <= 1e-5 * scale, name
