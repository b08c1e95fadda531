"""The CPU-offloaded AdamW computes what `torch.optim.AdamW` computes on fp32 copies of the weights, and
resumes from its state dict bit for bit."""

import io

import pytest
import torch

from cogvideox.train import optim
from cogvideox.train.optim import CPUOffloadAdamW, packed

SHAPES = [(64, 48), (48,), (3, 5, 2, 2), (1000,), (7,)]
LR = 1e-2
STEPS = 8
EPS32 = torch.finfo(torch.float32).eps  # 2**-23


def weights(dtype=torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def gradients(step: int, dtype=torch.float32) -> list[torch.Tensor | None]:
    """Gradients over twelve orders of magnitude; the second weight has none on step 2 (AdamW skips it)."""
    g = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(s, generator=g) * 10.0 ** torch.randint(-9, 3, s, generator=g) for s in SHAPES]
    grads[1] = None if step == 2 else grads[1]
    return [None if x is None else x.to(dtype) for x in grads]


def run(optimizer, params, steps, dtype=torch.float32, start=0) -> None:
    for step in range(start, start + steps):
        for p, grad in zip(params, gradients(step, dtype)):
            p.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def reference(steps: int, dtype=torch.float32) -> list[torch.Tensor]:
    """torch.optim.AdamW's for-loop implementation on fp32 weights fed the same (fp32) gradients."""
    params = [torch.nn.Parameter(p.detach().float()) for p in weights(dtype)]
    adamw = torch.optim.AdamW(params, lr=LR, foreach=False)
    for step in range(steps):
        for p, grad in zip(params, gradients(step, dtype)):
            p.grad = None if grad is None else grad.float()
        adamw.step()
    return [p.detach() for p in params]


def test_fused_cpu_adamw_is_available_and_chosen():
    # The fast path this optimizer exists for: PyTorch 2.4 and later have the fused CPU kernel.
    assert optim.cpu_adamw_options() == {"fused": True}
    assert CPUOffloadAdamW(weights(), lr=LR).param_groups[0]["fused"] is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_masters_follow_torch_adamw(dtype):
    # The fused kernel and the for-loop one evaluate the same formulas on the same inputs, rounding in a
    # different order. Each step, the update (|u| <= lr (1 - b1) / sqrt(1 - b2) ~ 3.2 lr for the default
    # betas) differs by a few roundings of itself, and the weight by at most one rounding of
    # p (1 - lr wd) and one of p - u; weight decay only shrinks a difference, and the moments' own
    # rounding differences enter the update relatively, so after N steps the weights differ by at most
    # N eps (2 max|p| + 8 * 3.2 lr). Anything that changes the arithmetic (a gradient not converted, a
    # skipped weight that is updated, a lost step count) moves the weights by ~lr, far beyond it.
    params = weights(dtype)
    optimizer = CPUOffloadAdamW(params, lr=LR)
    run(optimizer, params, STEPS, dtype)
    expected = reference(STEPS, dtype)
    for p, m, want in zip(params, optimizer.masters, expected):
        bound = STEPS * EPS32 * (2 * want.abs().max().item() + 8 * 3.2 * LR)
        torch.testing.assert_close(m.detach(), want, rtol=0, atol=bound)
        assert torch.equal(p.detach(), m.detach().to(dtype))  # the weights are the masters, rounded


def test_gradients_through_the_staging_buffers_give_the_same_step():
    # Weights on a GPU send their gradients through pinned staging buffers; on the CPU the same path runs
    # with unpinned ones, and must land the same fp32 gradients as the direct copy.
    direct, staged = weights(torch.bfloat16), weights(torch.bfloat16)
    run(CPUOffloadAdamW(direct, lr=LR), direct, STEPS, torch.bfloat16)
    optimizer = CPUOffloadAdamW(staged, lr=LR)
    optimizer.staging = packed([p.shape for p in staged], torch.bfloat16, pin=False)
    run(optimizer, staged, STEPS, torch.bfloat16)
    for a, b in zip(direct, staged):
        assert torch.equal(a, b)


def test_the_for_loop_fallback_is_torch_adamw_bit_for_bit(monkeypatch):
    # A PyTorch without the fused CPU kernel gets the for-loop implementation: the reference itself.
    monkeypatch.setattr(optim, "cpu_adamw_options", lambda: {"foreach": False})
    params = weights()
    optimizer = CPUOffloadAdamW(params, lr=LR)
    run(optimizer, params, STEPS)
    for p, want in zip(params, reference(STEPS)):
        assert torch.equal(p.detach(), want)


def test_a_resumed_optimizer_continues_bit_for_bit():
    straight = weights()
    run(CPUOffloadAdamW(straight, lr=LR), straight, STEPS)

    first = weights()
    optimizer = CPUOffloadAdamW(first, lr=LR)
    run(optimizer, first, 3)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed = weights()
    optimizer = CPUOffloadAdamW(resumed, lr=LR)
    optimizer.load_state_dict(torch.load(buffer, weights_only=False))
    run(optimizer, resumed, STEPS - 3, start=3)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_a_checkpoint_of_another_implementation_resumes_with_ours():
    # Checkpoints from before the fused path say fused=None in their groups: loading keeps our choice.
    params = weights()
    optimizer = CPUOffloadAdamW(params, lr=LR)
    run(optimizer, params, 2)
    state = optimizer.state_dict()
    for group in state["inner"]["param_groups"]:
        group["fused"] = None
    optimizer = CPUOffloadAdamW(weights(), lr=LR)
    optimizer.load_state_dict(state)
    assert all(g["fused"] is True for g in optimizer.param_groups)
    optimizer.param_groups[0]["lr"] = 0.5 * LR  # the trainer's schedule writes through param_groups
    assert optimizer.inner.param_groups[0]["lr"] == 0.5 * LR


def test_packed_tensors_have_their_shapes_and_do_not_overlap(monkeypatch):
    # Blocks of 256 fp32 values: 1000 values get a buffer of their own, the rest share a few.
    monkeypatch.setattr(optim, "ARENA_BYTES", 1024)
    shapes = [torch.Size(s) for s in [(10, 10), (1000,), (100,), (0,), (3, 7), (200,)]]
    tensors = packed(shapes, torch.float32, pin=False)
    assert [t.shape for t in tensors] == shapes
    assert all(t.is_contiguous() and t.data_ptr() % optim.ALIGN_BYTES == 0 for t in tensors if t.numel())
    for i, t in enumerate(tensors):
        t.fill_(i)
    assert all(torch.all(t == i) for i, t in enumerate(tensors))
    assert len({t.untyped_storage().data_ptr() for t in tensors}) < len(shapes)
