"""Regional compilation: the compiled blocks give the eager outputs and gradients (a LoRA training step
with checkpointed, offloaded block inputs included), the blocks share one compiled graph instead of one
each, and a compiler that cannot run is a readable error. Runs Inductor on the CPU (it needs a C
compiler)."""

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


def lora_training_steps(model, compiled, steps=2):
    """`steps` LoRA training steps (rank 4, AdamW) of `model` with every block checkpointed and its inputs
    offloaded, at the clip shape of the trainer's tests (batch 1, 3 x 4 x 6 latents, so that the two
    share compiled code): the losses, the adapters' gradients at each step and the adapters at the end."""
    from cogvideox.models.config import SchedulerConfig
    from cogvideox.schedulers import alphas_cumprod
    from cogvideox.train import lora
    from cogvideox.train.checkpoint import step_generator
    from cogvideox.train.objective import v_loss

    lora.inject_lora(model, 4)
    if compiled:
        compile_blocks(model)
    model.gradient_checkpointing = model.offload_activations = True
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    c = model.config
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 3, c.in_channels, 4, 6, generator=g)
    text = torch.randn(1, c.max_text_seq_length, c.text_embed_dim, generator=g)
    table = alphas_cumprod(SchedulerConfig()).float()
    losses, grads = [], []
    for step in range(steps):
        loss = v_loss(model, x0, text, table, step_generator(0, step), rotary=model.rotary_embedding(3, 4, 6))
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in params])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads, [p.detach().clone() for p in params]


def test_a_compiled_lora_training_step_matches_eager_with_one_graph_for_all_blocks():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_losses, eager_grads, eager_weights = lora_training_steps(tiny_transformer(num_layers=3), compiled=False)
    losses, grads, weights = lora_training_steps(tiny_transformer(num_layers=3), compiled=True)
    # fp32 on the CPU: the fused kernels round differently, nothing more (measured: the losses equal,
    # gradients at most 3e-9 apart, the adapters after two AdamW steps 1.8e-6 apart: Adam divides each
    # gradient by its own running size, so an element whose gradient is near 0 (1e-7) carries its
    # rounding difference into the update, at lr 1e-2).
    assert all(abs(a - b) <= 1e-6 * b for a, b in zip(losses, eager_losses)), (losses, eager_losses)
    for step_grads, step_eager in zip(grads, eager_grads):
        assert len(step_grads) == 24  # A and B of to_q, to_k, to_v, to_out.0 in 3 blocks: all get gradients
        for got, want in zip(step_grads, step_eager):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
    assert any(g.abs().max() > 0 for g in grads[0])  # B starts at 0, so only A's gradients are 0 at step 0
    for got, want in zip(weights, eager_weights):
        assert torch.allclose(got, want, rtol=0, atol=1e-5)
    # One graph for all three blocks: block 0's too (its inputs, from the frozen patch embedding, are
    # marked as needing a gradient like the later blocks'). The second step, and every recompute (whose
    # offloaded inputs come back as fresh tensors), compile nothing new.
    assert counters["stats"]["unique_graphs"] == 1


def test_a_compiler_that_cannot_run_is_a_compile_error():
    import torch._functorch.config
    import torch._inductor.config
    from torch import nn

    from cogvideox.errors import CompileError

    torch._dynamo.reset()
    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([nn.SiLU()])  # a block the CPU backend writes C++ for
    compile_blocks(model)
    # Nothing compiled earlier may stand in: not in this process (reset), nor in the caches on disk.
    no_compiler = torch._inductor.config.patch({"cpp.cxx": ("no-such-c++-compiler",), "fx_graph_cache": False})
    with no_compiler, torch._functorch.config.patch(enable_autograd_cache=False):
        with pytest.raises(CompileError) as error:
            model.transformer_blocks[0](torch.randn(3, 5))
    message = str(error.value)
    assert message.startswith("torch.compile could not compile the transformer blocks (InvalidCxxCompiler: ")
    assert "no-such-c++-compiler" in message and message.endswith("run without compiling (no --compile)")
    torch._dynamo.reset()


def test_recompile_limit_lets_the_blocks_compile_more_shapes():
    from torch import nn
    from torch._dynamo.utils import counters

    def silu_block(**options):
        torch._dynamo.reset()
        counters.clear()
        model = nn.Module()
        model.transformer_blocks = nn.ModuleList([nn.SiLU()])
        compile_blocks(model, **options)
        return model.transformer_blocks[0]

    with torch._dynamo.config.patch(cache_size_limit=1):  # PyTorch's limit, lowered from 8 to keep this short
        block = silu_block()
        block(torch.randn(3))
        # A whole-graph compilation that reaches the limit stops the run (it does not fall back to eager).
        with pytest.raises(Exception) as error:  # FailOnRecompileLimitHit, from Dynamo's "recompile limit exceeded"
            block(torch.randn(4))
        assert "recompile limit" in f"{error.value} {error.value.__cause__}"
        block = silu_block(recompile_limit=3)
        for n in (3, 4, 5):
            x = torch.randn(n)
            assert torch.equal(block(x), torch.nn.functional.silu(x))
        assert counters["stats"]["unique_graphs"] == 3
    torch._dynamo.reset()



def test_an_accelerated_model_past_the_recompile_limit_runs_uncompiled_with_a_warning(monkeypatch):
    """A long-lived pipeline (the service) compiles a graph per video size: past PyTorch's limit of 8, a
    generation stopped with Dynamo's error. `apply(compile=True)` has such a call run uncompiled instead;
    `compile_blocks` alone (the trainer, which sizes its limit) still stops (see the test above)."""
    from torch import nn

    from cogvideox import fast

    torch._dynamo.reset()
    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([nn.SiLU()])
    compile = torch.compile  # Dynamo's limit without Inductor's C++ build: the "eager" backend
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: compile(*args, **kwargs, backend="eager"))
    compile_blocks(model, eager_past_limit=True)
    with torch._dynamo.config.patch(cache_size_limit=1):
        block = model.transformer_blocks[0]
        block(torch.randn(3))
        x = torch.randn(4)
        with pytest.warns(UserWarning, match="recompile limit .* new sizes run uncompiled"):
            assert torch.equal(block(x), torch.nn.functional.silu(x))
    torch._dynamo.reset()
    monkeypatch.undo()

    seen = {}
    monkeypatch.setattr(fast, "compile_blocks", lambda model, mode, **options: seen.update(options))
    apply(tiny_transformer(num_layers=2), compile=True, fuse_qkv=False, attention=None)
    assert seen == {"eager_past_limit": True}
