"""The SDPA backend choice: same attention on the CPU, clear errors for backends the device lacks, and the
CUDA backends against the math reference on a GPU."""

import pytest
import torch
import torch.nn.functional as F
from test_fast_fuse import inputs, run, tiny_transformer

from cogvideox import InputError
from cogvideox.fast.attention import BACKENDS, use_attention_backend


@pytest.mark.parametrize("name", ["auto", "math"])
def test_cpu_backends_give_the_default_attention(name):
    exact = tiny_transformer()
    model = tiny_transformer()
    assert use_attention_backend(model, name) == 2
    args = inputs(exact)
    assert torch.allclose(run(model, *args), run(exact, *args), rtol=1e-5, atol=1e-5)


def test_unknown_and_unavailable_backends_are_user_errors():
    with pytest.raises(InputError, match="unknown attention backend 'xformers'"):
        use_attention_backend(tiny_transformer(), "xformers")
    with pytest.raises(InputError, match="the cudnn attention backend needs a CUDA GPU"):
        use_attention_backend(tiny_transformer(), "cudnn")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuDNN / flash / efficient kernels need a CUDA GPU")
@pytest.mark.parametrize("name", ["auto", "cudnn", "flash", "efficient"])
def test_cuda_backends_match_math_at_the_5b_head_size(name):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1000, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    with torch.nn.attention.sdpa_kernel(BACKENDS["math"]):
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    with torch.nn.attention.sdpa_kernel(BACKENDS[name], set_priority=True):
        got = F.scaled_dot_product_attention(q, k, v)
    assert ((got.float() - want).norm() / want.norm()) < 1e-2
