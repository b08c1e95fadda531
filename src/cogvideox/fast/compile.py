"""Regional compilation: torch.compile one transformer block and reuse the code for all of them.

The 5B model is 42 identical blocks. Compiling the whole model makes Dynamo and Inductor trace and
optimise all 42 (the reference takes minutes); compiling the block's `forward` once gives the same fused
kernels (modulation, norms, gates, GELU and the int8/fp8 casts fuse into few kernels) for the price of
one block, because PyTorch treats a module's parameters as inputs of the graph, so every block reuses the
one compiled graph. Shapes are static (`dynamic=False`): a video size is fixed for a whole generation.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_blocks(model: nn.Module, mode: str | None = None, fullgraph: bool = True) -> int:
    """Compile each block's `forward` of `model.transformer_blocks` (in place); returns how many.

    mode: torch.compile's ("reduce-overhead" adds CUDA graphs, "max-autotune" also searches GEMM
    configurations, slower to warm up). Apply after quantisation and QKV fusion, before step caching,
    so the compiled graph contains the rewritten layers and the cache's control flow stays outside it.
    """
    if mode not in MODES:
        raise ValueError(f"unknown torch.compile mode {mode!r}; use one of {', '.join(str(m) for m in MODES)}")
    blocks = list(model.transformer_blocks)
    for block in blocks:
        block.forward = torch.compile(block.forward, mode=mode, dynamic=False, fullgraph=fullgraph)
    return len(blocks)
