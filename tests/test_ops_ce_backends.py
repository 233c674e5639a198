"""The cross-entropy ops through the public API on every kernel backend, against the float64
oracle (tests/_ce_ref.py) with FlashAttention's tolerance rule, the same references and rule the
Triton launcher tests use (test_kernel_cross_entropy.py):
  "triton"  on CPU under TRITON_INTERPRET=1 (suite ce_kernel);
  "cuda"    on CPU through the CPU execution layer, GPTFAST_CUDA_SIM=1 (suite cuda_sim), each
            case under forward, reverse and random thread/block orders: bit-equal results, except
            the linear backward's fp32 atomics (an ulp of the output dtype).
fp32 for the row kernels over given logits; fp16 and bf16 everywhere (the CUDA linear kernels
are built on mma.sync, which has no fp32 form: fp32 is declined with that reason). Also opcheck
of the CUDA ops and torch.compile(fullgraph=True) through them."""
import pytest
import torch

import gptfast
from _cuda_sim import under_orders
from gptfast import BackendError
from test_kernel_cross_entropy import (BF16, FP16, FP32, IGNORE, OPTION_SETS, _check_ce,
                                       _check_linear, _randn, _targets)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [pytest.param("triton", marks=pytest.mark.ce_kernel),
            pytest.param("cuda", marks=pytest.mark.cuda_sim)]


def on(backend, fn, exact=True, dtype=torch.float32):
    """fn() once, or, for the CUDA kernels on the CPU layer, under every order."""
    if backend == "cuda" and DEVICE == "cpu":
        ulp2 = 2 * torch.finfo(dtype).eps
        return under_orders(fn, exact=exact, atol=ulp2, rtol=ulp2)
    return fn()


def _api(opts):
    return {k: v for k, v in opts.items() if k != "ignore_index"} | {"ignore_index": IGNORE}


# ---- cross-entropy over given logits ------------------------------------------------------------

