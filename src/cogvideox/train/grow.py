"""Grow a trained expert transformer deeper without changing what it computes.

A block whose residual gates are zero is the identity: `video + 0 * attn(...)`. The gates come out of
the adaptive LayerNorms' linear layers (the third and sixth of their six chunks), so zeroing those rows
makes a freshly initialised block pass its input through unchanged, as adaLN-Zero does in DiT. The old
blocks keep their weights and their order; the new ones are spread evenly between them. Training then
opens the new gates from zero, starting from the smaller model's function rather than from noise.
"""

from __future__ import annotations

import torch

from ..models.transformer import CogVideoXTransformer

_BLOCK = "transformer_blocks."


def old_block_positions(old_layers: int, new_layers: int) -> list[int]:
    """Where the old blocks go in the deeper stack: block i at floor(i * new / old), so that the new
    blocks fall evenly between them (6 -> 9: old at 0, 1, 3, 4, 6, 7; new at 2, 5, 8)."""
    if not 0 < old_layers <= new_layers:
        raise ValueError(f"can only grow from {old_layers} to {new_layers} layers if 0 < old <= new")
    return [i * new_layers // old_layers for i in range(old_layers)]


def zero_gates(block: torch.nn.Module) -> None:
    """Zero the rows of the block's two adaptive norms that produce the video and text gates."""
    for norm in (block.norm1, block.norm2):
        dim = norm.linear.out_features // 6
        with torch.no_grad():
            for chunk in (2, 5):  # (shift, scale, gate, enc_shift, enc_scale, enc_gate)
                norm.linear.weight[chunk * dim:(chunk + 1) * dim].zero_()
                norm.linear.bias[chunk * dim:(chunk + 1) * dim].zero_()


def grow_depth(model: CogVideoXTransformer, state: dict[str, torch.Tensor]) -> list[int]:
    """Load `state`, a transformer with no more blocks than `model`, into `model` (at equal depth, a
    plain strict load).

    Every weight outside the blocks is copied as is; the old blocks land at `old_block_positions`; the
    other blocks keep their initialisation with their gates zeroed. Returns the new blocks' indices.
    """
    old_layers = 1 + max(int(k[len(_BLOCK):].split(".")[0]) for k in state if k.startswith(_BLOCK))
    new_layers = len(model.transformer_blocks)
    positions = old_block_positions(old_layers, new_layers)
    grown = {}
    for key, value in state.items():
        if key.startswith(_BLOCK):
            index, rest = key[len(_BLOCK):].split(".", 1)
            key = f"{_BLOCK}{positions[int(index)]}.{rest}"
        grown[key] = value
    fresh = [i for i in range(new_layers) if i not in positions]
    for i in fresh:
        zero_gates(model.transformer_blocks[i])
        prefix = f"{_BLOCK}{i}."
        grown.update({prefix + k: v for k, v in model.transformer_blocks[i].state_dict().items()})
    model.load_state_dict(grown)  # strict: any other mismatch in the configs is an error
    return fresh
