"""Step caching: skip most of the transformer on steps where its input barely changed (first-block cache).

Consecutive denoising steps often change the model's work very little. Each step still runs the first
block; its residual (output minus input, video tokens) is compared with the one of the last step that ran
in full. When the mean absolute change, relative to that residual's mean magnitude, is below `threshold`,
the remaining blocks are skipped and the residual R they added on the last full steps stands in for them:

    video, text = block_0(video, text)            always
    full step k:  run blocks 1..N-1, remember R_k = out - in  (video and text)
    cached step:  video, text = video + R', text + R'
        order 0:  R' = R_k1                                   (the last full step's, as it is)
        order 1:  R' = R_k1 + min((k - k1) / (k1 - k0), 1/2) * (R_k1 - R_k0)   (the default)

Order 1 carries on the trend of the last two full steps k0 < k1 to the skipped step k (a first-order
Taylor step in the step count, as TaylorSeer forecasts features), but never further than half the span
it was measured over: the residual does not change along a straight line, and on the demo model the
uncapped line overshot on long runs of skips (the cap of 1/2 was chosen there among 1/4, 1/2, 1 and a
halved slope). It stores one more residual. On the demo model it brings the cached videos much closer to
the uncached ones at every threshold (see BENCHMARKS.md).

The decision is one per transformer call, so a CFG batch [uncond ; cond] is kept or skipped together;
under a parallel layout the group of processes decides together (`cogvideox.parallel.step_cache`).
The reference residual is only renewed on full steps, so slow drift still triggers a full step. The
cache resets itself when a call's timestep is not below the previous one (a new generation: the
samplers count down) or the input shape changes, and `reset()` does it by hand (`Pipeline` does, at the
start of every call: a call stopped half-way would otherwise pass its residuals on). Inference only.
"""

from __future__ import annotations

import torch
from torch import nn

from cogvideox.values import is_finite_number


TREND_CAP = 0.5  # order 1: how far, in spans of the last two full steps, a trend is carried on


class StepCache:
    """First-block cache on a `CogVideoXTransformer`, installed by wrapping its blocks' `forward`.

    `threshold` = 0 computes every step (output bitwise equal to the uncached model); larger values skip
    more. `order` (0 or 1, an attribute that may be changed between generations) says how a skipped step
    stands in for the other blocks, see the module's docstring. `calls` and `computed` count the
    transformer calls since the last reset and how many ran all blocks; `skipped` is the difference.
    """

    def __init__(self, transformer: nn.Module, threshold: float, order: int = 1) -> None:
        check_threshold(threshold)
        if order not in (0, 1):
            raise ValueError(f"the cache order is 0 or 1, got {order!r}")
        self.order = order
        # (residual, reference) -> (relative change, skip): None judges this process's tensors alone; a
        # parallel pipeline installs one that judges the whole video over its group (`parallel.step_cache`).
        self.judge = None
        blocks = list(transformer.transformer_blocks)
        if len(blocks) < 2:
            raise ValueError("step caching needs a transformer with at least 2 blocks")
        self.threshold = float(threshold)
        self.reset()
        first, *middle, last = blocks
        _wrap(first, self._first)
        for block in middle:
            _wrap(block, self._middle)
        _wrap(last, self._last)
        transformer.register_forward_pre_hook(self._on_call, with_kwargs=True)

    def reset(self) -> None:
        """Forget the cached residuals and zero the counters (a new generation)."""
        self._reference: torch.Tensor | None = None  # first block's video residual, last full step
        self._rest: tuple[torch.Tensor, torch.Tensor] | None = None  # blocks 1..N-1 residual (video, text)
        self._rest_call = 0  # the call that computed it
        self._previous: tuple[tuple[torch.Tensor, torch.Tensor], int] | None = None  # the one before, its call
        self._rest_input: tuple[torch.Tensor, torch.Tensor] | None = None
        self._skip = False
        self._last_timestep: float | None = None
        self._last_shape: tuple[int, ...] | None = None
        self.calls = 0
        self.computed = 0
        self.last_change: float | None = None

    @property
    def skipped(self) -> int:
        return self.calls - self.computed

    def stats(self) -> dict:
        return {"threshold": self.threshold, "order": self.order, "calls": self.calls, "computed": self.computed,
                "skipped": self.skipped}  # fmt: skip

    # The stages, each called with the block's own forward first.

    def _on_call(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        timestep = args[2] if len(args) > 2 else kwargs["timestep"]
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        shape = tuple(hidden.shape)
        if self._last_timestep is not None and (t >= self._last_timestep or shape != self._last_shape):
            self.reset()
        self._last_timestep, self._last_shape = t, shape

    def _first(self, forward, video, text, emb, rope=None):
        out_video, out_text = forward(video, text, emb, rope)
        residual = out_video - video
        self._skip = False
        if self._reference is not None and self._rest is not None:
            # One host sync per step: the branch below is Python control flow.
            judge = self.judge or self._judge
            self.last_change, self._skip = judge(residual, self._reference)
        self.calls += 1
        if not self._skip:
            self.computed += 1
            self._reference = residual
            self._rest_input = (out_video, out_text)
        return out_video, out_text

    def _judge(self, residual: torch.Tensor, reference: torch.Tensor) -> tuple[float, bool]:
        change = ((residual - reference).abs().float().mean() / reference.abs().float().mean()).item()
        return change, change < self.threshold

    def _middle(self, forward, video, text, emb, rope=None):
        if self._skip:
            return video, text
        return forward(video, text, emb, rope)

    def _last(self, forward, video, text, emb, rope=None):
        if self._skip:
            rest_video, rest_text = self._rest
            if self.order == 1 and self._previous is not None:
                (previous_video, previous_text), k0 = self._previous
                k1 = self._rest_call
                # R + w (R - P) = lerp(P, R, 1 + w), with w = (k - k1) / (k1 - k0) capped at 1/2
                weight = 1 + min((self.calls - k1) / (k1 - k0), TREND_CAP)
                rest_video = torch.lerp(previous_video, rest_video, weight)
                rest_text = torch.lerp(previous_text, rest_text, weight)
            return video + rest_video, text + rest_text
        out_video, out_text = forward(video, text, emb, rope)
        in_video, in_text = self._rest_input
        if self.order == 1 and self._rest is not None:  # order 0 never reads it: do not hold the memory
            self._previous = (self._rest, self._rest_call)
        self._rest, self._rest_call = (out_video - in_video, out_text - in_text), self.calls
        self._rest_input = None
        return out_video, out_text


def _wrap(block: nn.Module, stage) -> None:
    forward = block.forward  # the class's, or a compiled one installed earlier

    def cached_forward(video, text, emb, rope=None):
        return stage(forward, video, text, emb, rope)

    block.forward = cached_forward


def check_threshold(threshold: float) -> None:
    if not is_finite_number(threshold) or threshold < 0:
        from cogvideox.errors import InputError

        raise InputError(f"the cache threshold must be a finite number >= 0, got {threshold!r}")


def add_step_cache(transformer: nn.Module, threshold: float, order: int = 1) -> StepCache:
    """Install a first-block cache on `transformer` (in place) and return it (for `reset()` and stats)."""
    return StepCache(transformer, threshold, order)
