"""Regional compilation: torch.compile one transformer block and reuse the code for all of them.

The 5B model is 42 identical blocks. Compiling the whole model makes Dynamo and Inductor trace and
optimise all 42 (the reference takes minutes); compiling the block's `forward` once gives the same fused
kernels (modulation, norms, gates, GELU and the int8/fp8 casts fuse into few kernels) for the price of
one block, because PyTorch treats a module's parameters as inputs of the graph, so every block reuses the
one compiled graph. Shapes are static (`dynamic=False`): a video size is fixed for a whole generation.

Training compiles the same way. The gradient checkpoint stays outside the compiled region: its forward
and its recompute in the backward pass call the same compiled forward (whose backward graph AOTAutograd
compiles with it), and `offload_activations` moves the checkpoint's saved inputs, not anything inside the
graph. The selective checkpoint that keeps the attention's results (`save_attention`) is the exception:
it must see the attention operator, so the block's `checkpointed` method, checkpoint included, is
compiled as one region (AOTAutograd's partitioner keeps the attention results and recomputes the rest).
A new graph is compiled only for a new input signature: a new shape, grad mode (training or sampling),
or a change in which inputs need gradients. With a LoRA, block 0's inputs come from the frozen
patch embedding and would need no gradient, unlike every later block's, and block 0 would compile a graph
of its own (a whole compilation more, forward and backward, before the first step); so while a model
trains, its embedded sequence is marked as needing one. That costs block 0 the gradient of its input
(its QKV projections' share of a backward pass, under a thousandth of a 5B step) and saves that
compilation: one graph per clip shape for a LoRA as for full fine-tuning.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from cogvideox.errors import CompileError

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_blocks(
    model: nn.Module,
    mode: str | None = None,
    fullgraph: bool = True,
    recompile_limit: int | None = None,
    eager_past_limit: bool = False,
) -> int:
    """Compile each block's `forward` of `model.transformer_blocks` (in place); returns how many.

    mode: torch.compile's ("reduce-overhead" adds CUDA graphs, "max-autotune" also searches GEMM
    configurations, slower to warm up). Apply after quantisation and QKV fusion, before step caching,
    so the compiled graph contains the rewritten layers and the cache's control flow stays outside it;
    for training, after the LoRA is attached. recompile_limit: how many graphs the blocks may compile
    (None: PyTorch's `recompile_limit`, 8; a higher global setting wins); past it, a `fullgraph` call
    that needs a new graph raises Dynamo's "recompile limit" error. The trainer raises it with the
    number of clip shapes. A failure of the compiler backend (no C++ compiler for the CPU, no
    Triton for the GPU) is raised as `CompileError` at the first call. A model with a `patch_embed`
    gets a forward hook on it that marks the embedded sequence as needing a gradient while it trains,
    so that block 0 shares the other blocks' graph. `eager_past_limit` (inference, where a long-lived
    pipeline meets ever new video sizes): a call past the limit runs the block uncompiled, with a warning,
    instead of raising.
    """
    if mode not in MODES:
        raise ValueError(f"unknown torch.compile mode {mode!r}; use one of {', '.join(str(m) for m in MODES)}")

    def compiled(eager):
        graph = torch.compile(eager, mode=mode, dynamic=False, fullgraph=fullgraph)
        return _region(graph, recompile_limit, eager if eager_past_limit else None)

    blocks = list(model.transformer_blocks)
    for block in blocks:
        block.forward = compiled(block.forward)
        if hasattr(block, "checkpointed"):  # the block under a selective checkpoint, compiled with it
            block.checkpointed = compiled(block.checkpointed)
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:
        patch_embed.register_forward_hook(_needs_gradient_in_training)
    return len(blocks)


def _needs_gradient_in_training(module: nn.Module, inputs, output):
    """The embedded sequence, marked as needing a gradient while the model trains (see the module's
    docstring): frozen layers before the blocks (a LoRA's) give block 0 the input signature of the
    others. A frozen output is a leaf, so it can be marked in place."""
    if (
        torch.is_grad_enabled()
        and module.training
        and isinstance(output, torch.Tensor)
        and output.is_floating_point()
        and not output.requires_grad
    ):
        output.requires_grad_()
    return output


def _limit_errors() -> tuple[type[Exception], ...]:
    """Dynamo's error for a `fullgraph` call past the recompile limit (named for the cache in older torch)."""
    names = ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")
    return tuple(getattr(torch._dynamo.exc, name) for name in names if hasattr(torch._dynamo.exc, name))


def _region(compiled, recompile_limit: int | None, eager=None):
    """The compiled forward of one block, with its inputs' strides made canonical and the compiler's
    failure made readable; past the recompile limit, `eager` (when given) runs instead."""

    def forward(*args, **kwargs):
        args = tuple(_canonical_strides(a) for a in args)
        limit = contextlib.nullcontext()
        if recompile_limit is not None:
            # `cache_size_limit`: `recompile_limit`'s older name, which newer versions keep as an alias.
            # Dynamo reads it when a call needs a new graph, so the raised limit holds for these calls only.
            config = torch._dynamo.config
            limit = config.patch(cache_size_limit=max(recompile_limit, config.cache_size_limit))
        try:
            with limit:
                return compiled(*args, **kwargs)
        except _limit_errors():
            if eager is None:
                raise
            warnings.warn(
                "the compiled transformer blocks have reached torch.compile's recompile limit (a graph per video "
                "size and batch): new sizes run uncompiled, slower",
                stacklevel=2,
            )
            return eager(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            inner = getattr(e, "inner_exception", None) or e  # the backend's own error
            reason = f"{type(inner).__name__}: {(str(inner).strip().splitlines() or [''])[0]}"
            raise CompileError(
                f"torch.compile could not compile the transformer blocks ({reason}); it needs a C++ compiler "
                "on the CPU and Triton on a GPU; run without compiling (no --compile)"
            ) from e

    return forward


def _canonical_strides(t):
    """A contiguous tensor with the strides a fresh tensor of its shape has (a view, no copy).

    Dynamo guards on strides, and those of a size-1 dimension are free: block 0's text tokens are a
    slice of the embedded sequence, whose batch stride at batch 1 is the whole sequence's. The
    checkpoint's recompute may hand the block fresh tensors instead (offloaded inputs come back from host
    memory), and without this the same block would compile a second graph for its recompute."""
    if isinstance(t, torch.Tensor) and t.is_contiguous():
        return t.view(-1).view(t.shape)
    return t
