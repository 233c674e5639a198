"""FlashAttention's tolerance rule, shared by the kernel tests.

A kernel's max error against a float64 oracle must be at most `mult` times the max error of
PyTorch's own computation in the same dtype (the "eager" yardstick) against that oracle, plus
a tiny `atol` for results whose eager error can be ~0: 2x for outputs, 3x for gradients. The
yardstick scales with the dtype, so one rule covers fp32, fp16 and bf16.
"""
import os

import torch


def assert_rule(name, got, ref, eager, mult, atol):
    """max|got - ref| <= mult * max|eager - ref| + atol; NaN never passes, infinities must
    coincide exactly."""
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    got, ref, eager = got.detach().double().cpu(), ref.detach().double().cpu(), \
        eager.detach().double().cpu()
    assert not torch.isnan(got).any(), f"{name}: NaN in kernel result"
    inf = torch.isinf(ref)
    if inf.any():
        assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], ref[inf]), \
            f"{name}: inf mismatch"
        got, ref, eager = got[~inf], ref[~inf], eager[~inf]
    if ref.numel() == 0:
        return
    err = (got - ref).abs().max().item()
    eager_err = (eager - ref).abs().max().item()
    bound = mult * eager_err + atol
    if os.environ.get("GPTFAST_PRINT_RULE"):  # margins, for tuning tests: err / bound
        print(f"RULE {name}: err {err:.3e} eager {eager_err:.3e} ratio {err / bound:.3f}")
    assert err <= bound, f"{name}: max err {err:.3e} > {bound:.3e} (eager err {eager_err:.3e})"
