"""Tests for gptfast.kernels.cross_entropy against a float64 autograd oracle.

Without CUDA the kernels run under TRITON_INTERPRET=1 (set below, before triton is imported) on
small shapes, in fp32, fp16 and bf16 (bf16 through gptfast's fix of the interpreter,
kernels/_interpreter.py). Every output the launchers allocate is poisoned with NaN first, so an
element a kernel forgets to write fails the comparison.

Tolerance: FlashAttention's rule (tests/_tolerance.py): the kernel's max error against the
float64 oracle is at most 2x (loss, lse) or 3x (gradients) that of the same math run by
PyTorch eagerly in the input dtype, plus a floor of a few fp32 units in the last place
(relative to the result's magnitude) for results whose eager error can be ~0.
"""
import math
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import gptfast.kernels.cross_entropy as ce  # noqa: E402
import gptfast.kernels.cross_entropy_plan as plan  # noqa: E402
from gptfast.kernels import configs  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _ce_ref import ce_reference, ce_rows_reference, linear_ce_reference  # noqa: E402
from _tolerance import assert_rule  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
IGNORE = -100
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

pytestmark = pytest.mark.ce_kernel

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(ce, "POISON_OUTPUTS", True)


def _opts(ignore_index=IGNORE, label_smoothing=0.0, z_loss=0.0, softcap=None):
    return dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                softcap=softcap)


def _targets(n, v, gen, ignore_frac=0.0):
    t = torch.randint(0, v, (n,), generator=gen)
    if ignore_frac > 0:
        t[torch.rand(n, generator=gen) < ignore_frac] = IGNORE
        t[0] = IGNORE  # the first row and a row tile boundary are the likeliest to break
    return t.to(DEVICE)


def _randn(shape, gen, dtype, scale=1.0):
    # Fresh random values (never zeros), rounded to the test dtype before the oracle sees them.
    return (torch.randn(shape, generator=gen) * scale).to(DEVICE, dtype)


def _close(actual, expected, tol):
    """Fixed tolerance: only for the GPU tests below (large shapes, no eager yardstick)."""
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=tol, rtol=tol)


# The floor: a few fp32 units in the last place of the oracle's magnitude, whatever the dtype
# (every kernel computes in fp32; where the eager error is ~0, fp32 rounding is all that's left).
FLOOR = 8 * torch.finfo(torch.float32).eps


def _rule(name, got, ref, eager, mult, dtype):
    """FlashAttention's rule against the float64 oracle, with PyTorch eager in `dtype`."""
    scale = max(1.0, ref.detach().double().abs().max().item()) if ref.numel() else 1.0
    assert_rule(name, got, ref, eager, mult, FLOOR * scale)


def _check_ce(outs, x, t, g, g_lse, dtype, opts, names=("loss", "lse", "dlogits")):
    """outs = kernel (loss, lse, dlogits) for logits x; dlogits may be None."""
    want = ce_reference(x, t, grad_rows=g, grad_lse=g_lse, **opts)
    eager = ce_reference(x, t, grad_rows=g, grad_lse=g_lse, dtype=dtype, **opts)
    for name, got, w, e, mult in zip(names, outs, want, eager, (2, 2, 3)):
        if got is not None:
            _rule(name, got, w, e, mult, dtype)


def _check_linear(outs, h, w, t, b, g, g_lse, dtype, opts, grad_scale=1.0):
    """outs = kernel (loss, lse, dh, dw, db); entries may be None (not checked)."""
    want = linear_ce_reference(h, w, t, b, grad_rows=g, grad_lse=g_lse, **opts)
    eager = linear_ce_reference(h, w, t, b, grad_rows=g, grad_lse=g_lse, dtype=dtype, **opts)
    for name, got, r, e, mult in zip(("loss", "lse", "dhidden", "dweight", "dbias"), outs, want,
                                     eager, (2, 2, 3, 3, 3)):
        if got is not None:
            _rule(name, got, r, e, mult, dtype)


OPTION_SETS = {
    "plain": _opts(),
    "ignore_smooth": _opts(label_smoothing=0.1),
    "zloss_softcap": _opts(z_loss=1e-3, softcap=4.0),
    "everything": _opts(label_smoothing=0.2, z_loss=1e-2, softcap=6.0),
}


