"""The first-block step cache: exact at threshold 0, fewer full steps and a bounded error above it, one
decision per CFG batch, a reset per generation, and the skip arithmetic itself (orders 0 and 1)."""

import pytest
import torch
from test_fast_fuse import inputs, tiny_transformer

from cogvideox import InputError, Pipeline
from cogvideox.fast import apply
from cogvideox.fast.cache import StepCache

CALL = dict(num_frames=9, height=32, width=48, num_inference_steps=12, max_sequence_length=16,
            output_type="latent", progress=False, seed=0)  # fmt: skip


@pytest.fixture(scope="module")
def uncached(tiny_rope_dir):
    return Pipeline.from_pretrained(tiny_rope_dir)("a cat", **CALL).latents


def cached_pipe(folder, threshold):
    # Only the cache: fused QKV and the attention backend would change the rounding.
    return Pipeline.from_pretrained(folder).accelerate(cache=threshold, fuse_qkv=False, attention=None)


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_threshold_zero_computes_every_step_bitwise(tiny_rope_dir, uncached):
    pipe = cached_pipe(tiny_rope_dir, 0.0)
    got = pipe("a cat", **CALL).latents
    assert torch.equal(got, uncached)
    cache = pipe.acceleration.cache
    # guidance doubles the batch, not the calls: one decision per step for [uncond ; cond]
    assert cache.stats() == {"threshold": 0.0, "order": 1, "calls": 12, "computed": 12, "skipped": 0}


def test_a_high_threshold_skips_steps_and_stays_close(tiny_rope_dir, uncached):
    pipe = cached_pipe(tiny_rope_dir, 0.3)
    first = pipe("a cat", **CALL).latents
    cache = pipe.acceleration.cache
    assert cache.calls == 12 and 1 <= cache.computed <= 9, cache.stats()
    assert 0 < rel_l2(first, uncached) < 0.03

    # a second generation starts afresh: same video, counters of this generation only
    stats = cache.stats()
    again = pipe("a cat", **CALL).latents
    assert torch.equal(again, first)
    assert cache.stats() == stats


def test_a_call_stopped_by_its_callback_leaves_nothing_for_the_next(tiny_rope_dir):
    """A callback that raises (a cancelled job) stops a generation at t=624; a video-to-video call whose
    schedule starts below that was taken for its continuation and skipped steps on its residuals."""
    from helpers import sample_frames

    video = sample_frames(9, height=32, width=48)
    redraw = dict(CALL, num_inference_steps=8, prompt="a dog", video=video, strength=0.5, seed=2)
    want = cached_pipe(tiny_rope_dir, 0.5)(**redraw).latents

    def stop(step, timestep, latents):
        if step == 3:
            raise KeyboardInterrupt

    pipe = cached_pipe(tiny_rope_dir, 0.5)
    with pytest.raises(KeyboardInterrupt):
        pipe("a bird", **dict(CALL, num_inference_steps=8), callback=stop)
    got = pipe(**redraw).latents
    assert torch.equal(got, want)
    assert pipe.acceleration.cache.calls == 4  # this generation's steps only


def run_recording_other_blocks(exact, x, text, t, rope):
    """The exact 3-block model's output, and R = (video, text) out of block 2 - into block 1: the
    residual that blocks 1..2 add, which a cached step reuses."""
    seen = {}
    blocks = exact.transformer_blocks
    hooks = [
        blocks[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[:2])),
        blocks[2].register_forward_hook(lambda m, a, out: seen.__setitem__("out", out)),
    ]
    try:
        out = exact(x, text, t, image_rotary_emb=rope)
    finally:
        for h in hooks:
            h.remove()
    return out, [o - i for o, i in zip(seen["out"], seen["in"])]


