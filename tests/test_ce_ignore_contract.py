"""The ignore_index contract, in every backend: a row whose target is ignore_index has loss 0
and lse 0 (its lse is not computed: the lean kernels skip those rows entirely), and neither
its loss nor its lse passes a gradient to anything.

Checked for both cross-entropy ops and both linear schedules, on each backend that can run
here: "torch" in the unit suite, "triton" (the interpreter on CPU) in ce_kernel, "cuda" where
its extension is built. The gradient of loss + sum(lse * g_lse), with g_lse non-zero on every
row, must equal the one computed from the valid rows alone."""
import pytest
import torch

import gptfast
from gptfast.ops import BackendError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
BACKENDS = [pytest.param("torch", id="torch"),
            pytest.param("triton", id="triton", marks=pytest.mark.ce_kernel),
            pytest.param("cuda", id="cuda", marks=pytest.mark.ce_kernel)]
# (op, memory_budget, reduction): the lean and the budgeted linear schedules
CASES = [("cross_entropy", None, "none"), ("linear_cross_entropy", None, "none"),
         ("linear_cross_entropy", None, "sum"), ("linear_cross_entropy", 1 << 30, "mean")]


def _inputs(dtype):
    gen = torch.Generator().manual_seed(4)
    N, D, V = 37, 16, 70
    h = (torch.randn(N, D, generator=gen) * 0.7).to(DEVICE, dtype)
    w = (torch.randn(V, D, generator=gen) * 0.7).to(DEVICE, dtype)
    b = (torch.randn(V, generator=gen) * 0.3).to(DEVICE, dtype)
    t = torch.randint(0, V, (N,), generator=gen)
    t[0] = t[N - 1] = t[5] = t[17] = IGNORE   # the first and last rows, and a row tile's
    g_lse = (torch.rand(N, generator=gen) + 0.5).to(DEVICE)
    return h, w, b, t.to(DEVICE), g_lse


def _run(op, backend, h, w, b, t, g_lse, budget, reduction):
    """(loss, lse, grads of loss.sum() + sum(lse * g_lse) w.r.t. the inputs)."""
    params = [p.detach().requires_grad_() for p in (h, w, b)]
    opts = dict(ignore_index=IGNORE, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                return_lse=True, backend=backend)
    if op == "cross_entropy":
        logits = (params[0] @ params[1].t() + params[2]).detach().requires_grad_()
        loss, lse = gptfast.cross_entropy(logits, t, **opts)
        leaves = [logits]
    else:
        loss, lse = gptfast.linear_cross_entropy(params[0], params[1], t, bias=params[2],
                                                 memory_budget=budget, **opts)
        leaves = params
    total = loss.sum() + (lse * g_lse.to(lse.dtype)).sum()
    return loss.detach(), lse.detach(), torch.autograd.grad(total, leaves)


@pytest.mark.parametrize("op,budget,reduction", CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_have_zero_loss_zero_lse_and_pass_no_gradient(backend, op, budget,
                                                                    reduction):
    dtype = torch.float64 if backend == "torch" else torch.float32
    h, w, b, t, g_lse = _inputs(dtype)
    try:
        loss, lse, grads = _run(op, backend, h, w, b, t, g_lse, budget, reduction)
    except BackendError as e:
        pytest.skip(f"backend {backend!r} cannot run here: {str(e).splitlines()[0]}")
    ignored = t == IGNORE
    assert lse.dtype in (torch.float32, torch.float64)
    assert (lse[ignored] == 0).all(), lse[ignored]
    assert lse[~ignored].abs().min() > 0
    if reduction == "none":
        assert (loss[ignored] == 0).all()
    # The same step on the valid rows alone: every gradient must agree, and the ignored rows'
    # own gradient (dlogits, dhidden) is exactly zero.
    keep = ~ignored
    if op == "cross_entropy":
        sub = _run(op, backend, h[keep], w, b, t[keep], g_lse[keep], budget, reduction)
        assert (grads[0][ignored] == 0).all()
        torch.testing.assert_close(grads[0][keep], sub[2][0], atol=1e-6, rtol=1e-5)
        return
    sub = _run(op, backend, h[keep], w, b, t[keep], g_lse[keep], budget, reduction)
    if reduction == "none":
        torch.testing.assert_close(loss[keep], sub[0], atol=1e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(loss, sub[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse[keep], sub[1], atol=1e-6, rtol=1e-5)
    dh, dw, db = grads
    assert (dh[ignored] == 0).all()
    torch.testing.assert_close(dh[keep], sub[2][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dw, sub[2][1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(db, sub[2][2], atol=1e-6, rtol=1e-5)