# ---------------------------------------------------------------------------- oracle check
def test_reference_matches_torch_cross_entropy():
    """The oracle agrees with F.cross_entropy where the two overlap (no kernels run)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(33, 50, generator=gen, dtype=torch.float64) * 2
    t = torch.randint(0, 50, (33,), generator=gen)
    t[::5] = IGNORE
    loss, _ = ce_rows_reference(x, t, **_opts(label_smoothing=0.3))
    want = F.cross_entropy(x, t, ignore_index=IGNORE, label_smoothing=0.3, reduction="none")
    torch.testing.assert_close(loss, want)


# ------------------------------------------------------------------- cross_entropy (logits)
CE_CASES = [
    (FP32, 257, "plain", 0.0, False),
    (FP32, 1000, "ignore_smooth", 0.3, True),
    (FP32, 257, "everything", 0.2, True),
    (FP16, 1000, "zloss_softcap", 0.0, True),
    (FP16, 257, "everything", 0.2, False),
    (BF16, 257, "plain", 0.0, False),
    (BF16, 1000, "ignore_smooth", 0.3, True),
    (BF16, 257, "zloss_softcap", 0.1, False),
    (BF16, 257, "everything", 0.2, True),
]


@pytest.mark.parametrize("dtype,V,name,ignore_frac,with_glse", CE_CASES)
def test_ce_forward_backward(dtype, V, name, ignore_frac, with_glse):
    gen = torch.Generator().manual_seed(V)
    N = 67
    opts = OPTION_SETS[name]
    x = _randn((N, V), gen, dtype, scale=3.0)
    t = _targets(N, V, gen, ignore_frac)
    g = torch.rand(N, generator=gen).to(DEVICE) + 0.5
    g_lse = (torch.rand(N, generator=gen).to(DEVICE) - 0.5) if with_glse else None

    before = dict(ce.LAUNCHES)
    loss, lse = ce.cross_entropy_forward(x, t, **opts)
    dx = ce.cross_entropy_backward(g, g_lse, x, t, lse, **opts)
    assert ce.LAUNCHES["ce_fwd"] == before.get("ce_fwd", 0) + 1
    assert ce.LAUNCHES["ce_bwd"] == before.get("ce_bwd", 0) + 1
    assert loss.dtype == lse.dtype == torch.float32 and loss.shape == lse.shape == (N,)
    assert dx.dtype == dtype and dx.shape == (N, V)

    _check_ce((loss, lse, dx), x, t, g, g_lse, dtype, opts)
    ignored = (t == IGNORE).cpu()
    assert (loss.cpu()[ignored] == 0).all() and (lse.cpu()[ignored] == 0).all()
    assert (dx.cpu()[ignored] == 0).all()


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_ce_noncontiguous_rows_stride0_grad_and_inplace(dtype):
    """Logits rows with a padded stride, an expanded (stride-0) grad_rows, inplace backward."""
    gen = torch.Generator().manual_seed(1)
    N, V = 45, 257
    opts = _opts(label_smoothing=0.05, softcap=3.0)
    base = _randn((N, V + 19), gen, dtype, scale=2.0)
    x = base[:, 3:3 + V]
    assert not x.is_contiguous() and x.stride(1) == 1
    t = _targets(N, V, gen, 0.2)
    g = torch.tensor(0.37, device=DEVICE).expand(N)
    assert g.stride(0) == 0

    loss, lse = ce.cross_entropy_forward(x, t, **opts)
    dx = ce.cross_entropy_backward(g, None, x, t, lse, **opts)
    assert dx.is_contiguous()
    _check_ce((loss, lse, dx), x, t, g, None, dtype, opts)

    x_before = x.clone()
    pad_before = base[:, :3].clone()
    pad_after = base[:, 3 + V:].clone()
    dx_inplace = ce.cross_entropy_backward(g, None, x, t, lse, inplace=True, **opts)
    assert dx_inplace.data_ptr() == x.data_ptr()
    _check_ce((None, None, base[:, 3:3 + V]), x_before, t, g, None, dtype, opts)
    # The padding around the rows is untouched.
    assert torch.equal(base[:, :3], pad_before) and torch.equal(base[:, 3 + V:], pad_after)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_ce_lse_only_gradient(dtype):
    """grad_rows=None: only the returned lse is in the loss (the launcher once crashed here)."""
    gen = torch.Generator().manual_seed(11)
    N, V = 37, 300
    opts = _opts(label_smoothing=0.1, z_loss=1e-3)
    x = _randn((N, V), gen, dtype, scale=2.0)
    t = _targets(N, V, gen, 0.2)
    g_lse = torch.rand(N, generator=gen).to(DEVICE) - 0.5
    loss, lse = ce.cross_entropy_forward(x, t, **opts)
    dx = ce.cross_entropy_backward(None, g_lse, x, t, lse, **opts)
    assert dx.dtype == dtype and dx.shape == (N, V)
    _check_ce((loss, lse, dx), x, t, "zero", g_lse, dtype, opts)
    assert (dx.cpu()[(t == IGNORE).cpu()] == 0).all()
    # Neither gradient: zeros, in place too.
    assert (ce.cross_entropy_backward(None, None, x, t, lse, **opts) == 0).all()
    assert (ce.cross_entropy_backward(None, None, x.clone(), t, lse, inplace=True,
                                      **opts) == 0).all()


@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_ce_all_ignored(dtype):
    gen = torch.Generator().manual_seed(2)
    N, V = 20, 300
    x = _randn((N, V), gen, dtype)
    t = torch.full((N,), IGNORE, device=DEVICE)
    opts = _opts(z_loss=1e-2, label_smoothing=0.1)
    loss, lse = ce.cross_entropy_forward(x, t, **opts)
    assert (loss == 0).all() and (lse == 0).all()
    dx = ce.cross_entropy_backward(torch.ones(N, device=DEVICE), torch.ones(N, device=DEVICE),
                                   x, t, lse, **opts)
    assert (dx == 0).all()


def test_ce_out_of_range_target_gives_nan_row():
    gen = torch.Generator().manual_seed(3)
    N, V = 24, 257
    x = _randn((N, V), gen, torch.float32)
    t = _targets(N, V, gen)
    t[5], t[11], t[17] = V, -7, 10**12  # past the end, negative (not ignore_index), huge
    t[2] = IGNORE
    opts = _opts(label_smoothing=0.1)
    loss, lse = ce.cross_entropy_forward(x, t, **opts)
    bad = torch.zeros(N, dtype=torch.bool)
    bad[[5, 11, 17]] = True
    assert loss.cpu()[bad].isnan().all()
    assert loss.cpu()[~bad].isfinite().all() and lse.isfinite().all()
    good = (~bad).to(DEVICE)
    dx = ce.cross_entropy_backward(torch.ones(N, device=DEVICE), None, x, t, lse, **opts)
    assert dx.cpu()[bad].isnan().all()
    _check_ce((loss[good], lse[good], dx[good]), x[good], t[good], None, None, FP32, opts)


# ------------------------------------------------------- linear cross-entropy, lean schedule
LCE_CASES = [
    # dtype, N, V, D, bias, options, ignore_frac, grad_lse
    (FP32, 77, 257, 40, True, "plain", 0.0, False),
    (FP32, 70, 1000, 32, False, "ignore_smooth", 0.3, True),
    (FP32, 90, 257, 64, True, "everything", 0.25, True),
    (FP16, 70, 1000, 48, True, "zloss_softcap", 0.1, False),
    (FP16, 66, 257, 32, False, "everything", 0.0, True),
    (BF16, 77, 257, 40, True, "plain", 0.0, False),
    (BF16, 70, 1000, 32, False, "ignore_smooth", 0.3, True),
    (BF16, 70, 300, 48, True, "zloss_softcap", 0.1, False),
    (BF16, 66, 257, 32, True, "everything", 0.2, True),
]


@pytest.mark.parametrize("dtype,N,V,D,with_bias,name,ignore_frac,with_glse", LCE_CASES)
def test_linear_ce_lean(dtype, N, V, D, with_bias, name, ignore_frac, with_glse):
    gen = torch.Generator().manual_seed(N * V + D)
    opts = OPTION_SETS[name]
    h = _randn((N, D), gen, dtype)
    w = _randn((V, D), gen, dtype, scale=2.0 / math.sqrt(D))
    b = _randn((V,), gen, dtype, scale=0.5) if with_bias else None
    t = _targets(N, V, gen, ignore_frac)
    g = torch.rand(N, generator=gen).to(DEVICE) + 0.5
    g_lse = (torch.rand(N, generator=gen).to(DEVICE) - 0.5) if with_glse else None

    before = dict(ce.LAUNCHES)
    loss, lse, grads = ce.linear_cross_entropy_forward(h, w, t, b, reduction="none", **opts)
    assert grads is None
    dh, dw, db = ce.linear_cross_entropy_backward(g, g_lse, h, w, t, b, lse, **opts)
    assert ce.LAUNCHES["lce_fwd"] == before.get("lce_fwd", 0) + 1
    assert ce.LAUNCHES["lce_bwd"] == before.get("lce_bwd", 0) + 1
    assert dh.dtype == dw.dtype == dtype and dh.shape == (N, D) and dw.shape == (V, D)
    assert (db is None) == (b is None)

    _check_linear((loss, lse, dh, dw, db), h, w, t, b, g, g_lse, dtype, opts)
    ignored = (t == IGNORE).cpu()
    assert (loss.cpu()[ignored] == 0).all() and (lse.cpu()[ignored] == 0).all()
    assert (dh.cpu()[ignored] == 0).all()


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_linear_ce_lse_only_gradient(dtype):
    """grad_rows=None: only the returned lse is in the loss (the launcher once crashed here;
    the budgeted schedule's lse gradient goes through this backward too)."""
    gen = torch.Generator().manual_seed(12)
    N, V, D = 50, 300, 32
    opts = _opts(softcap=5.0, z_loss=1e-3)
    h = _randn((N, D), gen, dtype)
    w = _randn((V, D), gen, dtype, scale=0.3)
    b = _randn((V,), gen, dtype, scale=0.5)
    t = _targets(N, V, gen, 0.2)
    g_lse = torch.rand(N, generator=gen).to(DEVICE) - 0.5
    loss, lse, _ = ce.linear_cross_entropy_forward(h, w, t, b, reduction="none", **opts)
    dh, dw, db = ce.linear_cross_entropy_backward(None, g_lse, h, w, t, b, lse, **opts)
    _check_linear((loss, lse, dh, dw, db), h, w, t, b, "zero", g_lse, dtype, opts)
    # Neither gradient: zeros of the right shapes and dtypes.
    zh, zw, zb = ce.linear_cross_entropy_backward(None, None, h, w, t, b, lse, **opts)
    for z, ref in ((zh, h), (zw, w), (zb, b)):
        assert z.shape == ref.shape and z.dtype == ref.dtype and (z == 0).all()


def test_linear_ce_lean_default_budget_and_strided_inputs():
    """memory_budget at or under the lean limit keeps the lean schedule; strided hidden/weight."""
    gen = torch.Generator().manual_seed(5)
    N, V, D = 50, 257, 32
    h = _randn((N, 2 * D), gen, torch.float32)[:, ::2]      # column stride 2
    w = _randn((D, V), gen, torch.float32, scale=0.3).t()   # transposed view
    t = _targets(N, V, gen, 0.1)
    opts = _opts(softcap=5.0)
    for budget in (None, plan.LEAN_MAX_BUDGET):
        loss, lse, grads = ce.linear_cross_entropy_forward(h, w, t, None, reduction="sum",
                                                           memory_budget=budget, **opts)
        assert grads is None
    dh, dw, db = ce.linear_cross_entropy_backward(torch.ones(N, device=DEVICE), None, h, w, t,
                                                  None, lse, **opts)
    assert db is None
    _check_linear((loss, lse, dh, dw, None), h, w, t, None, None, None, FP32, opts)


def test_linear_ce_lean_all_ignored():
    gen = torch.Generator().manual_seed(6)
    N, V, D = 40, 257, 32
    h = _randn((N, D), gen, torch.float16)
    w = _randn((V, D), gen, torch.float16)
    b = _randn((V,), gen, torch.float16)
    t = torch.full((N,), IGNORE, device=DEVICE)
    opts = _opts(z_loss=1e-3)
    loss, lse, _ = ce.linear_cross_entropy_forward(h, w, t, b, reduction="mean", **opts)
    assert (loss == 0).all() and (lse == 0).all()
    dh, dw, db = ce.linear_cross_entropy_backward(torch.ones(N, device=DEVICE), None, h, w, t, b,
                                                  lse, **opts)
    assert (dh == 0).all() and (dw == 0).all() and (db == 0).all()


def test_linear_ce_out_of_range_target_gives_nan_row():
    gen = torch.Generator().manual_seed(7)
    N, V, D = 40, 257, 32
    h = _randn((N, D), gen, torch.float32)
    w = _randn((V, D), gen, torch.float32, scale=0.3)
    t = _targets(N, V, gen)
    t[3], t[30] = V + 5, -1
    opts = _opts()
    loss, lse, _ = ce.linear_cross_entropy_forward(h, w, t, None, reduction="none", **opts)
    bad = torch.zeros(N, dtype=torch.bool)
    bad[[3, 30]] = True
    assert loss.cpu()[bad].isnan().all() and lse.isfinite().all()
    good = (~bad).to(DEVICE)
    _check_linear((loss[good], lse[good], None, None, None), h[good], w, t[good], None, None,
                  None, FP32, opts)
    # The backward reads nothing out of bounds; the bad rows poison (NaN) their gradients.
    dh, _, _ = ce.linear_cross_entropy_backward(torch.ones(N, device=DEVICE), None, h, w, t,
                                                None, lse, **opts)
    assert dh.cpu()[bad].isnan().all()


LEAN_MODE_CASES = [
    # dtype, dW accumulation (None: the configuration's), bias, options, lse gradient
    (FP32, None, True, "everything", True),
    (FP16, "atomic", True, "zloss_softcap", False),
    (FP16, "lock", False, "ignore_smooth", True),
    (BF16, "atomic", True, "everything", True),
    (BF16, "lock", True, "plain", False),
    (BF16, "fp32", False, "ignore_smooth", True),
]


@pytest.mark.parametrize("dtype,mode,with_bias,name,with_glse", LEAN_MODE_CASES)
def test_lean_backward_dh_chunks_and_dw_modes(monkeypatch, dtype, mode, with_bias, name,
                                              with_glse):
    """The lean backward over several fp32 dH chunks (the chunk limit lowered to 32 rows), the
    last one ragged, D not a multiple of the back-products' step; dW by 16-bit atomics, by
    lock + read-modify-write, or in an fp32 buffer. The launch count proves the chunking."""
    monkeypatch.setattr(plan, "ROW_ALIGN", 32)
    gen = torch.Generator().manual_seed(21)
    N, V, D = 90, 200, 40
    monkeypatch.setattr(plan, "DH_CHUNK_BYTES", 32 * D * 4)
    opts = OPTION_SETS[name]
    h = _randn((N, D), gen, dtype)
    w = _randn((V, D), gen, dtype, scale=2.0 / math.sqrt(D))
    b = _randn((V,), gen, dtype, scale=0.5) if with_bias else None
    t = _targets(N, V, gen, 0.2)
    g = torch.rand(N, generator=gen).to(DEVICE) + 0.5
    g_lse = (torch.rand(N, generator=gen).to(DEVICE) - 0.5) if with_glse else None
    loss, lse, _ = ce.linear_cross_entropy_forward(h, w, t, b, reduction="none", **opts)
    launches = []
    real = ce._lce_bwd_kernel
    monkeypatch.setattr(ce, "_lce_bwd_kernel", _Spy(real, launches))
    dh, dw, db = ce.linear_cross_entropy_backward(g, g_lse, h, w, t, b, lse,
                                                  dw_accumulation=mode, **opts)
    chunks = 1 if dtype == FP32 else math.ceil(N / 32)
    assert len(launches) == chunks
    assert dh.dtype == dw.dtype == dtype
    _check_linear((loss, lse, dh, dw, db), h, w, t, b, g, g_lse, dtype, opts)
    assert (dh.cpu()[(t == IGNORE).cpu()] == 0).all()


class _Spy:
    """Wraps a @triton.jit kernel: records each launch's grid, then launches it."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(grid)
        return self.kernel[grid]


def _gpu_blocks(monkeypatch, **blocks):
    """Give the interpreter the lean backward's GPU block sizes (H100 entry) where a test
    needs the GPU's accumulation depth."""
    table = configs.load("cross_entropy")
    cfg = table.interpreter["lce_bwd"].kwargs()
    cfg.update(blocks)
    monkeypatch.setitem(table.interpreter, "lce_bwd", configs.KernelConfig(cfg))


def test_lean_dw_accumulation_depth(monkeypatch):
    """dW accumulated in bf16 at the GPU's depth: N = 8192 rows in 128-row tiles, so 64 bf16
    atomic adds per dW element (each rounds the running sum once). Against float64:
      - fp32 accumulation (DW_ACCUM fp32) meets FlashAttention's rule (<= 3x PyTorch's bf16);
      - bf16 accumulation stays under the rigorous bound of a 64-deep bf16 sum,
        u * (K * A + 2 A') with u = 2**-8, K = 64 tile contributions, A = sum_k |c_k| the
        magnitudes of the tiles' float64 contributions and A' = sum_n |G_n| |h_n| (the
        gradient's own rounding), elementwise;
      - and within 8x PyTorch's own bf16 error: measured 5x (README: the lean schedule's
        precision), the cost of lean memory."""
    _gpu_blocks(monkeypatch, BLOCK_N=128, BLOCK_V=64)
    gen = torch.Generator().manual_seed(0)
    N, D, V = 8192, 32, 64
    opts = _opts()
    h = _randn((N, D), gen, BF16)
    w = _randn((V, D), gen, BF16, scale=0.5)
    t = _targets(N, V, gen)
    g = torch.full((N,), 1.0 / N, device=DEVICE)
    _, lse, _ = ce.linear_cross_entropy_forward(h, w, t, None, reduction="none", **opts)
    want = linear_ce_reference(h, w, t, None, grad_rows=g, **opts)[3].cpu()
    eager = linear_ce_reference(h, w, t, None, grad_rows=g, dtype=BF16, **opts)[3].cpu()
    eager_err = (eager.double() - want).abs().max().item()
    errs = {}
    for mode in ("atomic", "fp32"):
        dw = ce.linear_cross_entropy_backward(g, None, h, w, t, None, lse,
                                              dw_accumulation=mode, **opts)[1]
        errs[mode] = (dw.double().cpu() - want).abs()
    assert errs["fp32"].max() <= 3 * eager_err
    # The float64 per-tile contributions c_k = G_k^T H_k and their magnitudes.
    x = h.double().cpu() @ w.double().cpu().T
    G = (torch.softmax(x, -1) - F.one_hot(t.cpu(), V).double()) / N
    hk = h.double().cpu().view(N // 128, 128, D)
    contrib = torch.einsum("knv,knd->kvd", G.view(N // 128, 128, V), hk)   # (K, V, D)
    A = contrib.abs().sum(0)
    A2 = G.abs().T @ h.double().cpu().abs()
    u = 2.0 ** -8
    bound = u * (N // 128 * A + 2 * A2) + FLOOR
    assert (errs["atomic"] <= bound).all(), (errs["atomic"] / bound).max()
    assert errs["atomic"].max() <= 8 * eager_err, errs["atomic"].max() / eager_err


def test_lean_gradient_filtering(monkeypatch):
    """filter_eps = 2**-12 on a vocabulary whose tail has the low logits of a trained model's
    rare tokens (bias -3 log(1 + v), and a dead block at -40): most tiles are skipped, the
    skipped ones are exactly those whose every |gradient| is under eps x the row's upstream
    gradient, and dhidden / dweight keep FlashAttention's rule against float64 (README: the
    measured effect). The loss, lse and bias gradient do not change."""
    gen = torch.Generator().manual_seed(1)
    N, D, V = 256, 64, 1024
    opts = _opts()
    eps = 2.0 ** -12
    h = _randn((N, D), gen, BF16)
    w = _randn((V, D), gen, BF16, scale=2.0 / math.sqrt(D))
    bias = -3.0 * torch.log1p(torch.arange(V, dtype=torch.float32))
    bias[-64:] = -40.0
    b = bias.to(DEVICE, BF16)
    t = torch.multinomial(torch.softmax(bias[:-64], 0), N, replacement=True,
                          generator=gen).to(DEVICE)
    g = torch.full((N,), 1.0 / N, device=DEVICE)
    _, lse, _ = ce.linear_cross_entropy_forward(h, w, t, b, reduction="none", **opts)
    full = ce.linear_cross_entropy_backward(g, None, h, w, t, b, lse, **opts)
    filt = ce.linear_cross_entropy_backward(g, None, h, w, t, b, lse, filter_eps=eps, **opts)
    _check_linear((None, None) + filt, h, w, t, b, g, None, BF16, opts)
    assert torch.equal(filt[2], full[2])          # the bias gradient is never filtered
    # Which tiles the rule skips (interpreter blocks), from the float64 gradient.
    cfg = configs.load("cross_entropy").interpreter["lce_bwd"]
    x = h.double().cpu() @ w.double().cpu().T + b.double().cpu()
    G = (torch.softmax(x, -1) - F.one_hot(t.cpu(), V).double()) / N
    tile_max = G.abs().view(N // cfg.BLOCK_N, cfg.BLOCK_N, V // cfg.BLOCK_V, cfg.BLOCK_V)
    skip = tile_max.amax(dim=(1, 3)) < eps / N                      # (row tiles, vocab tiles)
    assert skip.float().mean() > 0.5 and not skip.all()
    # A vocabulary tile skipped by every row tile gets no dW at all; unfiltered, it does.
    dead = skip.all(dim=0).repeat_interleave(cfg.BLOCK_V)
    assert dead[-64:].all()
    assert (filt[1].cpu()[dead] == 0).all() and (full[1].cpu()[dead] != 0).any()
    # The change is the skipped tiles' float64 contribution, up to the results' bf16
    # rounding (measured here: 0.016% of max|dhidden|, 0.0014% of max|dweight|, 82% of the
    # tiles skipped; the errors against float64 did not change).
    mask = skip.repeat_interleave(cfg.BLOCK_N, 0).repeat_interleave(cfg.BLOCK_V, 1)
    dropped_dh = (G * mask) @ w.double().cpu()
    dropped_dw = (G * mask).T @ h.double().cpu()
    f0, n0 = filt[0].double().cpu(), full[0].double().cpu()
    assert ((f0 - n0).abs() <= dropped_dh.abs() + 2.0 ** -8 * (f0.abs() + n0.abs())
            + 1e-12).all()
    f1, n1 = filt[1].double().cpu(), full[1].double().cpu()
    assert (f1 - n1).abs().max() <= 2 * dropped_dw.abs().max() + 2.0 ** -8 * n1.abs().max()


# --------------------------------------------------- linear cross-entropy, budgeted schedule
BUDGET_CASES = [
    # dtype, N, V, D, bias, options, ignore_frac, reduction, chunks, dW accumulation
    (FP32, 77, 257, 40, True, "everything", 0.2, "mean", 3, "gradient"),
    (FP32, 64, 1000, 32, False, "plain", 0.0, "sum", 1, "gradient"),
    (FP16, 70, 1000, 48, True, "ignore_smooth", 0.3, "sum", 4, "fp32"),
    (FP16, 50, 257, 32, False, "zloss_softcap", 0.1, "mean", 2, "gradient"),
    (BF16, 77, 257, 40, True, "everything", 0.2, "mean", 3, "fp32"),
    (BF16, 64, 300, 32, False, "plain", 0.0, "sum", 1, "gradient"),
    (BF16, 70, 1000, 48, True, "ignore_smooth", 0.3, "sum", 4, "gradient"),
    (BF16, 50, 257, 32, True, "zloss_softcap", 0.1, "mean", 2, "fp32"),
]


def _budget_for(monkeypatch, N, V, D, dtype, bias, chunks, dw):
    """A test-sized budget that gives `chunks` token chunks with dW accumulated in an fp32
    buffer ("fp32") or in the gradient itself ("gradient"), through the schedule's own layout
    rule (the lean limit is lowered so that small budgets select the budgeted schedule)."""
    monkeypatch.setattr(plan, "LEAN_MAX_BUDGET", 0)
    # The fp32 accumulator always fits ("fp32"), or never ("gradient").
    monkeypatch.setattr(plan, "FP32_DW_FRACTION", 1e9 if dw == "fp32" else 0.0)
    b = torch.empty((), dtype=dtype).element_size()
    stride = -(-V // plan.LOGIT_ROW_ALIGN) * plan.LOGIT_ROW_ALIGN
    acc = (8 * V if bias else 0) + (4 * V * D if dw == "fp32" and b < 4 else 0)
    deferred = V * D * b if dw == "fp32" and b < 4 else 0  # dW's 16-bit copy comes at the end
    budget = acc + plan.ROW_BYTES * N + stride * b * math.ceil(N / chunks) - deferred
    lay = plan.budgeted_layout(N, D, V, dtype, budget, bias)
    assert math.ceil(N / lay.chunk_rows) == chunks and lay.dw_fp32 == (dw == "fp32"), lay
    return budget


@pytest.mark.parametrize("dtype,N,V,D,with_bias,name,ignore_frac,reduction,chunks,dw",
                         BUDGET_CASES)
def test_linear_ce_budgeted(monkeypatch, dtype, N, V, D, with_bias, name, ignore_frac,
                            reduction, chunks, dw):
    gen = torch.Generator().manual_seed(N + V + D)
    opts = OPTION_SETS[name]
    h = _randn((N, D), gen, dtype)
    w = _randn((V, D), gen, dtype, scale=2.0 / math.sqrt(D))
    b = _randn((V,), gen, dtype, scale=0.5) if with_bias else None
    t = _targets(N, V, gen, ignore_frac)
    budget = _budget_for(monkeypatch, N, V, D, dtype, with_bias, chunks, dw)

    before = dict(ce.LAUNCHES)
    loss, lse, grads = ce.linear_cross_entropy_forward(h, w, t, b, reduction=reduction,
                                                       memory_budget=budget, **opts)
    assert ce.LAUNCHES["lce_fwd"] == before.get("lce_fwd", 0) + 1
    assert ce.LAUNCHES["lce_bwd"] == before.get("lce_bwd", 0)
    dh, dw_, db = grads
    assert dh.dtype == dw_.dtype == dtype and (db is None) == (b is None)

    n_valid = int((t != IGNORE).sum())
    scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
    g = torch.full((N,), scale, dtype=torch.float64)
    _check_linear((loss, lse, dh, dw_, db), h, w, t, b, g, None, dtype, opts)
    ignored = (t == IGNORE).cpu()
    assert (loss.cpu()[ignored] == 0).all() and (lse.cpu()[ignored] == 0).all()

    # reduction "none" never returns forward gradients, whatever the budget.
    _, _, none_grads = ce.linear_cross_entropy_forward(h, w, t, b, reduction="none",
                                                       memory_budget=budget, **opts)
    assert none_grads is None


def test_linear_ce_budgeted_all_ignored_mean(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    N, V, D = 30, 257, 32
    h = _randn((N, D), gen, torch.float32)
    w = _randn((V, D), gen, torch.float32)
    b = _randn((V,), gen, torch.float32)
    t = torch.full((N,), IGNORE, device=DEVICE)
    monkeypatch.setattr(plan, "LEAN_MAX_BUDGET", 0)
    loss, lse, (dh, dw, db) = ce.linear_cross_entropy_forward(
        h, w, t, b, reduction="mean", memory_budget=V * 4 * 16, **_opts(label_smoothing=0.1))
    assert (loss == 0).all() and (lse == 0).all()
    assert (dh == 0).all() and (dw == 0).all() and (db == 0).all()


# -------------------------------------------------------------------------------- GPU only
@pytest.mark.parametrize("V", [50257, 128256])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_ce_bf16_large_vocab(V):
    gen = torch.Generator().manual_seed(V)
    N = 96
    opts = _opts(label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
    x = _randn((N, V), gen, torch.bfloat16, scale=4.0)
    t = _targets(N, V, gen, 0.1)
    g = torch.rand(N, generator=gen).to(DEVICE)
    g_lse = torch.rand(N, generator=gen).to(DEVICE)
    loss, lse = ce.cross_entropy_forward(x, t, **opts)
    x_in = x.clone()
    dx = ce.cross_entropy_backward(g, g_lse, x, t, lse, inplace=True, **opts)
    _check_ce((loss, lse, dx), x_in, t, g, g_lse, torch.bfloat16, opts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("V", [50257, 128256])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_linear_ce_large_vocab(V, dtype):
    gen = torch.Generator().manual_seed(V + 1)
    N, D = 300, 256
    opts = _opts(label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
    h = _randn((N, D), gen, dtype)
    w = _randn((V, D), gen, dtype, scale=2.0 / math.sqrt(D))
    b = _randn((V,), gen, dtype, scale=0.5)
    t = _targets(N, V, gen, 0.2)
    g = torch.rand(N, generator=gen).to(DEVICE) + 0.5

    loss, lse, _ = ce.linear_cross_entropy_forward(h, w, t, b, reduction="none", **opts)
    dh, dw, db = ce.linear_cross_entropy_backward(g, None, h, w, t, b, lse, **opts)
    _check_linear((loss, lse, dh, dw, db), h, w, t, b, g, None, dtype, opts)

    # 100 MiB (> LEAN_MAX_BUDGET): one chunk at V=50257 (fp32 and bf16), several at V=128256.
    loss, lse, (dh, dw, db) = ce.linear_cross_entropy_forward(
        h, w, t, b, reduction="mean", memory_budget=100 << 20, **opts)
    scale = 1.0 / int((t != IGNORE).sum())
    g = torch.full((N,), scale, dtype=torch.float64)
    _check_linear((None, None, dh, dw, db), h, w, t, b, g, None, dtype, opts)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_ce_more_than_2_31_logits():
    """N*V > 2**31 elements (~4.3 GB of bf16): rows past the 32-bit offset limit are right."""
    N, V = 8500, 256000
    assert N * V > 2**31
    gen = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn((N, V), generator=gen, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, V, (N,), generator=gen, device="cuda")
    t[-3] = V - 1  # the very last element of the buffer
    opts = _opts(label_smoothing=0.1)
    loss, lse = ce.cross_entropy_forward(x, t, **opts)
    check = torch.cat([torch.arange(0, 8), torch.arange(N - 24, N)]).cuda()
    want_loss, want_lse, want_dx = ce_reference(x[check], t[check], **opts)
    _close(loss[check], want_loss, 1e-4)
    _close(lse[check], want_lse, 1e-4)
    ce.cross_entropy_backward(torch.ones(N, device="cuda"), None, x, t, lse, inplace=True, **opts)
    _close(x[check], want_dx, 8e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_linear_ce_more_than_2_31_weight_elements():
    """V*D > 2**31: weight rows past the 32-bit offset limit feed loss and dweight correctly."""
    N, V, D = 32, 262144, 8200
    assert V * D > 2**31
    gen = torch.Generator(device="cuda").manual_seed(10)
    h = torch.randn((N, D), generator=gen, device="cuda", dtype=torch.bfloat16)
    w = torch.randn((V, D), generator=gen, device="cuda", dtype=torch.bfloat16) / math.sqrt(D)
    t = torch.randint(V - 1000, V, (N,), generator=gen, device="cuda")  # targets near the end
    opts = _opts()
    loss, lse, _ = ce.linear_cross_entropy_forward(h, w, t, None, reduction="none", **opts)
    dh, dw, _ = ce.linear_cross_entropy_backward(torch.ones(N, device="cuda"), None, h, w, t,
                                                 None, lse, **opts)
    # float64 oracle in vocabulary chunks (a float64 copy of the weight would take 17 GB).
    chunks = range(0, V, 32768)
    h64 = h.double()
    x = torch.cat([h64 @ w[v0:v0 + 32768].double().T for v0 in chunks], dim=1)
    want_loss, want_lse, want_dx = ce_reference(x, t, **opts)
    _close(loss, want_loss, 1e-3)
    _close(lse, want_lse, 1e-3)
    tail = slice(V - 1000, V)
    _close(dw[tail], want_dx[:, tail].T @ h64, 3e-2)
    want_dh = sum(want_dx[:, v0:v0 + 32768] @ w[v0:v0 + 32768].double() for v0 in chunks)
    _close(dh, want_dh, 3e-2)