def run_with_other_blocks_replaced(exact, stand_in, x, text, t, rope):
    """The exact 3-block model's output with blocks 1..2 replaced by adding `stand_in` (video, text):
    block 1 passes its input on, block 2 returns its input + stand_in, as a cached step does."""
    blocks = exact.transformer_blocks
    hooks = [
        blocks[1].register_forward_hook(lambda m, a, out: a[:2]),
        blocks[2].register_forward_hook(lambda m, a, out: tuple(i + r for i, r in zip(a[:2], stand_in))),
    ]
    try:
        return exact(x, text, t, image_rotary_emb=rope)
    finally:
        for h in hooks:
            h.remove()


def test_a_skipped_call_adds_the_remembered_residual_of_the_other_blocks():
    torch.manual_seed(0)
    exact = tiny_transformer(num_layers=3)
    model = tiny_transformer(num_layers=3)
    cache = StepCache(model, threshold=1e9)  # skip whenever there is something to reuse
    x, text, t, rope = inputs(model)
    x2 = x + 0.1 * torch.randn_like(x)
    early, late = torch.tensor([800, 800]), torch.tensor([600, 600])

    with torch.no_grad():
        # the truth, from the exact model: R from the first call, reused whole at the second
        want_first, residual = run_recording_other_blocks(exact, x, text, early, rope)
        want_second = run_with_other_blocks_replaced(exact, residual, x2, text, late, rope)

        got_first = model(x, text, early, image_rotary_emb=rope)
        got_second = model(x2, text, late, image_rotary_emb=rope)
    assert torch.equal(got_first, want_first)
    assert torch.equal(got_second, want_second)
    assert cache.stats() == {"threshold": 1e9, "order": 1, "calls": 2, "computed": 1, "skipped": 1}

    # a timestep that does not count down is a new generation: everything runs again
    with torch.no_grad():
        model(x2, text, late, image_rotary_emb=rope)
    assert cache.stats()["computed"] == 1 and cache.calls == 1


def test_bad_thresholds_are_user_errors():
    for bad in (-0.1, float("nan"), float("inf"), "0.1"):
        with pytest.raises(InputError, match="threshold must be a finite number >= 0"):
            apply(tiny_transformer(), cache=bad)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        StepCache(tiny_transformer(num_layers=1), 0.1)
    with pytest.raises(ValueError, match="order is 0 or 1"):
        StepCache(tiny_transformer(), 0.1, order=2)


@pytest.mark.parametrize("order", [0, 1])
def test_a_skipped_call_after_two_full_ones_carries_their_trend_on(order):
    """Order 0 adds the last full call's residual R2 as it is; order 1 adds R2 + w (R2 - R1), where
    w = (3 - 2) / (2 - 1) = 1 is capped at 1/2."""
    torch.manual_seed(0)
    exact = tiny_transformer(num_layers=3)
    model = tiny_transformer(num_layers=3)
    cache = StepCache(model, threshold=0.0, order=order)  # compute the first two calls in full
    x1, text, _, rope = inputs(model)
    x2, x3 = x1 + 0.1 * torch.randn_like(x1), x1 + 0.2 * torch.randn_like(x1)
    t1, t2, t3 = (torch.tensor([t, t]) for t in (800, 700, 600))

    with torch.no_grad():
        (r1_video, r1_text), (r2_video, r2_text) = (
            run_recording_other_blocks(exact, x, text, t, rope)[1] for x, t in ((x1, t1), (x2, t2))
        )
        stand_in = (r2_video, r2_text) if order == 0 else (1.5 * r2_video - 0.5 * r1_video, 1.5 * r2_text - 0.5 * r1_text)
        want = run_with_other_blocks_replaced(exact, stand_in, x3, text, t3, rope)

        model(x1, text, t1, image_rotary_emb=rope)
        model(x2, text, t2, image_rotary_emb=rope)
        cache.threshold = 1e9  # now skip
        got = model(x3, text, t3, image_rotary_emb=rope)
    assert cache.stats() == {"threshold": 1e9, "order": order, "calls": 3, "computed": 2, "skipped": 1}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (cache._previous is None) == (order == 0)  # order 0 holds no second residual in memory