CE_CASES = [
    (FP32, 257, "plain", 0.0, False),
    (FP32, 1000, "everything", 0.2, True),
    (FP16, 1000, "zloss_softcap", 0.0, True),
    (BF16, 257, "ignore_smooth", 0.3, False),
    (BF16, 1000, "everything", 0.2, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,V,name,ignore_frac,with_glse", CE_CASES)
def test_cross_entropy(backend, dtype, V, name, ignore_frac, with_glse):
    gen = torch.Generator().manual_seed(V + int(with_glse))
    N = 29
    opts = OPTION_SETS[name]
    x = _randn((N, V), gen, dtype, scale=3.0)
    t = _targets(N, V, gen, ignore_frac)
    g = torch.rand(N, generator=gen).to(DEVICE) + 0.5
    g_lse = (torch.rand(N, generator=gen).to(DEVICE) - 0.5) if with_glse else None

    def run():
        xr = x.detach().clone().requires_grad_()
        loss, lse = gptfast.cross_entropy(xr, t, reduction="none", return_lse=True,
                                          backend=backend, **_api(opts))
        total = (loss * g).sum() + ((lse * g_lse).sum() if g_lse is not None else 0)
        (dx,) = torch.autograd.grad(total, xr)
        return loss.detach(), lse.detach(), dx
    loss, lse, dx = on(backend, run)
    _check_ce((loss, lse, dx), x, t, g, g_lse, dtype, opts)
    ignored = (t == IGNORE).cpu()
    assert (loss.cpu()[ignored] == 0).all() and (dx.cpu()[ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_inplace_backward(backend):
    gen = torch.Generator().manual_seed(4)
    N, V = 21, 300
    opts = OPTION_SETS["zloss_softcap"]
    x = _randn((N, V), gen, BF16, scale=2.0)
    t = _targets(N, V, gen, 0.2)

    def run():
        leaf = x.detach().clone().requires_grad_()
        logits = leaf * 1.0            # a non-leaf buffer the backward may overwrite
        ptrs = []
        logits.register_hook(lambda grad: ptrs.append(grad.data_ptr()))
        ptr = logits.data_ptr()
        loss = gptfast.cross_entropy(logits, t, reduction="sum", inplace_backward=True,
                                     backend=backend, **_api(opts))
        loss.backward()
        assert ptrs == [ptr]           # the gradient is the logits buffer itself
        return loss.detach(), leaf.grad
    loss, dx = on(backend, run)
    _check_ce((None, None, dx), x, t, None, None, BF16, opts)


# ---- linear cross-entropy -------------------------------------------------------------------------

LCE_CASES = [
    # dtype, N, V, D, bias, options, ignore_frac, grad_lse
    (FP16, 70, 1000, 48, True, "zloss_softcap", 0.1, False),
    (BF16, 77, 257, 40, True, "everything", 0.2, True),
    (BF16, 66, 300, 33, False, "ignore_smooth", 0.3, False),   # odd D: the unaligned loaders
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,N,V,D,with_bias,name,ignore_frac,with_glse", LCE_CASES)
def test_linear_cross_entropy_lean(backend, dtype, N, V, D, with_bias, name, ignore_frac,
                                   with_glse):
    gen = torch.Generator().manual_seed(N * V + D)
    opts = OPTION_SETS[name]
    h = _randn((N, D), gen, dtype)
    w = _randn((V, D), gen, dtype, scale=2.0 / D ** 0.5)
    b = _randn((V,), gen, dtype, scale=0.5) if with_bias else None
    t = _targets(N, V, gen, ignore_frac)
    g = torch.rand(N, generator=gen).to(DEVICE) + 0.5
    g_lse = (torch.rand(N, generator=gen).to(DEVICE) - 0.5) if with_glse else None

    def run():
        leaves = [p.detach().clone().requires_grad_() for p in (h, w, b) if p is not None]
        loss, lse = gptfast.linear_cross_entropy(
            leaves[0], leaves[1], t, bias=leaves[2] if b is not None else None, reduction="none",
            return_lse=True, backend=backend, **_api(opts))
        total = (loss * g).sum() + ((lse * g_lse).sum() if g_lse is not None else 0)
        grads = torch.autograd.grad(total, leaves)
        return (loss.detach(), lse.detach(), *grads)
    out = on(backend, run, exact=False, dtype=dtype)
    loss, lse, dh, dw = out[:4]
    db = out[4] if b is not None else None
    _check_linear((loss, lse, dh, dw, db), h, w, t, b, g, g_lse, dtype, opts)


BUDGET_CASES = [
    (BF16, 50, 257, 32, True, "everything", 0.2, "mean"),
    (FP16, 64, 300, 32, False, "plain", 0.0, "sum"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,N,V,D,with_bias,name,ignore_frac,reduction", BUDGET_CASES)
def test_linear_cross_entropy_budgeted(backend, dtype, N, V, D, with_bias, name, ignore_frac,
                                       reduction):
    gen = torch.Generator().manual_seed(N + V + D)
    opts = OPTION_SETS[name]
    h = _randn((N, D), gen, dtype)
    w = _randn((V, D), gen, dtype, scale=2.0 / D ** 0.5)
    b = _randn((V,), gen, dtype, scale=0.5) if with_bias else None
    t = _targets(N, V, gen, ignore_frac)

    def run():
        leaves = [p.detach().clone().requires_grad_() for p in (h, w, b) if p is not None]
        loss = gptfast.linear_cross_entropy(
            leaves[0], leaves[1], t, bias=leaves[2] if b is not None else None,
            reduction=reduction, memory_budget=1 << 30, backend=backend, **_api(opts))
        return (loss.detach(), *torch.autograd.grad(loss, leaves))
    out = on(backend, run, exact=False, dtype=dtype)
    n_valid = int((t != IGNORE).sum())
    scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
    g = torch.full((N,), scale, dtype=torch.float64)
    db = out[3] if b is not None else None
    _check_linear((None, None, out[1], out[2], db), h, w, t, b, g, None, dtype, opts)
    want = (gptfast.linear_cross_entropy(h, w, t, bias=b, reduction=reduction, backend="torch",
                                         **_api(opts)))
    torch.testing.assert_close(out[0], want, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda_sim
def test_cuda_declines_fp32_linear_with_the_reason():
    h, w = torch.randn(4, 16, device=DEVICE), torch.randn(20, 16, device=DEVICE)
    t = torch.randint(0, 20, (4,), device=DEVICE)
    with pytest.raises(BackendError, match="mma.sync.*no fp32 form.*TF32.*can: triton, torch"):
        gptfast.linear_cross_entropy(h, w, t, backend="cuda")
    d = gptfast.explain(gptfast.linear_cross_entropy, h.bfloat16(), w.bfloat16(), t)
    assert d.reasons["cuda"] is None
    if DEVICE == "cpu":  # the CPU layer is a test harness: "auto" never picks it
        assert d.backend == "torch"


# ---- the op boundary: opcheck, torch.compile ------------------------------------------------------

@pytest.mark.cuda_sim
def test_opcheck_cuda_cross_entropy_ops():
    """Every gptfast::cuda_* cross-entropy op, on detached inputs (autograd lives outside)."""
    gen = torch.Generator().manual_seed(9)
    h, w, b = (_randn(s, gen, BF16, 0.5) for s in ((20, 32), (129, 32), (129,)))
    t = _targets(20, 129, gen, 0.2)
    opts = (IGNORE, 0.1, 1e-3, 5.0)
    ops = torch.ops.gptfast
    gptfast.linear_cross_entropy(h, w, t, backend="cuda")  # loads the layer eagerly on CPU
    torch.library.opcheck(ops.cuda_linear_cross_entropy_fwd, (h, w, t, b, *opts))
    _, lse = ops.cuda_linear_cross_entropy_fwd(h, w, t, b, *opts)
    g = torch.rand(20, device=DEVICE)
    torch.library.opcheck(ops.cuda_linear_cross_entropy_bwd,
                          (g, torch.rand(20, device=DEVICE), h, w, t, b, lse, *opts))
    torch.library.opcheck(ops.cuda_linear_cross_entropy_bwd,
                          (g.new_ones(()).expand(20), None, h, w, t, None, lse, *opts))
    torch.library.opcheck(ops.cuda_linear_cross_entropy_fwd_grad, (h, w, t, b, *opts, 1, 1 << 30))
    x = _randn((9, 130), gen, FP32)
    tx = _targets(9, 130, gen, 0.2)
    torch.library.opcheck(ops.cuda_cross_entropy_fwd, (x, tx, *opts))
    _, lse = ops.cuda_cross_entropy_fwd(x, tx, *opts)
    torch.library.opcheck(ops.cuda_cross_entropy_bwd,
                          (torch.rand(9, device=DEVICE), None, x, tx, lse, *opts))
    torch.library.opcheck(ops.cuda_cross_entropy_bwd_,
                          (torch.rand(9, device=DEVICE), torch.rand(9, device=DEVICE), x.clone(),
                           tx, lse, *opts))


@pytest.mark.cuda_sim
def test_fullgraph_compile_through_the_cuda_ops():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(10)
    h = _randn((24, 32), gen, BF16).requires_grad_()
    w = _randn((129, 32), gen, BF16, 0.3).requires_grad_()
    t = _targets(24, 129, gen, 0.2)

    def loss_fn(h, w):
        logits = (h @ w.t()).float()
        return (gptfast.linear_cross_entropy(h, w, t, z_loss=1e-3, backend="cuda")
                + gptfast.cross_entropy(logits, t, label_smoothing=0.1, backend="cuda"))
    eager = loss_fn(h, w)                      # also loads the CPU layer before tracing
    g_eager = torch.autograd.grad(eager, (h, w))
    compiled = torch.compile(loss_fn, fullgraph=True)(h, w)
    g_comp = torch.autograd.grad(compiled, (h, w))
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(g_comp, g_eager):
        torch.testing.assert_close(a.float(), e.float(), atol=2e-2, rtol=2e-2)
