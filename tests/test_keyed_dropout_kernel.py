"""The Triton keyed-dropout kernel (gptfast/kernels/dropout.py) against the torch expression it
replaces on eager CUDA tensors: the same mask bit for bit, the same values, the same gradient,
in every dtype (under the Triton interpreter on CPU; bf16 through gptfast's interpreter fix)."""
import pytest
import torch

from gptfast.kernels import dropout as kern
from gptfast.randomness import keyed_bits, keyed_dropout, sample_keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kernel_matches_the_torch_expression(dtype, p):
    # rows of 3 * 700 = 2100 elements: two full blocks of 1024 and a ragged one
    x = torch.randn(5, 3, 700).to(dtype).requires_grad_()
    keys = sample_keys(seed=11, first=1000, n=5)
    want = keyed_dropout(x, p, keys, site=7, use_kernel=False)
    got = keyed_dropout(x, p, keys, site=7, use_kernel=True)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got != 0, want != 0)   # the same mask (x has no exact zeros)
    assert torch.equal(got, want)
    g = torch.randn_like(x)
    (gx_want,) = torch.autograd.grad(want, x, g)
    (gx_got,) = torch.autograd.grad(got, x, g)
    assert torch.equal(gx_got, gx_want)
    keep = (keyed_bits(keys, 7, 2100) >= round(p * 2.0**32)).view(x.shape)
    assert torch.equal(got != 0, keep)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.03, frac


def test_kernel_rows_with_a_stride_and_a_grid_past_axis_limits():
    base = torch.randn(4, 2, 300)
    x = base[:, 1]                      # rows of 300 with a row stride of 600
    keys = sample_keys(seed=3, first=0, n=4)
    got = keyed_dropout(x, 0.3, keys, site=1, use_kernel=True)
    assert torch.equal(got, keyed_dropout(x, 0.3, keys, site=1, use_kernel=False))
    # 2**20 rows of 2**16 elements: 2**26 programs, all on axis 0
    assert kern.keyed_dropout_grid(2**20, 2**16) == (2**26,)
