"""Regional compilation: the compiled blocks give the eager outputs, and the blocks share one compiled
graph instead of one each. Runs Inductor on the CPU (it needs a C compiler)."""

import shutil

import pytest
import torch
from test_fast_fuse import inputs, run, tiny_transformer

from cogvideox.fast import apply
from cogvideox.fast.compile import compile_blocks

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                                reason="Inductor's CPU backend needs a C compiler")  # fmt: skip


def test_compiled_blocks_match_eager_and_share_one_graph():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    exact = tiny_transformer(num_layers=4)
    model = tiny_transformer(num_layers=4)
    assert compile_blocks(model) == 4
    args = inputs(exact)
    got = run(model, *args)
    assert torch.allclose(got, run(exact, *args), rtol=1e-5, atol=1e-5)
    # Block 0 reads the text tokens as a slice of the embedded sequence (other strides), so it gets a
    # graph of its own; blocks 1..3 reuse one. Not one graph per block.
    assert counters["stats"]["unique_graphs"] == 2
    # a second step of the same shape compiles nothing new
    x, text, _, rope = args
    run(model, x, text, torch.tensor([100, 100]), rope)
    assert counters["stats"]["unique_graphs"] == 2


def test_compile_with_the_other_levers_and_the_cache_outside():
    exact = tiny_transformer(num_layers=3)
    model = tiny_transformer(num_layers=3)
    record = apply(model, compile=True, quantize="int8", cache=0.0)
    assert record.describe() == "int8 linears, fused QKV, auto attention, compiled blocks (default), step cache 0"
    args = inputs(exact)
    got = run(model, *args)
    assert ((got - run(exact, *args)).norm() / got.norm()) < 1e-2
    assert record.cache.computed == 1
