"""The order in which `HostSaves` copies saved activations back: each one once, ahead of the tensor
autograd asks for, the weights never (the copies themselves run on streams on a GPU only)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cogvideox.models.host_saves import HostSaves


def test_copies_back_run_ahead_of_the_backward_pass_each_once():
    saves = HostSaves(lookahead=3)
    tensors = [torch.full((4,), float(i)) for i in range(8)]
    packed = [saves.copies.pack(t) for t in tensors]
    assert packed == list(range(8))  # each one copied to the host, by index
    got = {}
    for i in reversed(range(8)):  # the backward pass asks for the last saved first
        got[i] = saves.copies.unpack(packed[i])
        if i == 7:
            assert saves.fetched == [7, 6, 5, 4]  # itself, then the 3 before it
    assert saves.fetched == [7, 6, 5, 4, 3, 2, 1, 0]  # each started once, in order
    for i, t in enumerate(tensors):
        assert torch.equal(got[i], t) and got[i].data_ptr() != t.data_ptr()  # a copy, the original freed
    assert saves.copies._back == {}  # nothing held after it was handed over
    assert torch.equal(saves.copies.unpack(packed[5]), tensors[5])  # asked again: copied back again
    assert saves.fetched.count(5) == 2 and saves.copies._back == {}


def test_the_copies_back_run_ahead_by_bytes():
    """The window ahead is counted in bytes (a block's saved tensors differ in number and size with the
    settings): here 1000 bytes, tensors of 400, so up to three ahead of the one asked for."""
    saves = HostSaves(ahead_bytes=1000)
    tensors = [torch.full((100,), float(i)) for i in range(8)]  # 400 bytes each
    packed = [saves.copies.pack(t) for t in tensors]
    saves.copies.unpack(packed[7])
    assert saves.fetched == [7, 6, 5, 4]
    saves.copies.unpack(packed[6])
    assert saves.fetched == [7, 6, 5, 4, 3]  # 5 and 4 still waiting: one more to fill the window


def test_a_tensor_saved_again_while_alive_is_copied_once():
    saves = HostSaves()
    table = torch.randn(16)
    assert saves.copies.pack(table) == saves.copies.pack(table) == 0
    del table  # freed: a new tensor at the same address is another tensor
    again = torch.randn(16)
    assert saves.copies.pack(again) == 1


def test_the_models_weights_are_not_copied():
    model = nn.Linear(4, 4)
    model.register_buffer("table", torch.randn(8, 4))  # a buffer: as a quantised linear's int8 weight
    saves = HostSaves(model)
    assert saves.copies.pack(model.weight) is model.weight and saves.copies.unpack(model.weight) is model.weight
    assert saves.copies.pack(model.table) is model.table
    activation = torch.randn(3, 4)
    assert saves.copies.pack(activation) == 0
    assert saves.copies.pack(activation) == 0  # saved again: not copied, nor counted, twice
    # the weights are neither copied nor counted as kept
    assert saves.stats() == {"copied": 1, "copied_bytes": 3 * 4 * 4, "kept_bytes": 0, "copied_back": 0}


def test_a_transformer_reports_what_its_checkpointed_pass_copied():
    from test_fast_fuse import inputs, tiny_transformer

    model = tiny_transformer(num_layers=3)
    model.gradient_checkpointing = model.offload_activations = True
    model.train()
    x, text, t, rope = inputs(model)
    model(x, text, t, image_rotary_emb=rope).sum().backward()
    stats = model.offload_stats
    # each block's checkpoint saves its two inputs, video and text tokens: 2 x 3 copies, nothing else
    B, L, D = text.shape[0], text.shape[1], model.config.inner_dim
    N = x.shape[1] * (x.shape[3] // 2) * (x.shape[4] // 2)  # patches of 2 x 2
    assert B == 2 and stats["copied"] == 6
    # block 0's video tokens are a slice of the embedded sequence: its run of storage crosses whole,
    # the text rows between the two clips' video rows included
    assert stats["copied_bytes"] == (3 * B * (L + N) + (B - 1) * L) * D * 4
    assert stats["kept_bytes"] == 0
    assert stats["copied_back"] == 6  # each once


def test_gradients_through_the_hooks_are_the_plain_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    x = torch.randn(5, 8, requires_grad=True)
    model(x).square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    saves = HostSaves(model, lookahead=1)
    with saves:
        out = model(x)
    out.square().sum().backward()
    assert saves.fetched  # the activations went through host copies
    got = [p.grad for p in model.parameters()] + [x.grad]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def _recording(monkeypatch):
    """HostSaves as the transformer makes them, each one recorded."""
    import cogvideox.models.transformer as transformer

    made = []

    class Recorded(HostSaves):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(transformer, "HostSaves", Recorded)
    return made


@pytest.mark.parametrize("save_attention", [False, True])
def test_each_copy_back_starts_once_and_none_outlives_the_backward_pass(monkeypatch, save_attention):
    """Autograd asks for a block's saved inputs in the order they were saved (video, then text), not in
    reverse, and a table every block saves is asked for once per block: each copy back starts once all
    the same, and nothing copied back stays behind (on a GPU, a block's input left in device memory)."""
    from test_fast_fuse import inputs, tiny_transformer

    made = _recording(monkeypatch)
    model = tiny_transformer(num_layers=4)
    model.gradient_checkpointing = model.offload_activations = True
    model.save_attention = save_attention
    model.train()
    x, text, t, rope = inputs(model, batch=1)
    model(x, text, t, image_rotary_emb=rope).sum().backward()
    copies = made[-1].copies
    assert sorted(copies.fetched) == list(range(len(copies._saved)))  # each one, once
    assert copies._back == {} and copies._left == {}


def test_the_host_copies_go_with_the_graph_not_the_cycle_collector(monkeypatch):
    """The hooks hold the copies and nothing holds the hooks but autograd's graph: once the backward
    pass has freed it, the copies are gone, with Python's cycle collector off."""
    import gc
    import weakref

    from test_fast_fuse import inputs, tiny_transformer

    made = _recording(monkeypatch)
    model = tiny_transformer(num_layers=2)
    model.gradient_checkpointing = model.offload_activations = True
    model.train()
    x, text, t, rope = inputs(model, batch=1)
    gc.disable()
    try:
        loss = model(x, text, t, image_rotary_emb=rope).sum()
        copies = weakref.ref(made.pop().copies)
        assert copies() is not None and copies()._saved  # held by the graph until the backward pass
        loss.backward()
        del loss
        assert copies() is None
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(2, 11, 6)[:, 3:],  # video tokens of a batch: a slice, small gaps
        lambda: torch.randn(2, 11, 6)[:, :3],  # text tokens of a batch: mostly gaps, elements alone
        lambda: torch.randn(5, 1, 4).expand(5, 3, 4),  # broadcast: less storage than elements
        lambda: torch.randn(1, 7, 4)[:, 2:],  # batch of one: dense, with the parent's stride for dim 0
        lambda: torch.randn(4, 6).t(),  # transposed
    ],
    ids=["slice", "sparse-slice", "broadcast", "batch-of-one", "transposed"],
)
def test_a_saved_tensor_comes_back_with_its_own_strides(make):
    """A compiled backward pass asserts the strides of what it saved: a copy back must have them."""
    saves = HostSaves()
    t = make()
    i = saves.copies.pack(t)
    del_ptr = t.data_ptr()
    got = saves.copies.unpack(i)
    assert got.shape == t.shape and got.stride() == t.stride() and torch.equal(got, t)
    assert got.data_ptr() != del_ptr


def test_a_compiled_batch_of_two_trains_through_the_host_copies():
    """Compiled blocks, offloaded inputs, a batch of two: block 0's inputs are slices with gaps, which
    the compiled backward pass gets back with their strides (it stopped with a stride assertion)."""
    from test_fast_fuse import inputs, tiny_transformer

    from cogvideox.fast.compile import compile_blocks

    grads = []
    for offload in (False, True):
        model = tiny_transformer(num_layers=2).train()
        compile_blocks(model)
        model.gradient_checkpointing = True
        model.offload_activations = offload
        x, text, t, rope = inputs(model, batch=2)
        model(x, text, t, image_rotary_emb=rope).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, want in grads[0].items():
        assert torch.equal(grads[1][name], want), name  # the same graph on the same values


def test_an_int8_bases_weights_stay_where_they_are_in_a_compiled_selective_checkpoint(monkeypatch):
    """Compiled with the attention results kept, a block's graph saves the weights its backward reads; a
    quantised base's int8 weights and scales are buffers, and stay on the device as parameters do."""
    from test_fast_fuse import inputs, tiny_transformer

    from cogvideox.fast.compile import compile_blocks
    from cogvideox.fast.quantize import quantize
    from cogvideox.train import lora

    made = _recording(monkeypatch)
    model = tiny_transformer(num_layers=2)
    lora.inject_lora(model, 4, 4, dtype=torch.float32)
    assert quantize(model, "int8") > 0
    compile_blocks(model)
    model.gradient_checkpointing = model.offload_activations = model.save_attention = True
    model.train()
    x, text, t, rope = inputs(model, batch=1)
    model(x, text, t, image_rotary_emb=rope).sum().backward()
    copies = made[-1].copies
    assert copies._saved and not any(host.dtype == torch.int8 for host, _, _ in copies._saved)
    buffers = {b.data_ptr() for b in model.buffers()}
    assert not any(key[0] in buffers for key in copies._seen)  # nothing of the model's went through a copy
